"""Postprocess in the caller's own process: the same servicer behind the same call interface, no gRPC hop.

A deployment that runs the gateway and postprocess on one host may set
`LLMMESH_GATEWAY_POSTPROCESS_URL=inprocess`: the gateway then builds `PostprocessServicer` from the
`LLMMESH_POSTPROCESS_*` settings and calls it through `LocalPostprocessStub`, whose `Process()` returns a
`grpc.aio.StreamStreamCall`. The orchestrator cannot tell the difference, and every stage of a token's text
work (detokenizer, stop strings, safety, chunking) is the same code. What goes away is two gRPC messages
per token and the process they cross (loadtest/README.md, "Postprocess in the gateway process").

Semantics follow grpc.aio's client call: `write` after the call ended raises (AioRpcError with the call's
status, or InvalidStateError), an error raised by the servicer ends the call with the status that the
servers' StatusInterceptor would have sent (INTERNAL for the unexpected, logged), `cancel()` ends it with
CANCELLED and a pending `read` raises CancelledError, and a deadline ends it with DEADLINE_EXCEEDED (a
pending `read` raises it; a servicer busy in the classifier is stopped at its next request).

The servicer runs inside the reader's `read()` (no task of its own): a token costs a queue put and get.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import grpc
import grpc.aio

from llmmesh.common.errors import as_rpc_error, rpc_error
from llmmesh.postprocess.servicer import PostprocessServicer
from llmmesh.stages.v1 import postprocess_pb2

__all__ = ["LocalPostprocessStub", "LocalProcessCall"]

_EOF = object()  # done_writing: the request stream ends
_CANCEL = object()  # cancel() while the servicer waits for a request

_METHOD = "/llmmesh.stages.v1.PostprocessService/Process (in process)"


class LocalProcessCall(grpc.aio.StreamStreamCall):
    def __init__(self, servicer: PostprocessServicer, timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else self._loop.time() + timeout
        # One timer per call (not one per read: that would cost a timer per token).
        self._timer = None if self._deadline is None else self._loop.call_at(self._deadline, self._expire)
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        # The servicer asks its context only for the time that remains (the classifier's deadline): this call knows.
        self._responses = cast(
            AsyncGenerator[postprocess_pb2.ProcessResponse, None],
            servicer.Process(self._incoming(), cast(grpc.aio.ServicerContext, self)),
        )
        self._half_closed = False
        self._reading = False
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._finished = asyncio.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._closer: asyncio.Task[None] | None = None

    async def _incoming(self) -> AsyncIterator[postprocess_pb2.ProcessRequest]:
        while True:
            item = await self._requests.get()
            if item is _EOF:
                return
            if item is _CANCEL:
                raise asyncio.CancelledError
            yield item

    def _expire(self) -> None:
        if self._code is None:
            self._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self._stop_servicer()

    def _stop_servicer(self) -> None:
        if self._reading:
            self._requests.put_nowait(_CANCEL)  # the servicer waits for a request: stop it there
        else:
            # Suspended at a `yield` (or never started): close it, so its span and pipeline end now.
            self._closer = self._loop.create_task(self._responses.aclose())

    def _finish(self, code: grpc.StatusCode, details: str) -> None:
        if self._code is not None:
            return
        self._code, self._details = code, details
        if self._timer is not None:
            self._timer.cancel()
        self._finished.set()
        for callback in self._callbacks:
            self._loop.call_soon(callback, self)
        self._callbacks.clear()

    def _error(self) -> grpc.aio.AioRpcError:
        assert self._code is not None
        return rpc_error(self._code, self._details)

    # -- reading -------------------------------------------------------------------------------------

    async def read(self) -> Any:
        if self._code is not None:
            if self._code == grpc.StatusCode.OK:
                return grpc.aio.EOF
            if self._code == grpc.StatusCode.CANCELLED:
                raise asyncio.CancelledError
            raise self._error()
        self._reading = True
        try:
            return await anext(self._responses)
        except StopAsyncIteration:
            self._finish(grpc.StatusCode.OK, "")
            return grpc.aio.EOF
        except asyncio.CancelledError:
            # cancel() or the deadline from elsewhere, or the reading task itself was cancelled: the call is
            # over either way.
            self._finish(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
            if self._code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._error() from None
            raise
        except Exception as exc:
            error = as_rpc_error(exc, _METHOD)
            self._finish(error.code(), error.details() or "")
            raise error from None
        finally:
            self._reading = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message

    # -- writing -------------------------------------------------------------------------------------

    async def write(self, request: Any) -> None:
        if self._code is not None:
            if self._code != grpc.StatusCode.OK:
                raise self._error()
            raise asyncio.InvalidStateError("RPC already finished.")
        if self._half_closed:
            raise asyncio.InvalidStateError("RPC is half closed after calling done_writing.")
        self._requests.put_nowait(request)

    async def done_writing(self) -> None:
        if self._code is None and not self._half_closed:
            self._half_closed = True
            self._requests.put_nowait(_EOF)

    # -- the call's life -----------------------------------------------------------------------------

    def cancel(self) -> bool:
        if self._code is not None:
            return False
        self._finish(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        self._stop_servicer()
        return True

    def cancelled(self) -> bool:
        return self._code == grpc.StatusCode.CANCELLED

    def done(self) -> bool:
        return self._code is not None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._code is not None:
            self._loop.call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - self._loop.time(), 0.0)

    async def code(self) -> grpc.StatusCode:
        await self._finished.wait()
        assert self._code is not None
        return self._code

    async def details(self) -> str:
        await self._finished.wait()
        return self._details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._finished.wait()
        return grpc.aio.Metadata()

    async def wait_for_connection(self) -> None:
        return None


class LocalPostprocessStub:
    """`PostprocessServiceStub`'s one method, served by a servicer in this process."""

    def __init__(self, servicer: PostprocessServicer) -> None:
        self._servicer = servicer

    def Process(self, timeout: float | None = None, **_: Any) -> LocalProcessCall:
        return LocalProcessCall(self._servicer, timeout)
