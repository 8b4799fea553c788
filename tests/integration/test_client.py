"""The client library against real gRPC servers on port 0: a scripted GenerationService stands in for the mesh,
because these tests are about the caller (retries, deadlines, credentials, barge-in), not the mesh."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from llmmesh.client import (
    AsyncClient,
    Chunking,
    Client,
    Credentials,
    DeadlineExceededError,
    FinishReason,
    IncompleteStreamError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RetryPolicy,
    TlsConfig,
    UnavailableError,
)
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
Failure = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]


@dataclass
class Script:
    """What the fake mesh does on each call; the test sets it up, then reads what the fake saw."""

    failures: list[Failure] = field(default_factory=list)  # one per call, before any message
    chunks: list[str] = field(default_factory=lambda: ["The capital", " of France", " is Paris."])
    chunk_interval: float = 0.0
    delay_before_first: float = 0.0
    fail_after_chunks: tuple[grpc.StatusCode, str] | None = None
    send_final: bool = True
    # Converse: keep streaming chunks (up to this many) until an interrupt arrives.
    stream_until_interrupt: int = 0
    calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[generation_pb2.GenerateRequest] = field(default_factory=list)
    interrupts: int = 0
    # Converse: the prompts of the interim turns before the request, in order.
    interims: list[str] = field(default_factory=list)


def _final(request_id: str, n: int) -> generation_pb2.Final:
    return generation_pb2.Final(
        finish_reason=generation_pb2.FINISH_REASON_STOP,
        usage=generation_pb2.Usage(prompt_tokens=7, completion_tokens=n),
        timings=generation_pb2.Timings(
            time_to_first_token_ms=12.5, total_ms=40.0, time_to_first_speakable_chunk_ms=20.0
        ),
        request_id=request_id,
        model="fake",
    )


class FakeMesh(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def _begin(self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext) -> None:
        s = self.script
        s.calls += 1
        s.requests.append(request)
        s.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if s.failures:
            code, details, trailing = s.failures.pop(0)
            context.set_trailing_metadata(trailing)
            context.abort(code, details)
        end = time.monotonic() + s.delay_before_first
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.01)

    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.GenerateResponse]:
        self._begin(request, context)
        s = self.script
        for text in s.chunks:
            yield generation_pb2.GenerateResponse(
                chunk=generation_pb2.Chunk(text=text, token_ids=[1, 2], speakable=True)
            )
            time.sleep(s.chunk_interval)
        if s.fail_after_chunks is not None:
            context.abort(*s.fail_after_chunks)
        if s.send_final:
            yield generation_pb2.GenerateResponse(final=_final(request.request_id, len(s.chunks)))

    def Converse(
        self, request_iterator: Iterator[generation_pb2.ConverseRequest], context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.ConverseResponse]:
        first = next(request_iterator)
        while first.WhichOneof("kind") == "interim":
            self.script.interims.append(first.interim.prompt)
            first = next(request_iterator)
        assert first.WhichOneof("kind") == "generate"
        self._begin(first.generate, context)
        s = self.script
        interrupted = threading.Event()

        def watch() -> None:
            try:
                for message in request_iterator:
                    if message.WhichOneof("kind") == "interrupt":
                        s.interrupts += 1
                        interrupted.set()
                        return
            except grpc.RpcError:
                return  # the call ended (the client went away, or this handler aborted): nothing more to read

        threading.Thread(target=watch, daemon=True).start()
        texts = list(s.chunks)
        if s.stream_until_interrupt:
            texts = [f" word{i}," for i in range(s.stream_until_interrupt)]
        sent: list[str] = []
        for text in texts:
            if interrupted.wait(s.chunk_interval):
                break
            yield generation_pb2.ConverseResponse(chunk=generation_pb2.Chunk(text=text, speakable=True))
            sent.append(text)
        if interrupted.is_set():
            ack = generation_pb2.Interrupted(
                delivered_text="".join(sent), delivered_chunks=len(sent), request_id=first.generate.request_id
            )
            yield generation_pb2.ConverseResponse(interrupted=ack)
            return
        if s.fail_after_chunks is not None:
            context.abort(*s.fail_after_chunks)
        yield generation_pb2.ConverseResponse(final=_final(first.generate.request_id, len(sent)))


@dataclass
class Fake:
    address: str
    script: Script


def _serve(credentials: grpc.ServerCredentials | None = None) -> Iterator[Fake]:
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(FakeMesh(script), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield Fake(f"127.0.0.1:{port}", script)
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake() -> Iterator[Fake]:
    yield from _serve()


def _unavailable() -> Failure:
    return (grpc.StatusCode.UNAVAILABLE, "infer: connection refused", ())


def _retry_info(seconds: float) -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(seconds * 1e9)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="busy")
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_generate_streams_typed_chunks_then_the_final_result(fake: Fake) -> None:
    """A sync generate yields typed chunks in order, then `final` carries reason, usage, timings and the id."""
    with Client(fake.address) as client:
        gen = client.generate(
            "What is the capital of France?", max_tokens=16, temperature=0.0, chunking=Chunking.CLAUSE
        )
        chunks = list(gen)
    assert [c.text for c in chunks] == fake.script.chunks
    assert chunks[0].token_ids == (1, 2) and chunks[0].speakable
    assert gen.final is not None and gen.final.finish_reason is FinishReason.STOP
    assert gen.final.usage.completion_tokens == 3 and gen.final.timings.time_to_first_token_ms == 12.5
    sent = fake.script.requests[0]
    assert sent.sampling.max_tokens == 16 and sent.chunking == generation_pb2.CHUNKING_MODE_CLAUSE
    assert sent.request_id and gen.final.request_id == sent.request_id


async def test_async_generate_streams_typed_chunks_then_the_final_result(fake: Fake) -> None:
    """The asyncio client yields the same chunks and final result."""
    async with AsyncClient(fake.address) as client:
        result = await client.complete("What is the capital of France?")
    assert result.text == "The capital of France is Paris."
    assert len(result.chunks) == 3 and result.final.model == "fake"


def test_unavailable_before_the_first_chunk_is_retried_with_the_same_request_id(fake: Fake) -> None:
    """UNAVAILABLE before anything arrived is retried; both attempts carry one request id."""
    fake.script.failures = [_unavailable()]
    with Client(fake.address, retry=FAST_RETRY) as client:
        result = client.complete("hi")
    assert result.text == "The capital of France is Paris."
    assert fake.script.calls == 2
    assert fake.script.requests[0].request_id == fake.script.requests[1].request_id != ""


async def test_async_unavailable_before_the_first_chunk_is_retried(fake: Fake) -> None:
    """The asyncio client retries UNAVAILABLE before the first chunk too."""
    fake.script.failures = [_unavailable(), _unavailable()]
    async with AsyncClient(fake.address, retry=FAST_RETRY) as client:
        gen = client.generate("hi")
        texts = [chunk.text async for chunk in gen]
    assert "".join(texts) == "The capital of France is Paris." and gen.attempts == 3 == fake.script.calls


def test_retries_stop_after_max_attempts(fake: Fake) -> None:
    """When every attempt is UNAVAILABLE the error surfaces after max_attempts, with its code and details."""
    fake.script.failures = [_unavailable()] * 5
    with Client(fake.address, retry=FAST_RETRY) as client, pytest.raises(UnavailableError) as err:
        client.complete("hi")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.details == "infer: connection refused"
    assert fake.script.calls == 3


def test_a_failure_after_a_chunk_is_not_retried(fake: Fake) -> None:
    """Once a chunk arrived, UNAVAILABLE is raised to the caller after that chunk, and never retried."""
    fake.script.fail_after_chunks = (grpc.StatusCode.UNAVAILABLE, "triton: lost")
    received = []
    with Client(fake.address, retry=FAST_RETRY) as client, pytest.raises(UnavailableError, match="triton: lost"):
        for chunk in client.generate("hi"):
            received.append(chunk.text)
    assert received == fake.script.chunks and fake.script.calls == 1


async def test_async_failure_after_a_chunk_is_not_retried(fake: Fake) -> None:
    """The asyncio client never retries after a chunk either."""
    fake.script.fail_after_chunks = (grpc.StatusCode.UNAVAILABLE, "triton: lost")
    received = []
    async with AsyncClient(fake.address, retry=FAST_RETRY) as client:
        with pytest.raises(UnavailableError):
            async for chunk in client.generate("hi"):
                received.append(chunk.text)
    assert received == fake.script.chunks and fake.script.calls == 1


def test_an_expired_deadline_raises_deadline_exceeded_without_retry(fake: Fake) -> None:
    """A server slower than the deadline ends the call with DeadlineExceededError, in about the deadline."""
    fake.script.delay_before_first = 3.0
    started = time.monotonic()
    with Client(fake.address, retry=FAST_RETRY) as client, pytest.raises(DeadlineExceededError):
        client.complete("hi", timeout=0.3)
    assert time.monotonic() - started < 2.0 and fake.script.calls == 1


async def test_async_expired_deadline_raises_deadline_exceeded(fake: Fake) -> None:
    """The asyncio client maps an expired deadline the same way."""
    fake.script.delay_before_first = 3.0
    async with AsyncClient(fake.address, timeout=0.3) as client:
        with pytest.raises(DeadlineExceededError) as err:
            await client.complete("hi")
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_resource_exhausted_with_retry_info_is_retried_after_the_servers_delay(fake: Fake) -> None:
    """RESOURCE_EXHAUSTED carrying google.rpc.RetryInfo is retried no sooner than the server asked."""
    fake.script.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "gateway: busy", _retry_info(0.3))]
    started = time.monotonic()
    with Client(fake.address, retry=FAST_RETRY) as client:
        client.complete("hi")
    assert fake.script.calls == 2 and time.monotonic() - started >= 0.3


def test_resource_exhausted_without_retry_info_is_not_retried(fake: Fake) -> None:
    """Without retry information RESOURCE_EXHAUSTED may mean "message too large": it is raised at once."""
    fake.script.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large", ())]
    with Client(fake.address, retry=FAST_RETRY) as client, pytest.raises(ResourceExhaustedError) as err:
        client.complete("hi")
    assert fake.script.calls == 1 and err.value.retry_after is None


def test_invalid_argument_keeps_its_details_and_is_not_retried(fake: Fake) -> None:
    """INVALID_ARGUMENT becomes InvalidArgumentError with the mesh's message naming the field."""
    fake.script.failures = [(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1], got 1.5", ())]
    with Client(fake.address, retry=FAST_RETRY) as client, pytest.raises(InvalidArgumentError) as err:
        client.complete("hi", top_p=1.5)
    assert err.value.details.startswith("sampling.top_p") and fake.script.calls == 1


def test_a_stream_without_final_raises_incomplete(fake: Fake) -> None:
    """A stream that ends OK but without its final message is not passed off as a whole answer."""
    fake.script.send_final = False
    with Client(fake.address) as client, pytest.raises(IncompleteStreamError):
        client.complete("hi")


def test_credentials_and_metadata_are_sent_on_every_call(fake: Fake) -> None:
    """API key, bearer token and extra metadata reach the server, on retried attempts as well."""
    fake.script.failures = [_unavailable()]
    creds = Credentials(api_key="k-123", bearer_token="t-456")
    with Client(fake.address, credentials=creds, metadata=[("x-tenant", "acme")], retry=FAST_RETRY) as client:
        client.complete("hi", metadata=[("x-trace-note", "1")])
    assert len(fake.script.metadata) == 2
    for seen in fake.script.metadata:
        assert seen["x-api-key"] == "k-123" and seen["authorization"] == "Bearer t-456"
        assert seen["x-tenant"] == "acme" and seen["x-trace-note"] == "1"
    assert "k-123" not in repr(creds) and "t-456" not in repr(creds)


def test_barge_in_returns_the_acknowledged_delivered_text(fake: Fake) -> None:
    """A sync voice session interrupted from another thread gets the mesh's ack: exactly what it received."""
    fake.script.stream_until_interrupt = 500
    fake.script.chunk_interval = 0.01
    with Client(fake.address) as client, client.converse() as session:
        session.send("Tell me a long story.", chunking=Chunking.CLAUSE)
        received = []
        for chunk in session:
            received.append(chunk.text)
            if len(received) == 3:
                threading.Thread(target=session.interrupt).start()
        ack = session.interrupt()
    assert ack.acknowledged and fake.script.interrupts == 1
    assert ack.delivered_text == "".join(received) and ack.delivered_chunks == len(received) >= 3
    assert len(received) < 500


async def test_async_barge_in_returns_the_acknowledged_delivered_text(fake: Fake) -> None:
    """An asyncio voice session: interrupt() after some chunks returns the acknowledged delivered text."""
    fake.script.stream_until_interrupt = 500
    fake.script.chunk_interval = 0.01
    async with AsyncClient(fake.address) as client, client.converse() as session:
        request_id = await session.send("Tell me a long story.")
        received = []
        async for chunk in session:
            received.append(chunk.text)
            if len(received) == 2:
                ack = await session.interrupt()
    assert ack.acknowledged and ack.request_id == request_id
    assert ack.delivered_text == "".join(received) and 2 <= len(received) < 500


def test_converse_without_interrupt_ends_with_final_and_a_late_interrupt_is_not_acknowledged(fake: Fake) -> None:
    """A completed voice turn has its final result; interrupting it afterwards reports everything delivered."""
    with Client(fake.address) as client, client.converse() as session:
        session.send("hi")
        texts = [c.text for c in session]
        late = session.interrupt()
    assert session.final is not None and session.final.finish_reason is FinishReason.STOP
    assert not late.acknowledged and late.delivered_text == "".join(texts) == "The capital of France is Paris."


def test_interim_turns_go_first_on_the_same_call(fake: Fake) -> None:
    """interim() before send(): the transcripts so far, then the request, on one Converse call."""
    with Client(fake.address) as client, client.converse() as session:
        session.interim("What is the", max_tokens=8)
        session.interim("What is the capital", max_tokens=8)
        session.send("What is the capital of France?", max_tokens=8)
        texts = [c.text for c in session]
        with pytest.raises(RuntimeError):
            session.interim("too late")
    assert fake.script.interims == ["What is the", "What is the capital"]
    assert fake.script.calls == 1 and "".join(texts) == "The capital of France is Paris."
    assert session.final is not None


async def test_async_interim_turns_go_first_on_the_same_call(fake: Fake) -> None:
    async with AsyncClient(fake.address) as client, client.converse() as session:
        await session.interim("Describe")
        await session.send("Describe Paris")
        texts = [c.text async for c in session]
    assert fake.script.interims == ["Describe"] and fake.script.calls == 1
    assert "".join(texts) == "The capital of France is Paris."


async def test_async_converse_retries_before_the_first_chunk(fake: Fake) -> None:
    """A voice turn refused with UNAVAILABLE before any chunk is reopened with the same request."""
    fake.script.failures = [_unavailable()]
    async with AsyncClient(fake.address, retry=FAST_RETRY) as client, client.converse() as session:
        await session.send("hi")
        texts = [c.text async for c in session]
    assert "".join(texts) == "The capital of France is Paris." and session.attempts == 2
    assert session.final is not None


def test_converse_failure_after_a_chunk_is_not_retried(fake: Fake) -> None:
    """A voice turn that fails after a chunk raises to the iterating caller, without a second attempt."""
    fake.script.fail_after_chunks = (grpc.StatusCode.UNAVAILABLE, "postprocess: lost")
    received = []
    with Client(fake.address, retry=FAST_RETRY) as client, client.converse() as session:
        session.send("hi")
        with pytest.raises(UnavailableError):
            for chunk in session:
                received.append(chunk.text)
    assert received == fake.script.chunks and fake.script.calls == 1


def _make_certificate(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "server.key", tmp / "server.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llmmesh-test",
            "-addext", "subjectAltName=DNS:llmmesh.test,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_channel_from_pem_files(tmp_path: Path) -> None:
    """A TLS channel built from a CA file (with a server-name override) streams from a TLS server."""
    key, cert = _make_certificate(tmp_path)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    for fake in _serve(creds):
        tls = TlsConfig.from_files(ca=cert, server_name="llmmesh.test")
        with Client(fake.address, tls=tls) as client:
            assert client.complete("hi").text == "The capital of France is Paris."
        # Without the CA the handshake fails: the error is UNAVAILABLE, as for any unreachable server.
        no_ca = Client(fake.address, tls=TlsConfig(), retry=RetryPolicy(max_attempts=1))
        with no_ca as client, pytest.raises(UnavailableError):
            client.complete("hi", timeout=5)
