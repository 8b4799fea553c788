"""Gateway gRPC servicer: the public `llmmesh.v1.GenerationService`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc.aio

from llmmesh.common.errors import InvalidArgument
from llmmesh.gateway.admission import AdmissionController, AdmissionLimits, check_request_id, priority_from_proto
from llmmesh.gateway.auth import caller_identity
from llmmesh.gateway.orchestrator import Orchestrator
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["GatewayServicer"]


class GatewayServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, orchestrator: Orchestrator, admission: AdmissionController | None = None) -> None:
        self._orchestrator = orchestrator
        self._admission = admission or AdmissionController(AdmissionLimits())

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        arrived = time.monotonic()
        check_request_id(request.request_id)
        priority = priority_from_proto(request.priority)
        async with self._admission.admit(caller_identity(context), priority, context.time_remaining()):
            async for response in self._orchestrator.generate(request, context.time_remaining(), arrived):
                yield response

    async def Converse(
        self, request_iterator: AsyncIterator[generation_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.ConverseResponse]:
        first = await anext(aiter(request_iterator), None)
        arrived = time.monotonic()
        if first is None or first.WhichOneof("kind") != "generate":
            raise InvalidArgument("generate", "the first message must be a generate request")
        check_request_id(first.generate.request_id)
        priority = priority_from_proto(first.generate.priority)
        async with self._admission.admit(caller_identity(context), priority, context.time_remaining()):
            async for response in self._converse(first, request_iterator, context, arrived):
                yield response

    async def _converse(
        self,
        first: generation_pb2.ConverseRequest,
        request_iterator: AsyncIterator[generation_pb2.ConverseRequest],
        context: grpc.aio.ServicerContext,
        arrived: float,
    ) -> AsyncIterator[generation_pb2.ConverseResponse]:
        interrupted = asyncio.Event()

        async def watch() -> None:
            # A later message that is not valid (e.g. invalid UTF-8) cannot be answered any more: the
            # stream is already answering; it counts as the end of the client's side.
            with contextlib.suppress(InvalidArgument):
                async for message in request_iterator:
                    if message.WhichOneof("kind") == "interrupt":
                        interrupted.set()
                        return

        watcher = asyncio.create_task(watch())
        stream = self._orchestrator.generate(first.generate, context.time_remaining(), arrived).__aiter__()
        delivered: list[str] = []
        request_id = first.generate.request_id
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                barge_in = asyncio.ensure_future(interrupted.wait())
                await asyncio.wait({step, barge_in}, return_when=asyncio.FIRST_COMPLETED)
                barge_in.cancel()
                if interrupted.is_set():
                    # Cancelling the step closes the generation: infer's call, and so the Triton request, ends.
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    yield generation_pb2.ConverseResponse(
                        interrupted=generation_pb2.Interrupted(
                            delivered_text="".join(delivered), delivered_chunks=len(delivered), request_id=request_id
                        )
                    )
                    return
                try:
                    response = step.result()
                except StopAsyncIteration:
                    return
                if response.HasField("chunk"):
                    yield generation_pb2.ConverseResponse(chunk=response.chunk)
                    delivered.append(response.chunk.text)
                else:
                    yield generation_pb2.ConverseResponse(final=response.final)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
