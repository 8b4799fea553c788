"""Gateway gRPC servicer: the public `llmmesh.v1.GenerationService`."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import grpc.aio

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.registry import ModelRegistry
from llmmesh.gateway.admission import AdmissionController, AdmissionLimits, check_request_id, priority_from_proto
from llmmesh.gateway.auth import caller_identity
from llmmesh.gateway.orchestrator import Orchestrator, with_request_id
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["GatewayServicer"]


def _check_ids(request: generation_pb2.GenerateRequest) -> None:
    check_request_id(request.request_id)
    check_request_id(request.idempotency_key, "idempotency_key")


class _Closer:
    """Closes a request's generation when its RPC ends, however it ends.

    A client that goes away while grpc is writing a response cancels grpc's task outside our code: the
    generation (infer's call, postprocess's call, the Triton request) would otherwise wait for garbage
    collection or its deadline. The RPC's done callback closes it at once.
    """

    def __init__(self, context: grpc.aio.ServicerContext, stream: AsyncGenerator[Any, None]) -> None:
        self._stream = stream
        self._task: asyncio.Task[None] | None = None
        context.add_done_callback(self._rpc_done)

    def _rpc_done(self, _context: object) -> None:
        stream = cast(types.AsyncGeneratorType, self._stream)
        # Running: our code holds the stream, and the handler's cancel closes it. Finished: nothing to do.
        if not stream.ag_running and stream.ag_frame is not None:
            self._task = asyncio.get_running_loop().create_task(self._stream.aclose())


def list_models(registry: ModelRegistry) -> generation_pb2.ListModelsResponse:
    """The registry's models and routes, as ListModels answers."""
    return generation_pb2.ListModelsResponse(
        models=[
            generation_pb2.ModelInfo(
                name=m.name,
                aliases=m.aliases,
                backend=m.backend,
                default=m.default,
                prompt_price=m.prompt_price,
                completion_price=m.completion_price,
            )
            for m in registry.models
        ],
        routes=[
            generation_pb2.RouteInfo(name=r.name, kind=r.kind, targets=r.targets, description=r.description())
            for r in registry.routes
        ],
    )


class GatewayServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self,
        orchestrator: Orchestrator,
        admission: AdmissionController | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        self._orchestrator = orchestrator
        self._admission = admission or AdmissionController(AdmissionLimits())
        self._models = list_models(registry) if registry is not None else generation_pb2.ListModelsResponse()

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        return self._models

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        arrived = time.monotonic()
        _check_ids(request)
        priority = priority_from_proto(request.priority)
        caller = caller_identity(context)
        async with self._admission.admit(caller, priority, context.time_remaining()):
            stream = self._orchestrator.generate(request, context.time_remaining(), arrived, caller)
            _Closer(context, stream)
            async with contextlib.aclosing(stream):
                async for response in stream:
                    yield response

    async def Converse(
        self, request_iterator: AsyncIterator[generation_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.ConverseResponse]:
        first = await anext(aiter(request_iterator), None)
        arrived = time.monotonic()
        if first is None or first.WhichOneof("kind") != "generate":
            raise InvalidArgument("generate", "the first message must be a generate request")
        _check_ids(first.generate)
        priority = priority_from_proto(first.generate.priority)
        caller = caller_identity(context)
        async with self._admission.admit(caller, priority, context.time_remaining()):
            async for response in self._converse(with_request_id(first.generate), request_iterator, context, arrived):
                yield response

    async def _converse(
        self,
        request: generation_pb2.GenerateRequest,
        request_iterator: AsyncIterator[generation_pb2.ConverseRequest],
        context: grpc.aio.ServicerContext,
        arrived: float,
    ) -> AsyncIterator[generation_pb2.ConverseResponse]:
        """Relays the generation until it ends (`final`) or the client interrupts (`interrupted`), never both."""
        interrupted = asyncio.Event()

        async def watch() -> None:
            # A later message that is not valid (e.g. invalid UTF-8) cannot be answered any more: the
            # stream is already answering; it counts as the end of the client's side.
            with contextlib.suppress(InvalidArgument):
                async for message in request_iterator:
                    if message.WhichOneof("kind") == "interrupt":
                        interrupted.set()
                        return

        stream = self._orchestrator.generate(request, context.time_remaining(), arrived, caller_identity(context))
        _Closer(context, stream)
        delivered: list[str] = []
        watcher = asyncio.create_task(watch())
        barge_in = asyncio.create_task(interrupted.wait())
        step: asyncio.Future[generation_pb2.GenerateResponse] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait({step, barge_in}, return_when=asyncio.FIRST_COMPLETED)
                if interrupted.is_set():
                    # The listener barged in: nothing more is sent, not even a chunk that is ready.
                    break
                try:
                    response = step.result()
                except StopAsyncIteration:
                    return
                step = None
                if response.HasField("chunk"):
                    yield generation_pb2.ConverseResponse(chunk=response.chunk)
                    delivered.append(response.chunk.text)
                else:
                    yield generation_pb2.ConverseResponse(final=response.final)
                    return
        finally:
            # Every exit (interrupt, client gone, error) stops the generation before anything else: the
            # pending step is cancelled (its CancelledError closes infer's and postprocess's calls), then
            # the generator is closed, then the helpers.
            await _cancel_and_wait(step)
            await stream.aclose()
            watcher.cancel()
            barge_in.cancel()
            await _cancel_and_wait(watcher)
            await _cancel_and_wait(barge_in)
        yield generation_pb2.ConverseResponse(
            interrupted=generation_pb2.Interrupted(
                delivered_text="".join(delivered), delivered_chunks=len(delivered), request_id=request.request_id
            )
        )


async def _cancel_and_wait(future: asyncio.Future[Any] | None) -> None:
    """Cancels `future` and waits for it to end, without letting its outcome (or its cancel) escape."""
    if future is None:
        return
    future.cancel()
    try:
        await future
    except (asyncio.CancelledError, StopAsyncIteration):
        task = asyncio.current_task()
        if task is not None and task.cancelling() and not future.cancelled():
            raise
    except Exception:  # the generation's own failure is moot once we stopped it
        pass
