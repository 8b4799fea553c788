"""Domain errors and the one table that maps them to gRPC status codes.

Domain code raises these (it never imports grpc); `StatusInterceptor` turns them into statuses with a
message that names the problem. Errors from a downstream stage keep their code and message. Only the
unexpected becomes INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from llmmesh.common.logging import get_logger
from llmmesh.common.metrics import INFLIGHT_STREAMS, RPCS

__all__ = [
    "DeadlineExceeded",
    "InvalidArgument",
    "LlmmeshError",
    "ResourceExhausted",
    "StatusInterceptor",
    "Unavailable",
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
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LlmmeshError):
    """A dependency (Triton, a stage) cannot be reached or was lost mid-stream."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LlmmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, LlmmeshError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A stage's status passes through unchanged: its message already names the problem.
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return None


async def _abort(method: str, context: grpc.aio.ServicerContext, exc: Exception) -> None:
    mapped = _status_of(exc)
    if mapped is None:
        log.exception("unexpected_error", method=method, code="INTERNAL")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    else:
        code, message = mapped
        log.info("request_failed", code=code.name, message=message, method=method)
        await context.abort(code, message)


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
    mapped = _status_of(exc)
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


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _outcome(method, context):
            return await behavior(request, context)

    return wrapped


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        gauge = INFLIGHT_STREAMS.labels(method)
        gauge.inc()
        try:
            async with _outcome(method, context):
                async for item in behavior(request, context):
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
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(method, handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(method, handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(method, handler.stream_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(method, handler.stream_unary))
        return handler
