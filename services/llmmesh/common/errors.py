"""Domain errors and the one table that maps them to gRPC status codes.

Domain code raises these (it never imports grpc); `StatusInterceptor` turns them into statuses with a
message that names the problem. Errors from a downstream stage keep their code and message. Only the
unexpected becomes INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmmesh.common.logging import get_logger
from llmmesh.common.metrics import INFLIGHT_STREAMS, RPCS

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "LlmmeshError",
    "ModelFailed",
    "ResourceExhausted",
    "StageError",
    "StatusInterceptor",
    "Unavailable",
    "from_rpc_error",
    "retry_after_of",
    "retry_status",
    "status_of",
]

log = get_logger(__name__)


class LlmmeshError(Exception):
    """Base of the errors that carry a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(LlmmeshError):
    """Bad input; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ResourceExhausted(LlmmeshError):
    """Load shed; with `retry_after` (seconds) the status carries google.rpc.RetryInfo and retry-after trailers."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(LlmmeshError):
    """A dependency (Triton, a stage) cannot be reached or was lost mid-stream."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LlmmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(LlmmeshError):
    """The system is not in a state to serve the request (e.g. the model is not loaded); retrying the same
    server does not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelFailed(LlmmeshError):
    """The model answered the request with an error of its own: the request's answer, never retried."""

    code = grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status an error maps to; None for the unexpected (INTERNAL, to be logged with its traceback)."""
    if isinstance(exc, LlmmeshError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A stage's status passes through unchanged: its message already names the problem.
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return None


class StageError(LlmmeshError):
    """A stage answered a call with this status (the remote side of a stage interface): passed on as is."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


# What grpc's own client reports, as INTERNAL, when the peer of a stream it is writing to goes away.
_CORE_INTERNAL = "Internal error from Core"
_ERRORS: dict[grpc.StatusCode, type[LlmmeshError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(exc: grpc.aio.AioRpcError, stage: str) -> LlmmeshError:
    """A failed call to a stage as a domain error: what the gateway's orchestrator deals in, whether the
    stage runs in its process or behind gRPC. A stage lost mid-stream is UNAVAILABLE, however grpc reported it."""
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.INTERNAL and details == _CORE_INTERNAL:
        return Unavailable(f"the {stage} stage was lost mid-stream")
    known = _ERRORS.get(code)
    if known is not None:
        return known(details)
    return StageError(code, details, _trailer_retry_after(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None)


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def retry_status(code: grpc.StatusCode, message: str, retry_after: float) -> grpc.Status:
    """A status with google.rpc.RetryInfo, plus `retry-after` (whole seconds) and `retry-after-ms` trailers.

    The trailers are for clients that do not read rich status details.
    """
    delay = duration_pb2.Duration(seconds=int(retry_after), nanos=round((retry_after % 1) * 1e9) % 1_000_000_000)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    trailers = (
        *rich.trailing_metadata,
        ("retry-after", str(max(1, math.ceil(retry_after)))),
        ("retry-after-ms", str(max(0, round(retry_after * 1000)))),
    )
    return _Status(rich.code, rich.details, trailers)


async def _abort(method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
    mapped = status_of(exc)
    if mapped is None:
        log.exception("unexpected_error", method=method, code="INTERNAL")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    else:
        code, message = mapped
        log.info("request_failed", code=code.name, message=message, method=method)
        retry_after = retry_after_of(exc)
        if retry_after is not None:
            await context.abort_with_status(retry_status(code, message, retry_after))
        else:
            await context.abort(code, message)


def retry_after_of(exc: Exception) -> float | None:
    """A shed request's retry hint: ours, or a stage's (its `retry-after-ms` trailer), passed on to the caller."""
    if isinstance(exc, (ResourceExhausted, StageError)):
        return exc.retry_after
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _trailer_retry_after(exc)
    return None


def _trailer_retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            with contextlib.suppress(ValueError):
                return max(0.0, float(value if isinstance(value, str) else value.decode()) / 1000.0)
    return None


def _really_cancelled() -> bool:
    """True when this handler's task was cancelled (client gone, deadline, shutdown)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def _abort_leaked_cancel(method: str, context: grpc.aio.ServicerContext) -> None:
    # A CancelledError that escaped from a cancelled downstream call, not a cancel of this RPC: ending
    # the handler with it would leave the client without a status until its deadline.
    log.error("leaked_cancellation", method=method, code="INTERNAL")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    mapped = status_of(exc)
    return mapped[0].name if mapped else grpc.StatusCode.INTERNAL.name


@contextlib.asynccontextmanager
async def _outcome(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Runs one RPC's body: maps its exception to a status and counts the outcome by code."""
    code = "OK"
    try:
        yield
    except grpc.aio.AbortError:
        code = (context.code() or grpc.StatusCode.UNKNOWN).name
        raise
    except asyncio.CancelledError:
        if _really_cancelled():
            code = "CANCELLED"
            raise
        code = "INTERNAL"
        await _abort_leaked_cancel(method, context)
    except Exception as exc:
        code = _code_of(exc)
        await _abort(method, context, exc)
    finally:
        RPCS.labels(method, code).inc()


# Undecodable requests. grpc.aio answers a request its deserializer cannot parse with UNKNOWN ("Unexpected
# <class 'DecodeError'>"); python protobuf refuses e.g. invalid UTF-8 in a `string` field. The interceptor's
# deserializer returns an `_Undecodable` instead of raising, and the wrapped handler turns it into
# INVALID_ARGUMENT naming the field.


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first string field holding invalid UTF-8 (walking the wire format), if any."""
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.label == FieldDescriptor.LABEL_REPEATED:
                index = seen[number] = seen.get(number, -1) + 1
                name = f"{name}[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8_field(field.message_type, chunk, name + ".")
                if found:
                    return found
        else:
            return None
    return None


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    descriptor: Descriptor | None = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            field = None
            if descriptor is not None:
                try:
                    field = _bad_utf8_field(descriptor, data)
                except (IndexError, ValueError):
                    field = None
            if field is not None:
                return _Undecodable(
                    InvalidArgument(field, f"invalid UTF-8 in a string field (not a valid {type_name})")
                )
            return _Undecodable(InvalidArgument("request", f"not a valid {type_name} (malformed protobuf)"))

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error
        yield request


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], streamed_requests: bool
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _outcome(method, context):
            if isinstance(request, _Undecodable):
                raise request.error
            return await behavior(_checked(request) if streamed_requests else request, context)

    return wrapped


def _wrap_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], streamed_requests: bool
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        gauge = INFLIGHT_STREAMS.labels(method)
        gauge.inc()
        try:
            async with _outcome(method, context):
                if isinstance(request, _Undecodable):
                    raise request.error
                async for item in behavior(_checked(request) if streamed_requests else request, context):
                    yield item
        finally:
            gauge.dec()

    return wrapped


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Applies the error table to every RPC of a server."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(method, handler.unary_unary, False))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(method, handler.unary_stream, False))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(method, handler.stream_stream, True))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(method, handler.stream_unary, True))
        return handler
