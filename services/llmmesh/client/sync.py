"""The blocking client: `Client.generate()` iterates typed chunks; `Client.converse()` is a barge-in voice turn.

with Client("127.0.0.1:50051", credentials=Credentials(api_key="...")) as client:
    with client.generate("What is the capital of France?", max_tokens=32) as gen:
        for chunk in gen:
            print(chunk.text, end="")
    print(gen.final)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Unpack

import grpc

from llmmesh.client._common import INTERRUPT, GenerationState, deadline_error, incomplete, retry_delay
from llmmesh.client.errors import MeshError, error_from_rpc
from llmmesh.client.options import ClientConfig, Credentials, Metadata, TlsConfig
from llmmesh.client.request import RequestParams, build_request, with_request_id
from llmmesh.client.results import Chunk, FinalResult, Interrupted, Result
from llmmesh.client.retry import Deadline, RetryPolicy
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["Client", "Generation", "VoiceSession"]

Prompt = str | list[tuple[str, str]] | generation_pb2.GenerateRequest


class Generation(GenerationState, Iterator[Chunk]):
    """One `Generate` call: iterate it for chunks; `final` is set once the stream completed.

    The call starts on the first `next()`. Until a first message arrives, retryable failures are retried
    within the one deadline; after that every failure is raised as a `MeshError`.
    """

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            response = self._first() if self._call is None else next(self._call)
        except StopIteration:
            self._done = True
            if self.final is None:
                raise incomplete() from None
            raise
        except grpc.RpcError as exc:
            self._done = True
            raise error_from_rpc(exc) from None
        except MeshError:
            self._done = True
            raise
        chunk = self._accept(response)
        if chunk is None:
            raise StopIteration
        return chunk

    def _first(self) -> generation_pb2.GenerateResponse:
        while True:
            if self._deadline.expired():
                raise deadline_error()
            self.attempts += 1
            call = self._stub.Generate(self.request, timeout=self._deadline.remaining(), metadata=self._metadata)
            try:
                first: generation_pb2.GenerateResponse = next(call)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = retry_delay(self._config.retry, self.attempts, error, self._deadline, chunks_seen=False)
                if delay is None:
                    raise error from None
                time.sleep(delay)
                continue
            except StopIteration:
                self._call = call
                raise
            self._call = call
            return first

    def result(self) -> Result:
        """Reads the rest of the stream; the whole answer."""
        chunks = tuple(self)
        assert self.final is not None
        return Result("".join(c.text for c in chunks), chunks, self.final)

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


_END = object()


class VoiceSession(Iterator[Chunk]):
    """One `Converse` turn: `interim()` as the user speaks (optional), `send()` a request, iterate chunks,
    `interrupt()` at any moment (any thread).

    A reader thread owns the call; chunks reach the iterator through a queue, so `interrupt()` can be
    called while another thread is iterating. Retries follow `Generation`'s rule, and never once an
    interrupt was asked for.
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
        self._events: queue.Queue[Any] = queue.Queue()
        self._received: list[str] = []
        self._lock = threading.Lock()
        self._outbox: queue.Queue[generation_pb2.ConverseRequest | None] | None = None
        self._interrupt_requested = False
        self._wake = threading.Event()
        self._ended = threading.Event()
        self._call: Any = None
        # The call that interim() opened and its outbox, for the request's first attempt.
        self._opened: tuple[queue.Queue[generation_pb2.ConverseRequest | None], Any] | None = None
        self._thread: threading.Thread | None = None

    def interim(self, prompt: Prompt, **params: Unpack[RequestParams]) -> None:
        """Before `send()`, while the user still speaks: the transcript so far, with the request's parameters.
        The mesh prepares it and has the model prefill it, so the request that then extends it only computes
        its last words; nothing is generated for it. Call again as the transcript grows (a changed one cancels
        the last warm-up). Best effort: a warm-up never fails the turn, except for invalid input, which the
        request's first attempt then reports (INVALID_ARGUMENT naming `interim.<field>`)."""
        if self._thread is not None:
            raise RuntimeError("interim() goes before send()")
        message = generation_pb2.ConverseRequest(interim=build_request(prompt, **params))
        with self._lock:
            if self._opened is None:
                outbox: queue.Queue[generation_pb2.ConverseRequest | None] = queue.Queue()
                call = self._stub.Converse(_drain(outbox), timeout=self._deadline.remaining(), metadata=self._metadata)
                self._opened = (outbox, call)
            self._opened[0].put(message)

    def send(self, prompt: Prompt, **params: Unpack[RequestParams]) -> str:
        """Starts the turn; returns its request id. Converse takes one request per stream."""
        if self._thread is not None:
            raise RuntimeError("send() was already called: one request per voice session")
        self.request = with_request_id(build_request(prompt, **params))
        self._thread = threading.Thread(target=self._run, name=f"converse-{self.request.request_id[:8]}", daemon=True)
        self._thread.start()
        return self.request.request_id

    def __next__(self) -> Chunk:
        if self._thread is None:
            raise RuntimeError("send() first")
        item = self._events.get()
        if item is _END:
            self._events.put(_END)
            raise StopIteration
        if isinstance(item, MeshError):
            raise item
        assert isinstance(item, Chunk)
        return item

    def interrupt(self, timeout: float | None = None) -> Interrupted:
        """Barges in: the mesh stops generating and acknowledges the text it delivered before stopping."""
        if self._thread is None:
            raise RuntimeError("send() first")
        with self._lock:
            if not self._interrupt_requested and not self._ended.is_set():
                self._interrupt_requested = True
                self._wake.set()
                if self._outbox is not None:
                    self._outbox.put(INTERRUPT)
        if not self._ended.wait(timeout):
            raise TimeoutError("no acknowledgement of the interrupt yet")
        if self.interrupted is not None:
            return self.interrupted
        if self.final is not None:
            # The answer completed before the interrupt reached the mesh: everything was delivered.
            return Interrupted("".join(self._received), len(self._received), self.final.request_id, acknowledged=False)
        assert self.error is not None
        raise self.error

    def _run(self) -> None:
        try:
            self._attempts()
        except MeshError as exc:
            self.error = exc
            self._events.put(exc)
        finally:
            self._ended.set()
            self._events.put(_END)

    def _attempts(self) -> None:
        assert self.request is not None
        generate = generation_pb2.ConverseRequest(generate=self.request)
        while True:
            with self._lock:
                opened, self._opened = self._opened, None
            outbox: queue.Queue[generation_pb2.ConverseRequest | None] = opened[0] if opened else queue.Queue()
            with self._lock:
                if self._interrupt_requested:
                    # Interrupted between attempts: nothing was generated for us.
                    self.interrupted = Interrupted("", 0, self.request.request_id, acknowledged=False)
                    return
                outbox.put(generate)
                self._outbox = outbox
            if self._deadline.expired():
                raise deadline_error()
            self.attempts += 1
            chunks_seen = False
            try:
                self._call = (
                    opened[1]
                    if opened
                    else self._stub.Converse(
                        _drain(outbox), timeout=self._deadline.remaining(), metadata=self._metadata
                    )
                )
                for response in self._call:
                    kind = response.WhichOneof("kind")
                    if kind == "chunk":
                        chunks_seen = True
                        chunk = Chunk.from_proto(response.chunk)
                        self._received.append(chunk.text)
                        self._events.put(chunk)
                    elif kind == "final":
                        self.final = FinalResult.from_proto(response.final)
                        return
                    elif kind == "interrupted":
                        self.interrupted = Interrupted.from_proto(response.interrupted)
                        return
                raise incomplete()
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                with self._lock:
                    interrupted = self._interrupt_requested
                delay = retry_delay(
                    self._config.retry, self.attempts, error, self._deadline, chunks_seen or interrupted
                )
                if delay is None:
                    raise error from None
                self._wake.wait(delay)
            finally:
                # Ends the request iterator, so grpc's thread that sends our messages does not wait forever.
                with self._lock:
                    self._outbox = None
                outbox.put(None)

    def close(self) -> None:
        """Cancels the call if it is still running and waits for the reader thread."""
        with self._lock:
            opened, self._opened = self._opened, None
        if opened is not None:
            opened[1].cancel()  # interim turns and no request: the warm-up is cancelled
            opened[0].put(None)
        if self._call is not None and not self._ended.is_set():
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> VoiceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(outbox: queue.Queue[generation_pb2.ConverseRequest | None]) -> Iterator[generation_pb2.ConverseRequest]:
    while (message := outbox.get()) is not None:
        yield message


class Client:
    """A channel to the mesh's public API and the calls on it."""

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
        options = self.config.grpc_options()
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, tls.channel_credentials(), options=options)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **params: Unpack[RequestParams],
    ) -> Generation:
        """Streams an answer; `timeout` (seconds, all attempts together) defaults to the client's."""
        request = build_request(prompt, **params)
        return Generation(self._stub, request, self.config, self._timeout(timeout), metadata)

    def complete(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **params: Unpack[RequestParams],
    ) -> Result:
        """The whole answer at once."""
        with self.generate(prompt, timeout=timeout, metadata=metadata, **params) as generation:
            return generation.result()

    def converse(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> VoiceSession:
        """A voice turn with barge-in; call `send()` on it."""
        return VoiceSession(self._stub, self.config, self._timeout(timeout), metadata)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.config.timeout if timeout is None else timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
