"""Many requests on one long-lived gRPC call: how the gateway talks to infer and postprocess.

A per-request call costs a gRPC message per token on every hop, and at load that per-message cost, not
the work, is what fills the CPU. Here the gateway keeps a few bidirectional calls open to each stage
(`MuxClient`); a request is a numbered stream on one of them. Each side has one writer per call that
sends, as one frame, everything queued when it gets to run: what became ready during the event loop's
turn, and whatever queued while the previous frame was being written. No timer, no waiting for more: a
lone token leaves at once, as it would on its own call; at load a frame carries many requests' tokens
(as vLLM's engine core sends every request's new tokens of a step in one message).

Per-request semantics travel inside the call (llmmesh/stages/v1/streams.proto): the first op carries the
request's deadline and trace context; a cancel op cancels the request at the stage (and so at Triton);
each request ends with one end event carrying the status its own RPC would have had. A call that is lost
fails exactly the requests on it, UNAVAILABLE. On the stage (`MuxServer`), each request runs as its own
task and is counted, logged and traced as its own RPC would be (`llmmesh_rpc_requests_total` under the
per-request method's name, a server span of that name); while the stage drains, new requests are refused
UNAVAILABLE (the gateway retries them elsewhere) and each call ends once its requests are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
from opentelemetry import propagate, trace

from llmmesh.common.errors import (
    DeadlineExceeded,
    LlmmeshError,
    StageError,
    Unavailable,
    from_rpc_error,
    retry_after_of,
    status_of,
)
from llmmesh.common.logging import get_logger
from llmmesh.common.metrics import INFLIGHT_STREAMS, RPCS, STREAM_FRAME_ITEMS, STREAM_FRAMES
from llmmesh.common.telemetry import tracing_enabled
from llmmesh.stages.v1 import streams_pb2

__all__ = ["Inbox", "MuxClient", "MuxServer", "MuxStream", "client_trace", "error_of"]

log = get_logger(__name__)

_OK = grpc.StatusCode.OK
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_ERRORS: dict[grpc.StatusCode, type[LlmmeshError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_of(status: streams_pb2.StreamStatus) -> LlmmeshError:
    """A request's error end as the domain error its own call's status would have given (`from_rpc_error`)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    known = _ERRORS.get(code)
    if known is not None:
        return known(status.message)
    return StageError(code, status.message, status.retry_after_s or None)


class Inbox:
    """What arrived for one stream and has not been taken yet; `take` returns all of it at once."""

    __slots__ = ("_ended", "_error", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._ended = False

    def push(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        """No more items; with `error`, the next take after those already here raises it."""
        if not self._ended:
            self._ended = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> bool:
        """Waits for an item; False once ended and empty (raises the error it ended with)."""
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    async def take(self) -> list[Any]:
        """Everything waiting (at least one item); [] once ended."""
        if not await self._wait():
            return []
        items = list(self._items)
        self._items.clear()
        return items

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Any:
        if not await self._wait():
            raise StopAsyncIteration
        return self._items.popleft()


class _Writer:
    """Sends what is queued as frames, one writer per call: all that is queued when it runs goes together.
    `alone(item)` items get a frame of their own (a request's prompt: many in one frame could pass the
    message size limit)."""

    def __init__(
        self, frame: Callable[[list[Any]], Any], alone: Callable[[Any], bool], stage: str, direction: str
    ) -> None:
        self._alone = alone
        frames = STREAM_FRAMES.labels(stage, direction)
        items = STREAM_FRAME_ITEMS.labels(stage, direction)

        def counted(run: list[Any]) -> Any:
            frames.inc()
            items.inc(len(run))
            return frame(run)

        self._frame = counted
        self._queue: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def put(self, item: Any) -> None:
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self.put(None)

    @property
    def idle(self) -> bool:
        return not self._queue

    async def frames(self) -> AsyncIterator[Any]:
        """Frames as they become ready, until closed (what was queued before `close` is still sent)."""
        while True:
            while not self._queue:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            items, self._queue = self._queue, []
            run: list[Any] = []
            for item in items:
                if item is None:
                    if run:
                        yield self._frame(run)
                    return
                if self._alone(item):
                    if run:
                        yield self._frame(run)
                        run = []
                    yield self._frame([item])
                else:
                    run.append(item)
            if run:
                yield self._frame(run)


@contextlib.contextmanager
def client_trace(method: str) -> Iterator[dict[str, str]]:
    """A client span named like the per-request RPC, and its W3C context to send; {} when not tracing."""
    if not tracing_enabled():
        yield {}
        return
    tracer = trace.get_tracer("llmmesh.mux")
    with tracer.start_as_current_span(method, kind=trace.SpanKind.CLIENT) as span:
        span.set_attribute("rpc.system", "grpc")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier


class MuxStream:
    """One request's stream on a call: send ops, take events in batches; `close` cancels it unless ended.

    A stream gets its number when it sends its first op, so a call's streams start in the order of their
    numbers however late each sends (the stage takes an op for a lower number than it has seen for a late
    op of an ended stream)."""

    __slots__ = ("_conn", "_timer", "ended", "id", "inbox")

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        self._conn = conn
        self.id = 0
        self.inbox = Inbox()
        self.ended = False
        self._timer: asyncio.TimerHandle | None = None
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(
                timeout, self.inbox.end, DeadlineExceeded("deadline exceeded")
            )

    def send(self, op: Any) -> None:
        """Puts `op` on the call, numbered as this stream's."""
        conn = self._conn
        if not self.id:
            self.id = next(conn.client.ids)
            conn.unsent.discard(self)
            conn.streams[self.id] = self
        op.stream = self.id
        conn.writer.put(op)

    async def events(self) -> list[Any]:
        """The events that arrived (at least one); raises UNAVAILABLE when the call was lost."""
        events = await self.inbox.take()
        if not events:
            raise Unavailable(f"the {self._conn.client.stage} stage ended the stream")
        return events

    def finish(self) -> None:
        """The stream's end event was read: nothing to cancel."""
        self.ended = True
        self._release()

    def close(self) -> None:
        """Cancels the request at the stage unless it ended or never started (a no-op when called again)."""
        if not self.ended:
            self.ended = True
            if self.id and self._conn.alive:
                self._conn.writer.put(self._conn.client.cancel_op(self.id))
        self._release()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self._conn
        conn.streams.pop(self.id, None)
        conn.unsent.discard(self)
        if conn.retired and not conn.streams and not conn.unsent:
            conn.end()


class _Connection:
    def __init__(self, client: MuxClient) -> None:
        self.client = client
        self.streams: dict[int, MuxStream] = {}
        # Opened, nothing sent yet (no number).
        self.unsent: set[MuxStream] = set()
        self.alive = True
        self.opened = time.monotonic()
        self.died_at = 0.0
        # Takes no new requests; ends once those on it are done.
        self.retired = False
        self.writer = _Writer(client.frame, client.alone, client.stage, "to_stage")
        self.call = client.start(self.writer.frames())
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        error: LlmmeshError = Unavailable(f"the {self.client.stage} stage ended the stream")
        frames = STREAM_FRAMES.labels(self.client.stage, "from_stage")
        items = STREAM_FRAME_ITEMS.labels(self.client.stage, "from_stage")
        try:
            async for frame in self.call:
                frames.inc()
                items.inc(len(frame.events))
                streams = self.streams
                for event in frame.events:
                    stream = streams.get(event.stream)
                    if stream is not None:
                        stream.inbox.push(event)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                error = Unavailable(f"the {self.client.stage} stage's stream was cancelled")
            else:
                error = from_rpc_error(exc, self.client.stage)
        except asyncio.CancelledError:
            error = Unavailable(f"the {self.client.stage} stage's stream was closed")
            raise
        finally:
            self.lost(error)

    def lost(self, error: LlmmeshError) -> None:
        """Fails every stream still open on this call with `error`, and ends the call."""
        if not self.alive:
            return
        self.alive = False
        self.died_at = time.monotonic()
        for stream in [*self.streams.values(), *self.unsent]:
            stream.inbox.end(error)
        self.writer.close()
        self.call.cancel()

    def retire(self) -> None:
        self.retired = True
        if not self.streams and not self.unsent:
            self.end()

    def end(self) -> None:
        """Closes our side: the stage ends the call once it has answered what was sent."""
        if self.alive and not self.writer.closed:
            self.writer.close()

    def close(self) -> None:
        self._reader.cancel()


class MuxClient:
    """`calls` long-lived calls to one stage; a new request goes to the next live one.

    Over a round-robin channel each new call goes to the next replica, so a call takes new requests for
    `max_age` seconds only: then it is retired (it ends once its requests are done) and a new call takes
    its place, and the requests spread over the replicas, new ones included, as calls turn over. A lost
    call is opened again on the next request, at most once a second while other calls live (a replica
    that fails at once is not hammered)."""

    REOPEN_AFTER = 1.0

    def __init__(
        self,
        stage: str,
        start: Callable[[AsyncIterator[Any]], grpc.aio.StreamStreamCall],
        frame: Callable[[list[Any]], Any],
        cancel_op: Callable[[int], Any],
        *,
        calls: int = 2,
        max_age: float = 30.0,
        alone: Callable[[Any], bool] = lambda op: False,
    ) -> None:
        self.stage = stage
        self.max_age = max_age
        self.start = start
        self.frame = frame
        self.cancel_op = cancel_op
        self.alone = alone
        self._slots: list[_Connection | None] = [None] * max(1, calls)
        self._next = 0
        self.ids = itertools.count(1)

    def _pick(self) -> _Connection:
        slots = self._slots
        now = time.monotonic()
        fallback: int | None = None
        for _ in range(len(slots)):
            index = self._next
            self._next = (index + 1) % len(slots)
            conn = slots[index]
            if conn is not None and conn.alive:
                if now - conn.opened < self.max_age:
                    return conn
                conn.retire()
                slots[index] = conn = _Connection(self)
                return conn
            if conn is None or now - conn.died_at >= self.REOPEN_AFTER:
                slots[index] = conn = _Connection(self)
                return conn
            if fallback is None:
                fallback = index
        assert fallback is not None
        slots[fallback] = conn = _Connection(self)
        return conn

    def open(self, timeout: float | None = None) -> MuxStream:
        conn = self._pick()
        stream = MuxStream(conn, timeout)
        conn.unsent.add(stream)
        return stream

    def close(self) -> None:
        for conn in self._slots:
            if conn is not None:
                conn.close()


def _op_kind(op: Any) -> str:
    """Which of its `kind` oneof an op sets: "open", "message", "close", "cancel" ("none" when unset)."""
    return op.WhichOneof("kind") or "none"


def _header_timeout(header: streams_pb2.StreamHeader) -> float | None:
    return header.timeout_s if header.timeout_s > 0 else None


class MuxServer:
    """A stage's side of its stream calls, and a companion of its `Service` (drained with it).

    `serve` runs one call: ops are routed by their `kind` oneof ("open", "message", "close", "cancel"); an open, or
    the first message of a stream, starts `handler(op, inbox, timeout)` as a task whose responses are sent
    back as events (`event(stream, response=..)` / `event(stream, end=..)`); later messages go to its inbox
    (`message(op)`), a close ends the inbox, a cancel cancels the task.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.draining = False
        self._calls: set[Callable[[], None]] = set()

    async def start(self) -> None:
        return None

    async def drain(self, grace: float) -> None:
        self.draining = True
        for wake in list(self._calls):
            wake()

    async def serve(
        self,
        ops: AsyncIterator[Any],
        *,
        method: str,
        message: Callable[[Any], Any],
        handler: Callable[[Any, Inbox, float | None], AsyncGenerator[Any, None]],
        event: Callable[..., Any],
        frame: Callable[[list[Any]], Any],
        kind: Callable[[Any], str] = _op_kind,
    ) -> AsyncIterator[Any]:
        writer = _Writer(frame, lambda item: False, self.stage, "from_stage")
        frames_in = STREAM_FRAMES.labels(self.stage, "to_stage")
        items_in = STREAM_FRAME_ITEMS.labels(self.stage, "to_stage")
        tasks: dict[int, asyncio.Task[str]] = {}
        inboxes: dict[int, Inbox] = {}
        highest = 0
        gauge = INFLIGHT_STREAMS.labels(method)

        def finished() -> None:
            # Ends the call once no request is running on it and none can come: the stage drains, or the
            # gateway closed its side.
            if not tasks and not writer.closed and (self.draining or reading.done()):
                writer.close()

        async def run(stream: int, op: Any, inbox: Inbox) -> str:
            """The request's status code name; its bookkeeping is `ran`'s, which also runs for a task
            cancelled before its first step (none of this code runs then, `finally` included)."""
            header = op.header
            timeout = _header_timeout(header)
            gauge.inc()
            try:
                with self._span(method, header):
                    status = streams_pb2.StreamStatus()
                    try:
                        responses = handler(op, inbox, timeout)
                        # Closed here, in this task, however the request ends (its spans and contexts are this task's).
                        async with asyncio.timeout(timeout), contextlib.aclosing(responses):
                            async for response in responses:
                                writer.put(event(stream=stream, response=response))
                    except Exception as exc:
                        status = self._status(method, exc)
                    writer.put(event(stream=stream, end=status))
                    return _CODES[status.code].name
            finally:
                gauge.dec()

        def ran(stream: int, task: asyncio.Task[str]) -> None:
            if task.cancelled():
                code = "CANCELLED"
            elif task.exception() is not None:
                code = "INTERNAL"
            else:
                code = task.result()
            RPCS.labels(method, code).inc()
            tasks.pop(stream, None)
            inboxes.pop(stream, None)
            finished()

        def start(stream: int, op: Any, inbox: Inbox) -> None:
            if self.draining:
                status = streams_pb2.StreamStatus(
                    code=grpc.StatusCode.UNAVAILABLE.value[0], message=f"the {self.stage} stage is draining"
                )
                RPCS.labels(method, "UNAVAILABLE").inc()
                writer.put(event(stream=stream, end=status))
                return
            inboxes[stream] = inbox
            task = tasks[stream] = asyncio.create_task(run(stream, op, inbox))
            task.add_done_callback(functools.partial(ran, stream))

        async def read() -> None:
            nonlocal highest
            async for frame_in in ops:
                frames_in.inc()
                items_in.inc(len(frame_in.ops))
                for op in frame_in.ops:
                    stream = op.stream
                    what = kind(op)
                    if what == "cancel":
                        task = tasks.get(stream)
                        if task is not None:
                            task.cancel()
                        continue
                    inbox = inboxes.get(stream)
                    if inbox is None:
                        if stream <= highest or what == "close":
                            continue  # a late op for a stream that has ended: nothing to do
                        highest = stream
                        inbox = Inbox()
                        if what == "message":
                            inbox.push(message(op))
                        start(stream, op, inbox)
                    elif what == "close":
                        inbox.end()
                    elif what == "message":
                        inbox.push(message(op))

        def read_ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                # The call cannot go on deaf (later requests on it would wait for their deadlines): its
                # requests are cancelled and the call fails, failing them at the gateway at once.
                log.error("stream_ops_unreadable", method=method, error=repr(task.exception()))
                for request in tasks.values():
                    request.cancel()
                writer.close()
            finished()

        reading = asyncio.create_task(read())
        reading.add_done_callback(read_ended)
        self._calls.add(finished)
        try:
            finished()  # already draining: end at once
            async for out in writer.frames():
                yield out
            if reading.done() and not reading.cancelled() and (failed := reading.exception()) is not None:
                raise failed
        finally:
            self._calls.discard(finished)
            reading.cancel()
            for task in list(tasks.values()):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    @staticmethod
    @contextlib.contextmanager
    def _span(method: str, header: streams_pb2.StreamHeader) -> Iterator[None]:
        if not tracing_enabled():
            yield
            return
        tracer = trace.get_tracer("llmmesh.mux")
        parent = propagate.extract(dict(header.trace_context))
        with tracer.start_as_current_span(method, context=parent, kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("rpc.system", "grpc")
            yield

    @staticmethod
    def _status(method: str, exc: Exception) -> streams_pb2.StreamStatus:
        mapped = status_of(exc)
        if mapped is None:
            log.exception("unexpected_error", method=method, code="INTERNAL")
            return streams_pb2.StreamStatus(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
        code, text = mapped
        log.info("request_failed", code=code.name, message=text, method=method)
        return streams_pb2.StreamStatus(code=code.value[0], message=text, retry_after_s=retry_after_of(exc) or 0.0)
