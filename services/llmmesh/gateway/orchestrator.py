"""The gateway's work: one request through preprocess, infer and postprocess, relayed as it streams.

    client ─► Prepare (preprocess) ─► Generate (infer, token ids) ──► Process (postprocess, text) ─► client

A pump task moves token ids from infer into postprocess while the caller reads text from postprocess.
When postprocess ends the stream early (stop string, content filter), or the client goes away, the
infer call is cancelled, which cancels the Triton request. Every call gets the time that remains.

Before the client has a chunk, a stage call that fails with UNAVAILABLE is made once more (Prepare; the
infer stream until its first response; the postprocess stream, replayed to where it was): the stages'
channels balance round robin over every address, so with several replicas the retry goes to another
one. Once a chunk was sent nothing is retried: a second generation could contradict it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from opentelemetry import trace

from llmmesh.common import metrics
from llmmesh.common.errors import DeadlineExceeded, Unavailable
from llmmesh.common.logging import get_logger
from llmmesh.common.telemetry import set_attributes
from llmmesh.stages.v1 import (
    infer_pb2,
    infer_pb2_grpc,
    postprocess_pb2,
    preprocess_pb2,
)
from llmmesh.v1 import generation_pb2

__all__ = ["SHARING_SCOPES", "Orchestrator", "PostprocessStub", "PreprocessStub", "Stages", "with_request_id"]

# Who may share a generation (join it in flight, replay its cached result): callers with the same
# identity only, or every caller of the mesh.
SHARING_SCOPES = ("caller", "global")

log = get_logger(__name__)


class PreprocessStub(Protocol):
    """`PreprocessServiceStub`, or preprocess in this process (`llmmesh.preprocess.local`)."""

    def Prepare(
        self, request: preprocess_pb2.PrepareRequest, timeout: float | None = None
    ) -> Awaitable[preprocess_pb2.PrepareResponse]: ...


class PostprocessStub(Protocol):
    """`PostprocessServiceStub`, or postprocess in this process (`llmmesh.postprocess.local`)."""

    def Process(self, timeout: float | None = None) -> grpc.aio.StreamStreamCall: ...


@dataclass(frozen=True)
class Stages:
    preprocess: PreprocessStub
    infer: infer_pb2_grpc.InferServiceStub
    postprocess: PostprocessStub
    # name -> channel, to connect (or fail fast) before a request is sent to a stage.
    channels: dict[str, grpc.aio.Channel]
    connect_timeout: float = 2.0

    async def connected(self, deadline: _Deadline) -> None:
        """Waits until every stage's channel is connected, at most `connect_timeout`; else UNAVAILABLE."""
        for name, ch in self.channels.items():
            if ch.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
                continue
            remaining = deadline.remaining()
            timeout = self.connect_timeout if remaining is None else min(remaining, self.connect_timeout)
            try:
                await asyncio.wait_for(ch.channel_ready(), timeout)
            except TimeoutError:
                deadline.remaining()  # DEADLINE_EXCEEDED when that is what ran out
                raise Unavailable(f"{name} stage is unreachable") from None


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded")
        return left


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    async for _ in call:
        pass


async def _quietly(awaitable: Any) -> None:
    """Awaits clean-up work, ignoring its failure and its cancellation, but never this task's own cancel.

    grpc.aio raises CancelledError from a call that was cancelled (e.g. a write interrupted by our own
    pump.cancel()); letting that escape the handler would end the RPC without a status, and the client
    would wait until its deadline.
    """
    try:
        await awaitable
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except grpc.aio.AioRpcError:
        pass


# What grpc's own client reports, as INTERNAL, when the peer of a stream it is writing to goes away.
_CORE_INTERNAL = "Internal error from Core"


def _transport_lost(exc: BaseException) -> bool:
    return (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == _CORE_INTERNAL
    )


def _retryable(exc: grpc.aio.AioRpcError) -> bool:
    """Only a lost stage is worth a second attempt; every other status is the request's own answer."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE or _transport_lost(exc)


def _stage_status(exc: BaseException) -> BaseException:
    """A stage lost mid-stream is UNAVAILABLE to the client, however grpc's client happened to report it."""
    if _transport_lost(exc):
        return Unavailable("a stage was lost mid-stream")
    return exc


class _PostprocessCall:
    """The Process stream, re-opened once if it fails UNAVAILABLE before the client got a chunk.

    Until then every message written is kept, so the new call is replayed to the same point. Only the
    reader decides on a retry: a failed write says nothing on its own (when postprocess has answered and
    ended the stream, e.g. a stop string before any text, the writes that follow fail too, and nothing may
    be re-run). The pump waits for the reader's decision; it writes under a lock, so a replay never
    interleaves with a write.
    """

    def __init__(self, open_call: Callable[[], grpc.aio.StreamStreamCall], request_id: str) -> None:
        self._open = open_call
        self._request_id = request_id
        self.call = open_call()
        self._lock = asyncio.Lock()
        self._reopened = asyncio.Event()
        self._written: list[postprocess_pb2.ProcessRequest] | None = []
        self._half_closed = False
        self._retried = False

    def committed(self) -> None:
        """A chunk is going to the client: from now on a failure is final, and nothing is kept to replay."""
        self._written = None

    async def write(self, message: postprocess_pb2.ProcessRequest) -> None:
        async with self._lock:
            call = self.call
            if self._written is not None:
                self._written.append(message)
            try:
                await call.write(message)
                return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        await self._reader_decides(call)

    async def done_writing(self) -> None:
        async with self._lock:
            call = self.call
            self._half_closed = True
            try:
                await call.done_writing()
                return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        await self._reader_decides(call)

    async def _reader_decides(self, failed: grpc.aio.StreamStreamCall) -> None:
        """Returns once the reader has re-opened the call (its replay included what failed here); when the
        reader does not retry, it ends the request and cancels the pump waiting here."""
        while self.call is failed:
            await self._reopened.wait()

    async def reopen(self, failed: grpc.aio.StreamStreamCall, exc: grpc.aio.AioRpcError) -> bool:
        """The reader's decision after `failed` ended with `exc`: True when it may go on with `self.call`."""
        async with self._lock:
            if self.call is not failed:
                return True
            if self._written is None or self._retried or not _retryable(exc):
                return False
            self._retried = True
            log.info("stage_retry", stage="postprocess", request_id=self._request_id, code=exc.code().name)
            self.call = self._open()
            self._reopened.set()
            try:
                for message in self._written:
                    await self.call.write(message)
                if self._half_closed:
                    await self.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the new call failed too: the reader gets its status
            return True


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)


def with_request_id(request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
    """The request itself when it has an id, else a copy with a new one (the caller's message is not changed)."""
    if request.request_id:
        return request
    named = generation_pb2.GenerateRequest()
    named.CopyFrom(request)
    named.request_id = uuid.uuid4().hex
    return named


class Orchestrator:
    def __init__(self, stages: Stages, sharing_scope: str = "global") -> None:
        if sharing_scope not in SHARING_SCOPES:
            raise ValueError(f"sharing_scope must be one of {SHARING_SCOPES}, got {sharing_scope!r}")
        self._stages = stages
        self._sharing_scope = sharing_scope

    async def generate(
        self,
        request: generation_pb2.GenerateRequest,
        timeout: float | None,
        arrived: float | None = None,
        caller: str = "",
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """`arrived` (time.monotonic()) is when the gateway received the request, before admission: the
        timings and queue time count from there. `caller` is the caller's identity: idempotency keys are
        always scoped by it, and shared generations too when the sharing scope is "caller"."""
        started = time.monotonic() if arrived is None else arrived
        deadline = _Deadline(timeout)
        request = with_request_id(request)
        request_id = request.request_id

        span = trace.get_current_span()  # the gateway's server span (grpc instrumentation), when tracing
        await self._stages.connected(deadline)
        prepared = await self._prepare(preprocess_pb2.PrepareRequest(request=request), deadline, request_id)
        set_attributes(
            span,
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": prepared.model,
                "gen_ai.request.max_tokens": prepared.sampling.max_tokens,
                "gen_ai.request.temperature": prepared.sampling.temperature,
                "gen_ai.request.top_p": prepared.sampling.top_p,
                "gen_ai.usage.input_tokens": len(prepared.input_ids),
                "llmmesh.request_id": request_id,
            },
        )
        if prepared.blocked_category:
            # The prompt failed the safety policy: a result, not an error, and nothing is generated.
            final = generation_pb2.Final(
                finish_reason=generation_pb2.FINISH_REASON_CONTENT_FILTER,
                usage=generation_pb2.Usage(prompt_tokens=len(prepared.input_ids)),
                timings=generation_pb2.Timings(total_ms=_ms(started, time.monotonic())),
                request_id=request_id,
                model=prepared.model,
                filter_category=prepared.blocked_category,
            )
            _record(span, final, started, time.monotonic(), None, None, time.monotonic())
            yield generation_pb2.GenerateResponse(final=final)
            return
        # The caller's identity scopes what it may share; it travels inside the keys, never as a request id.
        share_key = prepared.request_hash if self._sharing_scope == "global" else f"{caller}/{prepared.request_hash}"
        infer_request = infer_pb2.InferRequest(
            request_id=request_id,
            model=prepared.model,
            input_ids=prepared.input_ids,
            end_id=prepared.end_id,
            pad_id=prepared.pad_id,
            sampling=prepared.sampling,
            stop_token_ids=prepared.stop_token_ids,
            request_hash=share_key,
            shareable=prepared.shareable,
            priority=request.priority,
            idempotency_key=f"{caller}/{request.idempotency_key}" if request.idempotency_key else "",
            fresh=request.fresh,
        )

        def open_infer() -> grpc.aio.UnaryStreamCall:
            return self._stages.infer.Generate(infer_request, timeout=deadline.remaining())

        state = _PumpState(infer_call=open_infer())
        handed_to_model = time.monotonic()
        post = _PostprocessCall(lambda: self._stages.postprocess.Process(timeout=deadline.remaining()), request_id)
        pump = asyncio.create_task(self._pump(open_infer, post, prepared, state))
        first_token_at: float | None = None
        first_speakable_at: float | None = None
        done: postprocess_pb2.Done | None = None
        post_call = post.call
        try:
            ended = False
            while not ended:
                post_call = post.call
                try:
                    async for response in post_call:
                        kind = response.WhichOneof("kind")
                        if kind == "delta":
                            delta = response.delta
                            if first_token_at is None and delta.text:
                                first_token_at = time.monotonic()
                                span.add_event("first_token")
                            if first_speakable_at is None and delta.speakable:
                                first_speakable_at = time.monotonic()
                            post.committed()
                            yield generation_pb2.GenerateResponse(
                                chunk=generation_pb2.Chunk(
                                    text=delta.text, token_ids=delta.token_ids, speakable=delta.speakable
                                )
                            )
                        elif kind == "done":
                            done = response.done
                            break
                    ended = True
                except grpc.aio.AioRpcError as exc:
                    if state.error is None and await post.reopen(post_call, exc):
                        continue
                    if state.error is None:
                        if _transport_lost(exc):
                            raise _stage_status(exc) from exc
                        raise
                    ended = True
        finally:
            # Early end (stop string, content filter) or client gone: stop the generation now.
            state.infer_call.cancel()
            pump.cancel()
            await _quietly(pump)
            if done is None:
                post.call.cancel()
            else:
                # Postprocess has ended its side: read the call that answered to its end, so it (and its
                # span) completes; a call opened after it (a retry racing the answer) is not needed.
                if post.call is not post_call:
                    post.call.cancel()
                await _quietly(_drain(post_call))
        if done is None:
            raise state.error or Unavailable("postprocess ended the stream without a result")
        if done.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER and prepared.shareable:
            # Filtered text is never served from the result cache.
            await _quietly(self._stages.infer.Forget(infer_pb2.ForgetRequest(request_hash=share_key), timeout=2.0))
        if done.token_ids and done.finish_reason in (
            generation_pb2.FINISH_REASON_STOP,
            generation_pb2.FINISH_REASON_LENGTH,
        ):
            # Ids whose text was empty (e.g. a trailing special token) still belong to the answer.
            yield generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(token_ids=done.token_ids))
        finished = time.monotonic()
        # What the answer consumed, counted by postprocess the same way on every run (Usage's doc comment).
        completion = done.completion_tokens
        final = generation_pb2.Final(
            finish_reason=done.finish_reason,
            usage=generation_pb2.Usage(prompt_tokens=len(prepared.input_ids), completion_tokens=completion),
            timings=generation_pb2.Timings(
                queue_ms=_ms(started, handed_to_model),
                time_to_first_token_ms=_ms(started, first_token_at) if first_token_at else 0.0,
                total_ms=_ms(started, finished),
                time_to_first_speakable_chunk_ms=_ms(started, first_speakable_at) if first_speakable_at else 0.0,
            ),
            request_id=request_id,
            model=prepared.model,
            matched_stop=done.matched_stop,
            filter_category=done.filter_category,
            reuse=state.reuse,
            reuse_detail=prepared.not_shareable_reason if state.reuse == generation_pb2.REUSE_NOT_SHAREABLE else "",
        )
        _record(span, final, started, handed_to_model, first_token_at, first_speakable_at, finished)
        yield generation_pb2.GenerateResponse(final=final)

    async def _prepare(
        self, prepare: preprocess_pb2.PrepareRequest, deadline: _Deadline, request_id: str
    ) -> preprocess_pb2.PrepareResponse:
        try:
            return await self._stages.preprocess.Prepare(prepare, timeout=deadline.remaining())
        except grpc.aio.AioRpcError as exc:
            if not _retryable(exc):
                raise
            log.info("stage_retry", stage="preprocess", request_id=request_id, code=exc.code().name)
        return await self._stages.preprocess.Prepare(prepare, timeout=deadline.remaining())

    async def _pump(
        self,
        open_infer: Callable[[], grpc.aio.UnaryStreamCall],
        post: _PostprocessCall,
        prepared: preprocess_pb2.PrepareResponse,
        state: _PumpState,
    ) -> None:
        try:
            await post.write(
                postprocess_pb2.ProcessRequest(
                    start=postprocess_pb2.Start(
                        request_id=prepared.request_id,
                        model=prepared.model,
                        stop=prepared.stop,
                        chunking=prepared.chunking,
                    )
                )
            )
            reason = generation_pb2.FINISH_REASON_UNSPECIFIED
            received = False
            while True:
                try:
                    async for response in state.infer_call:
                        received = True
                        if response.token_ids:
                            await post.write(
                                postprocess_pb2.ProcessRequest(tokens=postprocess_pb2.Tokens(ids=response.token_ids))
                            )
                        if response.reuse:
                            state.reuse = response.reuse
                        if response.finish_reason:
                            reason = response.finish_reason
                    break
                except grpc.aio.AioRpcError as exc:
                    # Until infer's first response nothing of this generation exists: start it once more.
                    if received or state.infer_retried or not _retryable(exc):
                        raise
                    state.infer_retried = True
                    log.info("stage_retry", stage="infer", request_id=prepared.request_id, code=exc.code().name)
                    state.infer_call = open_infer()
            if not reason:
                raise Unavailable("infer ended the stream without a finish reason")
            await post.write(postprocess_pb2.ProcessRequest(end=postprocess_pb2.End(finish_reason=reason)))
            await post.done_writing()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and post.call.done():
                return  # postprocess already ended the stream; the generation was stopped on purpose
            await self._abandon(post.call, state, exc)
        except Exception as exc:
            await self._abandon(post.call, state, exc)

    @staticmethod
    async def _abandon(post_call: grpc.aio.StreamStreamCall, state: _PumpState, exc: BaseException) -> None:
        # Half-close postprocess without an End: it stops, the reader sees no Done and raises `exc`.
        state.error = _stage_status(exc)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await post_call.done_writing()


def _record(
    span: trace.Span,
    final: generation_pb2.Final,
    started: float,
    handed: float,
    first: float | None,
    first_speakable: float | None,
    end: float,
) -> None:
    """Metrics, span attributes and the one log line of a completed request (never its text)."""
    reason = generation_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    model = final.model
    usage = final.usage
    metrics.REQUESTS.labels(model, reason).inc()
    metrics.PROMPT_TOKENS.labels(model).inc(usage.prompt_tokens)
    metrics.COMPLETION_TOKENS.labels(model).inc(usage.completion_tokens)
    metrics.QUEUE_TIME.labels(model).observe(handed - started)
    metrics.E2E_LATENCY.labels(model).observe(end - started)
    if first is not None:
        metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(first - started)
        if usage.completion_tokens > 1:
            metrics.INTER_TOKEN_LATENCY.labels(model).observe((end - first) / (usage.completion_tokens - 1))
    if first_speakable is not None:
        metrics.TIME_TO_FIRST_SPEAKABLE.labels(model).observe(first_speakable - started)
    set_attributes(
        span,
        {
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "gen_ai.response.finish_reasons": [reason],
            "gen_ai.response.model": model,
        },
    )
    log.info(
        "request_completed",
        request_id=final.request_id,
        model=model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        finish_reason=reason,
        filter_category=final.filter_category or None,
        reuse=generation_pb2.Reuse.Name(final.reuse).removeprefix("REUSE_").lower(),
        queue_ms=final.timings.queue_ms,
        time_to_first_token_ms=final.timings.time_to_first_token_ms,
        time_to_first_speakable_chunk_ms=final.timings.time_to_first_speakable_chunk_ms,
        total_ms=final.timings.total_ms,
    )


@dataclass
class _PumpState:
    infer_call: grpc.aio.UnaryStreamCall
    infer_retried: bool = False
    reuse: generation_pb2.Reuse = generation_pb2.REUSE_UNSPECIFIED
    error: BaseException | None = None
