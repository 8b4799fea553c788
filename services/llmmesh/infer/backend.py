"""The inference backend: Triton's ModelStreamInfer in the TensorRT-LLM tensor contract.

`InferenceBackend` is what the servicer needs; `TritonBackend` implements it against a real Triton
server, the CPU model here or a `tensorrt_llm` engine on GPU alike (same tensors, same streaming).

Requests are built directly as tritonclient's `ModelInferRequest` protos and sent on Triton's
`ModelStreamInfer` stub, most of them over a few calls shared by many requests (`TritonBackend`):
`tritonclient.grpc.aio`'s `stream_infer` (2.73) drops `enable_empty_final_response`, without which a
stream that Triton ends cleanly cannot be told apart from one that was cut short. Building the tensors
by hand also skips a numpy round trip per token.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio
import numpy as np
from opentelemetry import trace
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LlmmeshError,
    ModelFailed,
    ResourceExhausted,
    Unavailable,
)
from llmmesh.common.logging import get_logger
from llmmesh.common.mux import Inbox
from llmmesh.common.telemetry import client_interceptors, tracing_enabled
from llmmesh.common.triton_auth import header_interceptors

__all__ = [
    "TRITON_PRIORITY",
    "Generation",
    "InferenceBackend",
    "TokenBatch",
    "TritonBackend",
    "stop_request",
    "stop_words_tensor",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class Generation:
    """One generation request, already validated by preprocess."""

    request_id: str
    model: str
    input_ids: Sequence[int]
    max_tokens: int
    end_id: int
    pad_id: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: Sequence[Sequence[int]] = ()
    # llmmesh.v1.Priority: 0 (unspecified) or 1 = interactive, 2 = batch.
    priority: int = 0
    # Ask the model for each token's log-probability (TensorRT-LLM's return_log_probs / output_log_probs).
    return_log_probs: bool = False


class TokenBatch(list[int]):
    """Token ids as generated, with their log-probabilities when the request asked for them."""

    __slots__ = ("log_probs",)

    def __init__(self, ids: Sequence[int] = (), log_probs: Sequence[float] | None = None) -> None:
        super().__init__(ids)
        self.log_probs: list[float] | None = None if log_probs is None else list(log_probs)


# Triton request priority levels (`priority` request parameter, uint64): 1 is the highest level and 0 means
# the model's default. Interactive requests go at level 1, batch at level 2. A model whose scheduler has
# priority levels (`dynamic_batching { priority_levels: 2 }`, TensorRT-LLM's in-flight batcher) serves
# level 1 first; others ignore the parameter.
TRITON_PRIORITY = {0: 1, 1: 1, 2: 2}


class InferenceBackend(Protocol):
    def generate(self, gen: Generation, timeout: float | None = None) -> AsyncIterator[list[int]]:
        """Yields token ids as they are generated; closing the iterator cancels the generation."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


def stop_words_tensor(words: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM's [1, 2, K] words list: ids end to end, then cumulative end offsets padded with -1."""
    flat = [i for w in words for i in w]
    offsets = np.cumsum([len(w) for w in words]).tolist()
    width = max(len(flat), 1)
    arr = np.full((1, 2, width), -1, dtype=np.int32)
    arr[0, 0, : len(flat)] = flat
    arr[0, 1, : len(offsets)] = offsets
    if not flat:
        arr[0, 0, 0] = 0
    return arr


def _add(req: service_pb2.ModelInferRequest, name: str, datatype: str, value: np.ndarray) -> None:
    tensor = req.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(value.shape)
    req.raw_input_contents.append(value.tobytes())


def build_request(gen: Generation, triton_model: str) -> service_pb2.ModelInferRequest:
    """The TensorRT-LLM backend's inputs for one streamed generation, batch size 1."""
    req = service_pb2.ModelInferRequest(model_name=triton_model, id=gen.request_id)
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    req.parameters["priority"].uint64_param = TRITON_PRIORITY.get(gen.priority, TRITON_PRIORITY[0])
    ids = np.asarray([gen.input_ids], dtype=np.int32)
    _add(req, "input_ids", "INT32", ids)
    _add(req, "input_lengths", "INT32", np.asarray([[ids.shape[1]]], dtype=np.int32))
    _add(req, "request_output_len", "INT32", np.asarray([[gen.max_tokens]], dtype=np.int32))
    _add(req, "end_id", "INT32", np.asarray([[gen.end_id]], dtype=np.int32))
    _add(req, "pad_id", "INT32", np.asarray([[gen.pad_id]], dtype=np.int32))
    _add(req, "streaming", "BOOL", np.asarray([[True]], dtype=bool))
    _add(req, "temperature", "FP32", np.asarray([[gen.temperature]], dtype=np.float32))
    _add(req, "runtime_top_k", "INT32", np.asarray([[gen.top_k]], dtype=np.int32))
    _add(req, "runtime_top_p", "FP32", np.asarray([[gen.top_p]], dtype=np.float32))
    _add(req, "exclude_input_in_output", "BOOL", np.asarray([[True]], dtype=bool))
    if gen.seed is not None:
        _add(req, "seed", "UINT64", np.asarray([[gen.seed]], dtype=np.uint64))
    if gen.stop_token_ids:
        _add(req, "stop_words_list", "INT32", stop_words_tensor(gen.stop_token_ids))
    if gen.return_log_probs:
        _add(req, "return_log_probs", "BOOL", np.asarray([[True]], dtype=bool))
    return req


def stop_request(request_id: str, triton_model: str) -> service_pb2.ModelInferRequest:
    """TensorRT-LLM's stop request: the same id with `stop` true cancels that request on a shared stream
    (cancelling a ModelStreamInfer call would cancel every request on it). The required inputs are there
    only because Triton checks them before the model sees the request."""
    req = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    _add(req, "input_ids", "INT32", np.zeros((1, 1), dtype=np.int32))
    _add(req, "input_lengths", "INT32", np.ones((1, 1), dtype=np.int32))
    _add(req, "request_output_len", "INT32", np.ones((1, 1), dtype=np.int32))
    _add(req, "stop", "BOOL", np.asarray([[True]], dtype=bool))
    return req


def _final(response: service_pb2.ModelStreamInferResponse) -> bool:
    return bool(response.error_message) or response.infer_response.parameters["triton_final_response"].bool_param


def _new_ids(model: str, response: service_pb2.ModelStreamInferResponse) -> TokenBatch:
    """A streamed response's new token ids; the error Triton sent for the request, raised."""
    if response.error_message:
        raise triton_error(model, response.error_message)
    return _output_ids(response.infer_response)


class _SharedCall:
    """One ModelStreamInfer call carrying many requests, its responses routed by request id.

    A request that is given up before its final response leaves a tombstone that swallows the two final
    responses still to come (its own, and its stop request's) before its id may be used on this call again.
    Lost, the call fails every request on it UNAVAILABLE."""

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, url: str) -> None:
        self.url = url
        self.routes: dict[str, Inbox | int] = {}
        self.alive = True
        self._queue = Inbox()  # requests to write, in order
        self.call = stub.ModelStreamInfer(aiter(self._queue))
        self._reader = asyncio.create_task(self._read())

    def send(self, request: service_pb2.ModelInferRequest) -> None:
        self._queue.push(request)

    async def _read(self) -> None:
        error: LlmmeshError = Unavailable(f"triton at {self.url} ended the stream")
        routes = self.routes
        try:
            async for response in self.call:
                rid = response.infer_response.id
                route = routes.get(rid)
                if route is None:
                    continue
                if isinstance(route, Inbox):
                    route.push(response)
                elif _final(response):
                    if route > 1:
                        routes[rid] = route - 1
                    else:
                        del routes[rid]
        except grpc.aio.AioRpcError as exc:
            error = _call_error(self.url, "", exc)
        except asyncio.CancelledError:
            error = Unavailable(f"triton at {self.url}: the stream was closed")
            raise
        finally:
            self.alive = False
            for route in routes.values():
                if isinstance(route, Inbox):
                    route.end(error)
            routes.clear()
            self.call.cancel()

    def close(self) -> None:
        self._reader.cancel()


# Triton's own error texts (tritonserver core; the stream carries only the text, no code), matched in
# lower case after the "[request id: ...]" prefix. Each is the request's own answer: never UNAVAILABLE,
# so the gateway does not run it again. UNAVAILABLE is kept for a lost Triton server.
_QUEUE_FULL = ("exceeds maximum queue size", "queue is full")
_NOT_READY = ("unknown model", "is not at ready state", "no available versions", "is not ready")
_BAD_INPUT = ("unexpected shape", "unexpected inference input", "expects", "expected", "invalid", "must be")
# How long a caller shed by a full Triton queue should wait before trying again, in seconds.
QUEUE_FULL_RETRY_AFTER = 1.0


def triton_error(model: str, message: str) -> LlmmeshError:
    """The status for an error Triton (or its model) sent for one request."""
    text = message.lower()
    if any(m in text for m in _QUEUE_FULL):
        return ResourceExhausted(f"triton model {model} is overloaded: {message}", QUEUE_FULL_RETRY_AFTER)
    if any(m in text for m in _NOT_READY):
        return FailedPrecondition(f"triton model {model} is not ready: {message}")
    if any(m in text for m in _BAD_INPUT):
        return InvalidArgument("input", f"triton model {model} refused the request: {message}")
    return ModelFailed(f"triton model {model} failed: {message}")


def _call_error(url: str, model: str, exc: grpc.aio.AioRpcError) -> LlmmeshError:
    """The status for a failed ModelStreamInfer call: UNAVAILABLE only when the server itself was lost."""
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("deadline exceeded while generating")
    if code == grpc.StatusCode.UNAVAILABLE and not any(m in details.lower() for m in _NOT_READY + _QUEUE_FULL):
        return Unavailable(f"triton at {url}: {code.name}: {details}")
    return triton_error(model, details)


def _output_ids(response: service_pb2.ModelInferResponse) -> TokenBatch:
    ids: list[int] = []
    log_probs: list[float] | None = None
    for i, out in enumerate(response.outputs):
        if out.name == "output_ids":
            ids = array("i", response.raw_output_contents[i]).tolist()
        elif out.name == "output_log_probs":
            log_probs = array("f", response.raw_output_contents[i]).tolist()
    return TokenBatch(ids, log_probs)


class TritonBackend:
    """Streams generations from Triton.

    Requests go over a small pool of shared ModelStreamInfer calls (`shared_calls`, round robin), each
    cancelled on its own with TensorRT-LLM's stop request, when the model declares the `stop` input (read
    from its config once it is ready). A request goes on a call of its own (cancelled by cancelling the
    call) when the model has no `stop` input, when its id is still in use on every shared call, and when
    it is traced: Triton takes the trace context from a call's metadata, so only a call of its own puts
    Triton's spans in the request's trace. `shared_calls=0`: every request on a call of its own.
    """

    def __init__(
        self,
        url: str,
        routes: Mapping[str, str],
        options: Sequence[tuple[str, int]] = (),
        header: str = "",
        shared_calls: int = 2,
    ) -> None:
        self._url = url
        self._routes = dict(routes)
        # With tracing on, the client interceptor sends `traceparent`: Triton's InferRequest span joins our trace.
        # With `header` ('<key>=<value>', see llmmesh.common.triton_auth), every call opens Triton's restricted
        # protocols.
        interceptors = [*client_interceptors(), *header_interceptors(header)]
        self._channel = grpc.aio.insecure_channel(url, options=list(options), interceptors=interceptors)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # The shared calls carry many requests' traces: no tracing interceptor on their channel.
        self._shared_channel = grpc.aio.insecure_channel(
            url, options=list(options), interceptors=header_interceptors(header)
        )
        self._shared_stub = service_pb2_grpc.GRPCInferenceServiceStub(self._shared_channel)
        self._shared: list[_SharedCall | None] = [None] * shared_calls
        self._next_shared = 0
        # Triton model -> whether its config declares TensorRT-LLM's `stop` input.
        self._stoppable: dict[str, bool] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._models_ready: list[str] | None = None

    def triton_model(self, model: str) -> str:
        try:
            return self._routes[model]
        except KeyError:
            raise InvalidArgument(
                "model", f"unknown model {model!r}; served: {', '.join(sorted(self._routes))}"
            ) from None

    async def ready(self) -> bool:
        """Triton is ready and so is at least one of its models: a model taken down (unloaded, failed) is
        answered FAILED_PRECONDITION, which a fallback route skips, while the others keep serving; which
        models are ready is logged as it changes (`triton_models_ready`)."""
        try:
            if not (await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2)).ready:
                return False
            ready = []
            for triton_model in sorted(set(self._routes.values())):
                reply = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=triton_model), timeout=2)
                if reply.ready:
                    ready.append(triton_model)
                    if self._shared and triton_model not in self._stoppable:
                        await self._learn_stop_input(triton_model)
        except grpc.aio.AioRpcError:
            return False
        if ready != self._models_ready:
            self._models_ready = ready
            log.info("triton_models_ready", ready=ready, not_ready=sorted(set(self._routes.values()) - set(ready)))
        return bool(ready)

    async def _learn_stop_input(self, triton_model: str) -> None:
        """Whether the model's config declares TensorRT-LLM's `stop` input (else its requests keep a call of
        their own); a config that cannot be read counts as no."""
        try:
            config = await self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=triton_model), timeout=2)
        except grpc.aio.AioRpcError as exc:
            log.warning("triton_model_config_unreadable", model=triton_model, code=exc.code().name)
            self._stoppable[triton_model] = False
            return
        self._stoppable[triton_model] = any(i.name == "stop" for i in config.config.input)

    def _shared_call(self, gen: Generation, model: str) -> _SharedCall | None:
        """A shared call for this request, or None: it goes on a call of its own."""
        if not self._shared or not self._stoppable.get(model, False):
            return None
        if tracing_enabled() and trace.get_current_span().get_span_context().trace_flags.sampled:
            return None
        for _ in range(len(self._shared)):
            index = self._next_shared
            self._next_shared = (index + 1) % len(self._shared)
            call = self._shared[index]
            if call is None or not call.alive:
                self._shared[index] = call = _SharedCall(self._shared_stub, self._url)
            if gen.request_id not in call.routes:
                return call
        return None

    def generate(self, gen: Generation, timeout: float | None = None) -> AsyncIterator[list[int]]:
        model = self.triton_model(gen.model)
        shared = self._shared_call(gen, model)
        if shared is not None:
            return self._generate_shared(shared, gen, model, timeout)
        return self._generate_alone(gen, model, timeout)

    async def _generate_shared(
        self, call: _SharedCall, gen: Generation, model: str, timeout: float | None
    ) -> AsyncIterator[list[int]]:
        rid = gen.request_id
        inbox = Inbox()
        call.routes[rid] = inbox
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                timeout, inbox.end, DeadlineExceeded("deadline exceeded while generating")
            )
        call.send(build_request(gen, model))
        finished = False
        try:
            while True:
                responses = await inbox.take()
                if not responses:
                    raise Unavailable(f"triton at {self._url} ended the stream before the final response")
                for response in responses:
                    finished = _final(response)  # an error or the last response: nothing more comes for it
                    ids = _new_ids(model, response)
                    if ids:
                        yield ids
                    if finished:
                        return
        finally:
            if timer is not None:
                timer.cancel()
            if finished or not call.alive:
                if call.routes.get(rid) is inbox:
                    del call.routes[rid]
            else:
                # Given up (the caller went away, the deadline): stop it at the model; two finals to come.
                call.routes[rid] = 2
                call.send(stop_request(rid, model))

    async def _generate_alone(self, gen: Generation, model: str, timeout: float | None) -> AsyncIterator[list[int]]:
        call = self._stub.ModelStreamInfer(iter([build_request(gen, model)]), timeout=timeout)
        finished = False
        try:
            async for response in call:
                ids = _new_ids(model, response)
                if ids:
                    yield ids
                if _final(response):
                    finished = True
                    break
            if not finished:
                raise Unavailable(f"triton at {self._url} ended the stream before the final response")
        except grpc.aio.AioRpcError as exc:
            raise _call_error(self._url, model, exc) from exc
        finally:
            if finished:
                # The generation is complete: let the call close in the background (its client span ends
                # with it) instead of making the caller wait for Triton to close the stream.
                task = asyncio.create_task(self._finish(call))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                # The caller went away or Triton failed: cancel the Triton request at once.
                call.cancel()

    @staticmethod
    async def _finish(call: grpc.aio.StreamStreamCall) -> None:
        try:
            async with asyncio.timeout(5):
                async for _ in call:
                    pass
        except (TimeoutError, grpc.aio.AioRpcError):
            pass
        finally:
            call.cancel()

    async def close(self) -> None:
        for call in self._shared:
            if call is not None:
                call.close()
        await self._channel.close()
        await self._shared_channel.close()
