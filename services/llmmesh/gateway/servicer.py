"""Gateway gRPC servicer: the public `llmmesh.v1.GenerationService`."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import grpc.aio

from llmmesh.common.errors import InvalidArgument, LlmmeshError
from llmmesh.common.logging import get_logger
from llmmesh.common.metrics import PROMPT_WARMS
from llmmesh.common.registry import ModelRegistry
from llmmesh.gateway.admission import AdmissionController, AdmissionLimits, check_request_id, priority_from_proto
from llmmesh.gateway.auth import caller_identity
from llmmesh.gateway.orchestrator import Orchestrator, with_request_id
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["GatewayServicer"]

log = get_logger(__name__)


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
        messages = aiter(request_iterator)
        warmup = _Warmup(self._orchestrator, self._admission, caller_identity(context))
        try:
            first = await anext(messages, None)
            while first is not None and first.WhichOneof("kind") == "interim":
                try:
                    _check_ids(first.interim)
                    priority_from_proto(first.interim.priority)
                except InvalidArgument as exc:
                    raise _under_interim(exc) from None
                warmup.check()
                warmup.interim(first.interim, context.time_remaining())
                first = await anext(messages, None)
            arrived = time.monotonic()
            warmup.check()
            if warmup.started and (first is None or first.WhichOneof("kind") == "interrupt"):
                # The user stopped before the turn was final: nothing to answer.
                await warmup.close()
                yield generation_pb2.ConverseResponse(interrupted=generation_pb2.Interrupted())
                return
            if first is None or first.WhichOneof("kind") != "generate":
                raise InvalidArgument("generate", "the first message must be a generate or an interim request")
            _check_ids(first.generate)
            priority = priority_from_proto(first.generate.priority)
            caller = caller_identity(context)
            await warmup.settle(first.generate)
            warmup.check()
            async with self._admission.admit(caller, priority, context.time_remaining()):
                async for response in self._converse(with_request_id(first.generate), messages, context, arrived):
                    yield response
        finally:
            await warmup.close()

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


def _turn_text(request: generation_pb2.GenerateRequest) -> str:
    """What a turn says, in order: an interim turn is extended by its request when this is a prefix of it."""
    if request.WhichOneof("input") == "chat":
        return "".join(f"\x1e{m.role}\x1f{m.content}" for m in request.chat.messages)
    return request.prompt


def _under_interim(exc: LlmmeshError) -> InvalidArgument:
    """An interim turn's INVALID_ARGUMENT ("field: problem", from here or from preprocess), its field named
    as part of the Converse message."""
    field, _, problem = str(exc).partition(": ")
    return InvalidArgument(f"interim.{field}", problem)


class _Warmup:
    """The interim turns of one Converse stream: one warm-up (`Orchestrator.warm`) at a time.

    A new interim that differs from the last one cancels its warm-up (the transcript changed) and starts its
    own; the request waits for a warm-up that it extends (its text goes on from the interim's) for up to
    `WAIT_SECONDS` (the prefill it waits for is shorter than its own would be), and cancels one it does not
    extend. A stream that ends without a request cancels its warm-up. A warm-up is admitted like a request
    (a shed one is not retried). Its INVALID_ARGUMENT fails the stream (the client sent it), naming the field
    under `interim.`; other failures only cost the warm-up.
    """

    WAIT_SECONDS = 2.0

    def __init__(self, orchestrator: Orchestrator, admission: AdmissionController, caller: str) -> None:
        self._orchestrator = orchestrator
        self._admission = admission
        self._caller = caller
        self._task: asyncio.Task[None] | None = None
        self._text = ""
        self._error: InvalidArgument | None = None
        self.started = False

    def interim(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> None:
        text = _turn_text(request)
        running = self._task is not None and not self._task.done()
        if running and text == self._text:
            return  # the same transcript again: its warm-up goes on
        if self._task is not None:
            self._task.cancel()
        self._text = text
        self.started = True
        self._task = asyncio.create_task(self._run(with_request_id(request), timeout))

    async def _run(self, request: generation_pb2.GenerateRequest, timeout: float | None) -> None:
        outcome = "failed"
        try:
            # A warm-up is work like any request: admitted (and shed) as one.
            async with self._admission.admit(self._caller, priority_from_proto(request.priority), timeout):
                outcome = await self._orchestrator.warm(request, timeout, self._caller)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except LlmmeshError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                outcome = "invalid"
                self._error = _under_interim(exc)
            else:
                log.info("warm_failed", code=exc.code.name, error=str(exc))
        finally:
            PROMPT_WARMS.labels(outcome).inc()

    def check(self) -> None:
        """Raises the INVALID_ARGUMENT of an interim turn that the mesh refused."""
        if self._error is not None:
            raise self._error

    async def settle(self, request: generation_pb2.GenerateRequest) -> None:
        """Before the request runs: waits for a warm-up it extends, cancels one it does not."""
        task = self._task
        if task is None or task.done():
            return
        if _turn_text(request).startswith(self._text):
            await asyncio.wait({task}, timeout=self.WAIT_SECONDS)
        await self.close()

    async def close(self) -> None:
        await _cancel_and_wait(self._task)
        self._task = None


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
