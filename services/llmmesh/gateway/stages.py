"""The three stages as the gateway sees them: small interfaces that know nothing of gRPC.

    Preprocess.prepare(request, timeout) -> PrepareResponse
    Infer.generate(request, timeout) -> async iterator of InferResponse      closing it cancels the generation
    Postprocess.process(requests, timeout) -> async iterator of ProcessResponse  (Start, Tokens..., End in)

A stage in the gateway's own process is the domain object itself (`llmmesh.preprocess.stage.PreprocessStage`,
`llmmesh.postprocess.stage.PostprocessStage`); a remote one is a thin adapter over its gRPC stub (below).
Both raise domain errors (`llmmesh.common.errors`): a status a remote stage answered with keeps its code
and message, a stage that cannot be reached or is lost mid-stream is `Unavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio

from llmmesh.common.errors import DeadlineExceeded, Unavailable, from_rpc_error
from llmmesh.stages.v1 import (
    infer_pb2,
    infer_pb2_grpc,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
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
]


class Preprocess(Protocol):
    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.PrepareResponse: ...


class Infer(Protocol):
    def generate(
        self, request: infer_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]: ...

    async def forget(self, request_hash: str) -> None: ...


class Postprocess(Protocol):
    def process(
        self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]: ...


class RemotePreprocess:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)

    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.PrepareResponse:
        try:
            return await self._stub.Prepare(preprocess_pb2.PrepareRequest(request=request), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "preprocess") from None


class RemoteInfer:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = infer_pb2_grpc.InferServiceStub(channel)

    async def generate(
        self, request: infer_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        call = self._stub.Generate(request, timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "infer") from None
        finally:
            call.cancel()  # no-op once the call has ended; else the Triton request is cancelled

    async def forget(self, request_hash: str) -> None:
        try:
            await self._stub.Forget(infer_pb2.ForgetRequest(request_hash=request_hash), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "infer") from None


class RemotePostprocess:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)

    async def process(
        self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        # grpc reads `requests` on a task of its own, concurrently with our reads: that task is the pump.
        call = self._stub.Process(aiter(requests), timeout=timeout)
        done = False
        try:
            async for response in call:
                done = done or response.HasField("done")
                yield response
        except grpc.aio.AioRpcError as exc:
            # After Done the stream's answer is complete: postprocess ended its side (a stop string, a
            # filter) while grpc was still writing what followed, which grpc reports as an error of its own.
            if not done:
                raise from_rpc_error(exc, "postprocess") from None
        finally:
            call.cancel()


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
            if ch.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
                continue
            timeout = self.connect_timeout if remaining is None else min(remaining, self.connect_timeout)
            try:
                await asyncio.wait_for(ch.channel_ready(), timeout)
            except TimeoutError:
                if remaining is not None and remaining <= self.connect_timeout:
                    raise DeadlineExceeded("deadline exceeded") from None
                raise Unavailable(f"{name} stage is unreachable") from None
