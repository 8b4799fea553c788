"""The three stages as the gateway sees them: small interfaces that know nothing of gRPC.

    Preprocess.prepare(request, timeout, defer_classifier) -> PrepareResponse
    Preprocess.check_prompt(request, timeout) -> CheckPromptResponse   the verdict a deferred prepare left out
    Infer.generate(request, timeout) -> async iterator of InferResponse      closing it cancels the generation
    Postprocess.process(requests, timeout) -> async iterator of ProcessResponse  (Start, Tokens..., End in)

A stage in the gateway's own process is the domain object itself (`llmmesh.preprocess.stage.PreprocessStage`,
`llmmesh.postprocess.stage.PostprocessStage`); a remote one is a thin adapter over its gRPC stub (below).
Both raise domain errors (`llmmesh.common.errors`): a status a remote stage answered with keeps its code
and message, a stage that cannot be reached or is lost mid-stream is `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio

from llmmesh.common.errors import DeadlineExceeded, Unavailable, from_rpc_error
from llmmesh.common.logging import get_logger
from llmmesh.common.mux import MuxClient, MuxStream, client_trace, error_of
from llmmesh.stages.v1 import (
    infer_pb2,
    infer_pb2_grpc,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
    streams_pb2,
)
from llmmesh.v1 import generation_pb2

__all__ = [
    "Infer",
    "Postprocess",
    "Preprocess",
    "RemoteInfer",
    "RemotePostprocess",
    "RemotePreprocess",
    "Stages",
    "generate_retried",
]

log = get_logger(__name__)


class Preprocess(Protocol):
    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None, defer_classifier: bool = False
    ) -> preprocess_pb2.PrepareResponse: ...

    async def check_prompt(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.CheckPromptResponse: ...


class Infer(Protocol):
    def generate(
        self, request: infer_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]: ...

    async def forget(self, request_hash: str) -> None: ...


async def generate_retried(
    infer: Infer, request: infer_pb2.InferRequest, remaining: Callable[[], float | None]
) -> AsyncGenerator[infer_pb2.InferResponse, None]:
    """`infer.generate(request)`, started once more when infer is lost before its first response: until then
    nothing of the generation exists (and round robin may reach another replica). Each start gets
    `remaining()` seconds. Used by whoever reads infer: the gateway's pump, or postprocess itself."""
    for attempt in (1, 2):
        received = False
        stream = infer.generate(request, remaining())
        try:
            async with contextlib.aclosing(stream):
                async for response in stream:
                    received = True
                    yield response
            return
        except Unavailable as exc:
            if received or attempt == 2:
                raise
            log.info("stage_retry", stage="infer", request_id=request.request_id, code=exc.code.name)


class Postprocess(Protocol):
    def process(
        self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]: ...


class RemotePreprocess:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)

    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None, defer_classifier: bool = False
    ) -> preprocess_pb2.PrepareResponse:
        message = preprocess_pb2.PrepareRequest(request=request, defer_prompt_classifier=defer_classifier)
        try:
            return await self._stub.Prepare(message, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "preprocess") from None

    async def check_prompt(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.CheckPromptResponse:
        try:
            return await self._stub.CheckPrompt(preprocess_pb2.PrepareRequest(request=request), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "preprocess") from None


_GENERATE = "/llmmesh.stages.v1.InferService/Generate"
_PROCESS = "/llmmesh.stages.v1.PostprocessService/Process"


def _header(timeout: float | None, carrier: dict[str, str]) -> streams_pb2.StreamHeader:
    return streams_pb2.StreamHeader(timeout_s=timeout or 0.0, trace_context=carrier)


def _merged(responses: list[infer_pb2.InferResponse]) -> list[infer_pb2.InferResponse]:
    """Responses that arrived together, token ids (or text) of consecutive ones joined: one message on."""
    out: list[infer_pb2.InferResponse] = []
    for response in responses:
        last = out[-1] if out else None
        if last is not None and not last.finish_reason and not response.finish_reason and not response.reuse:
            last.token_ids.extend(response.token_ids)
            last.log_probs.extend(response.log_probs)
            last.text += response.text
        else:
            out.append(response)
    return out


def _coalesced(responses: list[postprocess_pb2.ProcessResponse]) -> list[postprocess_pb2.ProcessResponse]:
    """Deltas that were waiting together, joined into one chunk per run of consecutive deltas; the chunk is
    speakable when its last delta was (it ends at that boundary)."""
    out: list[postprocess_pb2.ProcessResponse] = []
    for response in responses:
        last = out[-1] if out else None
        if last is not None and last.HasField("delta") and response.HasField("delta"):
            last.delta.text += response.delta.text
            last.delta.token_ids.extend(response.delta.token_ids)
            last.delta.speakable = response.delta.speakable
        else:
            out.append(response)
    return out


class RemoteInfer:
    """Generations on a few long-lived `GenerateStreams` calls (llmmesh.common.mux), one stream each."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        calls: int = 2,
        call_seconds: float = 30.0,
        connect_timeout: float | None = None,
    ) -> None:
        """With `connect_timeout`, a generation first waits that long at most for the channel to connect (a
        restarted infer, a channel in reconnect backoff), as the gateway's `Stages.connected` does for it."""
        self._channel = channel
        self._connect_timeout = connect_timeout
        self._stub = infer_pb2_grpc.InferServiceStub(channel)
        self._mux = MuxClient(
            "infer",
            self._stub.GenerateStreams,
            lambda ops: infer_pb2.InferStreamOps(ops=ops),
            lambda stream: infer_pb2.InferStreamOp(stream=stream, cancel=True),
            calls=calls,
            max_age=call_seconds,
            alone=lambda op: op.HasField("open"),
        )

    async def generate(
        self, request: infer_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        if self._connect_timeout is not None:
            started = time.monotonic()
            await wait_connected("infer", self._channel, timeout, self._connect_timeout)
            if timeout is not None:
                timeout -= time.monotonic() - started
        with client_trace(_GENERATE) as carrier:
            stream = self._mux.open(timeout)
            stream.send(infer_pb2.InferStreamOp(open=request, header=_header(timeout, carrier)))
            try:
                while True:
                    responses: list[infer_pb2.InferResponse] = []
                    for event in await stream.events():
                        if event.HasField("end"):
                            stream.finish()
                            for response in _merged(responses):
                                yield response
                            if event.end.code:
                                raise error_of(event.end)
                            return
                        responses.append(event.response)
                    for response in _merged(responses):
                        yield response
            finally:
                stream.close()  # no-op once it ended; else the Triton request is cancelled

    async def forget(self, request_hash: str) -> None:
        try:
            await self._stub.Forget(infer_pb2.ForgetRequest(request_hash=request_hash), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "infer") from None


class _Sender:
    """Puts a stream's messages on its call as ops: the header on the first, a close after the last (None)."""

    __slots__ = ("_header", "_stream")

    def __init__(self, stream: MuxStream, header: streams_pb2.StreamHeader) -> None:
        self._stream = stream
        self._header: streams_pb2.StreamHeader | None = header

    def __call__(self, message: postprocess_pb2.ProcessRequest | None) -> None:
        stream = self._stream
        if message is None:
            stream.send(postprocess_pb2.ProcessStreamOp(close=True))
            return
        op = postprocess_pb2.ProcessStreamOp(message=message)
        if self._header is not None:
            op.header.CopyFrom(self._header)
            self._header = None
        stream.send(op)


class RemotePostprocess:
    """Streams on a few long-lived `ProcessStreams` calls (llmmesh.common.mux)."""

    def __init__(self, channel: grpc.aio.Channel, calls: int = 2, call_seconds: float = 30.0) -> None:
        self._stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)
        self._mux = MuxClient(
            "postprocess",
            self._stub.ProcessStreams,
            lambda ops: postprocess_pb2.ProcessStreamOps(ops=ops),
            lambda stream: postprocess_pb2.ProcessStreamOp(stream=stream, cancel=True),
            calls=calls,
            max_age=call_seconds,
        )

    async def process(
        self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        with client_trace(_PROCESS) as carrier:
            stream = self._mux.open(timeout)
            header = _header(timeout, carrier)
            listen = getattr(requests, "listen", None)
            if listen is not None:
                # The gateway's feed hands each message over as it is put: no task per stream in between.
                stop: Callable[[], None] = listen(_Sender(stream, header))
            else:
                task = asyncio.create_task(self._send(stream, requests, header))
                stop = task.cancel  # type: ignore[assignment]  # its bool result is not used
            done = False
            try:
                while True:
                    responses: list[postprocess_pb2.ProcessResponse] = []
                    events = await stream.events()
                    for event in events:
                        if event.HasField("end"):
                            stream.finish()
                            for response in _coalesced(responses):
                                yield response
                            # After Done the answer is complete, whatever came after it.
                            if event.end.code and not done:
                                raise error_of(event.end)
                            return
                        done = done or event.response.HasField("done")
                        responses.append(event.response)
                    # Deltas waiting together (postprocess was ahead of the gateway and its client) go on
                    # as one chunk: a lagging client gets fewer, larger messages, never later text.
                    for response in _coalesced(responses):
                        yield response
            finally:
                stop()
                stream.close()

    @staticmethod
    async def _send(
        stream: MuxStream, requests: AsyncIterable[postprocess_pb2.ProcessRequest], header: streams_pb2.StreamHeader
    ) -> None:
        send = _Sender(stream, header)
        async for message in requests:
            send(message)
        send(None)


@dataclass(frozen=True)
class Stages:
    preprocess: Preprocess
    infer: Infer
    postprocess: Postprocess
    # name -> channel of each remote stage, to connect (or fail fast) before a request is sent to it.
    channels: dict[str, grpc.aio.Channel]
    connect_timeout: float = 2.0

    async def connected(self, remaining: float | None) -> None:
        """Waits until every remote stage's channel is connected, at most `connect_timeout`; else UNAVAILABLE."""
        for name, ch in self.channels.items():
            await wait_connected(name, ch, remaining, self.connect_timeout)


async def wait_connected(name: str, ch: grpc.aio.Channel, remaining: float | None, connect_timeout: float) -> None:
    """Returns once stage `name`'s channel is connected: at once when it is, else after waiting at most
    `connect_timeout` (and the `remaining` time of the request); then UNAVAILABLE (DEADLINE_EXCEEDED when the
    request's own time ran out first)."""
    if ch.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return
    timeout = connect_timeout if remaining is None else min(remaining, connect_timeout)
    try:
        await asyncio.wait_for(ch.channel_ready(), timeout)
    except TimeoutError:
        if remaining is not None and remaining <= connect_timeout:
            raise DeadlineExceeded("deadline exceeded") from None
        raise Unavailable(f"{name} stage is unreachable") from None
