"""The asyncio client: the same calls as `llmmesh.client.sync`, awaitable, on `grpc.aio`.

async with AsyncClient("127.0.0.1:50051") as client:
    async with client.generate("Tell me about Paris.", chunking=Chunking.CLAUSE) as gen:
        async for chunk in gen:
            speak(chunk.text)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Unpack

import grpc
import grpc.aio

from llmmesh.client._common import INTERRUPT, GenerationState, deadline_error, incomplete, retry_delay
from llmmesh.client.errors import MeshError, error_from_rpc
from llmmesh.client.options import ClientConfig, Credentials, Metadata, TlsConfig
from llmmesh.client.request import RequestParams, build_request, with_request_id
from llmmesh.client.results import Chunk, FinalResult, Interrupted, Result
from llmmesh.client.retry import Deadline, RetryPolicy
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["AsyncClient", "AsyncGeneration", "AsyncVoiceSession"]

Prompt = str | list[tuple[str, str]] | generation_pb2.GenerateRequest


class AsyncGeneration(GenerationState):
    """One `Generate` call as an async iterator of chunks; `final` is set once the stream completed."""

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            response = await (self._first() if self._call is None else self._call.read())
        except grpc.RpcError as exc:
            self._done = True
            raise error_from_rpc(exc) from None
        except MeshError:
            self._done = True
            raise
        if response is grpc.aio.EOF:
            self._done = True
            if self.final is None:
                raise incomplete()
            raise StopAsyncIteration
        chunk = self._accept(response)
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _first(self) -> Any:
        while True:
            if self._deadline.expired():
                raise deadline_error()
            self.attempts += 1
            call = self._stub.Generate(self.request, timeout=self._deadline.remaining(), metadata=self._metadata)
            try:
                first = await call.read()
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = retry_delay(self._config.retry, self.attempts, error, self._deadline, chunks_seen=False)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
                continue
            self._call = call
            return first

    async def result(self) -> Result:
        """Reads the rest of the stream; the whole answer."""
        chunks = tuple([chunk async for chunk in self])
        assert self.final is not None
        return Result("".join(c.text for c in chunks), chunks, self.final)

    async def __aenter__(self) -> AsyncGeneration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


_END = object()


class AsyncVoiceSession:
    """One `Converse` turn: `await interim()` as the user speaks (optional), `await send()`, `async for` the
    chunks, `await interrupt()` from any task.

    A reader task owns the call's reads; chunks reach the iterator through a queue, so another task can
    interrupt while one is iterating.
    """

    def __init__(self, stub: Any, config: ClientConfig, timeout: float | None, metadata: Metadata | None) -> None:
        self.request: generation_pb2.GenerateRequest | None = None
        self.final: FinalResult | None = None
        self.interrupted: Interrupted | None = None
        self.error: MeshError | None = None
        self.attempts = 0
        self._stub = stub
        self._config = config
        self._deadline = Deadline(timeout)
        self._metadata = config.call_metadata(metadata)
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._received: list[str] = []
        # Writes to the call are serialized, and the interrupt never goes out before the request.
        self._write_lock = asyncio.Lock()
        self._generate_written = False
        self._interrupt_requested = False
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._call: Any = None
        # The call that interim() opened, for the request's first attempt.
        self._opened: Any = None
        self._task: asyncio.Task[None] | None = None

    async def interim(self, prompt: Prompt, **params: Unpack[RequestParams]) -> None:
        """Before `send()`, while the user still speaks: the transcript so far, with the request's parameters.
        The mesh prepares it and has the model prefill it, so the request that then extends it only computes
        its last words; nothing is generated for it. Call again as the transcript grows (a changed one cancels
        the last warm-up). Best effort: a warm-up never fails the turn, except for invalid input, which the
        request's first attempt then reports (INVALID_ARGUMENT naming `interim.<field>`)."""
        if self._task is not None:
            raise RuntimeError("interim() goes before send()")
        message = generation_pb2.ConverseRequest(interim=build_request(prompt, **params))
        async with self._write_lock:
            if self._opened is None:
                self._opened = self._stub.Converse(timeout=self._deadline.remaining(), metadata=self._metadata)
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                await self._opened.write(message)

    async def send(self, prompt: Prompt, **params: Unpack[RequestParams]) -> str:
        """Starts the turn; returns its request id. Converse takes one request per stream."""
        if self._task is not None:
            raise RuntimeError("send() was already called: one request per voice session")
        self.request = with_request_id(build_request(prompt, **params))
        self._task = asyncio.create_task(self._run(), name=f"converse-{self.request.request_id[:8]}")
        return self.request.request_id

    def __aiter__(self) -> AsyncVoiceSession:
        return self

    async def __anext__(self) -> Chunk:
        if self._task is None:
            raise RuntimeError("send() first")
        item = await self._events.get()
        if item is _END:
            self._events.put_nowait(_END)
            raise StopAsyncIteration
        if isinstance(item, MeshError):
            raise item
        assert isinstance(item, Chunk)
        return item

    async def interrupt(self) -> Interrupted:
        """Barges in: the mesh stops generating and acknowledges the text it delivered before stopping."""
        if self._task is None:
            raise RuntimeError("send() first")
        if not self._interrupt_requested and not self._ended.is_set():
            self._interrupt_requested = True
            self._wake.set()
            async with self._write_lock:
                if self._generate_written and self._call is not None:
                    # The call may have ended meanwhile (final sent): then there is nothing to stop.
                    with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                        await self._call.write(INTERRUPT)
        await self._ended.wait()
        if self.interrupted is not None:
            return self.interrupted
        if self.final is not None:
            # The answer completed before the interrupt reached the mesh: everything was delivered.
            return Interrupted("".join(self._received), len(self._received), self.final.request_id, acknowledged=False)
        assert self.error is not None
        raise self.error

    async def _run(self) -> None:
        try:
            await self._attempts()
        except MeshError as exc:
            self.error = exc
            self._events.put_nowait(exc)
        finally:
            self._ended.set()
            self._events.put_nowait(_END)

    async def _attempts(self) -> None:
        assert self.request is not None
        generate = generation_pb2.ConverseRequest(generate=self.request)
        while True:
            if self._interrupt_requested:
                # Interrupted between attempts: nothing was generated for us.
                self.interrupted = Interrupted("", 0, self.request.request_id, acknowledged=False)
                return
            if self._deadline.expired():
                raise deadline_error()
            self.attempts += 1
            chunks_seen = False
            call, self._opened = self._opened, None
            if call is None:
                call = self._stub.Converse(timeout=self._deadline.remaining(), metadata=self._metadata)
            self._call = call
            try:
                async with self._write_lock:
                    await call.write(generate)
                    self._generate_written = True
                    if self._interrupt_requested:
                        await call.write(INTERRUPT)
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise incomplete()
                    kind = response.WhichOneof("kind")
                    if kind == "chunk":
                        chunks_seen = True
                        chunk = Chunk.from_proto(response.chunk)
                        self._received.append(chunk.text)
                        self._events.put_nowait(chunk)
                    elif kind == "final":
                        self.final = FinalResult.from_proto(response.final)
                        return
                    elif kind == "interrupted":
                        self.interrupted = Interrupted.from_proto(response.interrupted)
                        return
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = retry_delay(
                    self._config.retry, self.attempts, error, self._deadline, chunks_seen or self._interrupt_requested
                )
                if delay is None:
                    raise error from None
                self._generate_written = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            finally:
                if not call.done():
                    with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                        await call.done_writing()

    async def close(self) -> None:
        """Cancels the call if it is still running and waits for the reader task."""
        if self._opened is not None:
            self._opened.cancel()  # interim turns and no request: the warm-up is cancelled
            self._opened = None
        if self._call is not None and not self._ended.is_set():
            self._call.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> AsyncVoiceSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient:
    """An asyncio channel to the mesh's public API; the channel opens on first use, inside the event loop."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        tls: TlsConfig | None = None,
        credentials: Credentials | None = None,
        metadata: Metadata = (),
        timeout: float | None = 120.0,
        retry: RetryPolicy | None = None,
        channel_options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.config = ClientConfig(
            address, tls, credentials, metadata, timeout, retry or RetryPolicy(), tuple(channel_options or ())
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: Any = None

    def _stub(self) -> Any:
        if self._stub_instance is None:
            options = self.config.grpc_options()
            tls = self.config.tls
            if tls is None:
                self._channel = grpc.aio.insecure_channel(self.config.address, options=options)
            else:
                self._channel = grpc.aio.secure_channel(self.config.address, tls.channel_credentials(), options=options)
            self._stub_instance = generation_pb2_grpc.GenerationServiceStub(self._channel)
        return self._stub_instance

    def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **params: Unpack[RequestParams],
    ) -> AsyncGeneration:
        """Streams an answer; `timeout` (seconds, all attempts together) defaults to the client's."""
        request = build_request(prompt, **params)
        return AsyncGeneration(self._stub(), request, self.config, self._timeout(timeout), metadata)

    async def complete(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **params: Unpack[RequestParams],
    ) -> Result:
        """The whole answer at once."""
        async with self.generate(prompt, timeout=timeout, metadata=metadata, **params) as generation:
            return await generation.result()

    def converse(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> AsyncVoiceSession:
        """A voice turn with barge-in; `await send()` on it."""
        return AsyncVoiceSession(self._stub(), self.config, self._timeout(timeout), metadata)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.config.timeout if timeout is None else timeout

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub_instance = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
