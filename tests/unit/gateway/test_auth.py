"""Caller authentication: the key table, the interceptor on a real grpc.aio server, identity, log redaction."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmmesh.common.errors import StatusInterceptor
from llmmesh.common.logging import redact_secrets
from llmmesh.gateway import auth
from llmmesh.gateway.auth import DENIED_MESSAGE, AuthInterceptor, KeyTable, caller_identity, parse_key_entry
from llmmesh.gateway.server import GatewaySettings
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

ALICE_KEY = "sk-alice-3f9a0c71d2"
ANON_KEY = "sk-anon-77e1b0"


def test_parse_key_entry() -> None:
    """`name:key`, a bare key, comments and blank lines; surrounding space dropped."""
    assert parse_key_entry(" alice : sk-1 ") == ("alice", "sk-1")
    assert parse_key_entry("sk-2") == (None, "sk-2")
    assert parse_key_entry("svc:a:b") == ("svc", "a:b")
    assert parse_key_entry("# comment") is None
    assert parse_key_entry("   ") is None
    with pytest.raises(ValueError):
        parse_key_entry("alice:")
    with pytest.raises(ValueError):
        parse_key_entry(":sk-3")


def test_key_table_from_file_and_environment(tmp_path: Path) -> None:
    """Keys from the file and the environment list work together; named keys give their name."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# callers\nalice:{ALICE_KEY}\n\nbob:sk-bob\n")
    table = KeyTable.from_sources(str(keys_file), [ANON_KEY])
    assert len(table) == 3
    assert table.identify(ALICE_KEY) == "alice"
    assert table.identify("sk-bob") == "bob"
    assert table.identify("sk-bo") is None
    assert table.identify("") is None


def test_unnamed_key_identity_is_stable_and_not_the_key() -> None:
    """An unnamed key is known by a short hash: the same every time, and nothing of the key itself."""
    first = KeyTable([ANON_KEY]).identify(ANON_KEY)
    assert first is not None and first == KeyTable([ANON_KEY]).identify(ANON_KEY)
    assert first.startswith("key-") and ANON_KEY not in first and ANON_KEY[3:] not in first


def test_duplicates_are_refused() -> None:
    """The same key twice, or one name for two keys, is a configuration error."""
    with pytest.raises(ValueError, match="twice"):
        KeyTable(["a:k1", "b:k1"])
    with pytest.raises(ValueError, match="twice"):
        KeyTable(["a:k1", "a:k2"])


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """identify() runs compare_digest on equal-length digests against every key, hit or miss: no early exit."""
    table = KeyTable([f"c{i}:key-{i}" for i in range(5)])
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in ("key-0", "key-4", "nope", "k"):
        calls.clear()
        table.identify(presented)
        assert calls == [(32, 32)] * 5


def test_authenticate_reads_api_key_and_bearer_headers() -> None:
    """x-api-key and `authorization: Bearer` both work; other schemes and binary values do not."""
    table = KeyTable([f"alice:{ALICE_KEY}"])
    assert table.authenticate([("x-api-key", ALICE_KEY)]) == "alice"
    assert table.authenticate([("authorization", f"Bearer {ALICE_KEY}")]) == "alice"
    assert table.authenticate([("authorization", f"bearer  {ALICE_KEY}")]) == "alice"
    assert table.authenticate([("authorization", f"Basic {ALICE_KEY}")]) is None
    assert table.authenticate([("x-api-key-bin", ALICE_KEY.encode())]) is None
    assert table.authenticate([("x-api-key", "wrong"), ("authorization", f"Bearer {ALICE_KEY}")]) == "alice"
    assert table.authenticate(None) is None


def test_gateway_settings_read_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMMESH_GATEWAY_API_KEYS is a JSON list; the settings' repr never shows a key."""
    monkeypatch.setenv("LLMMESH_GATEWAY_API_KEYS", f'["alice:{ALICE_KEY}", "{ANON_KEY}"]')
    settings = GatewaySettings()
    assert [k.get_secret_value() for k in settings.api_keys] == [f"alice:{ALICE_KEY}", ANON_KEY]
    assert ALICE_KEY not in repr(settings) and ANON_KEY not in repr(settings)


def test_public_client_auth_needs_tls() -> None:
    """Requiring client certificates on a plaintext port is refused at start."""
    with pytest.raises(ValueError, match="public_client_auth"):
        GatewaySettings(public_client_auth=True)


def test_log_redaction_replaces_secret_values() -> None:
    """Credentials and request text are replaced in log events; counts with similar names are kept."""
    event = {
        "event": "x",
        "api_key": ALICE_KEY,
        "Authorization": f"Bearer {ALICE_KEY}",
        "x-api-key": ALICE_KEY,
        "prompt": "my secret question",
        "prompt_tokens": 12,
    }
    out = redact_secrets(None, "info", event)
    assert ALICE_KEY not in repr(out) and "my secret question" not in repr(out)
    assert out["prompt_tokens"] == 12 and out["prompt"] == "[REDACTED]"


class _EchoIdentity(generation_pb2_grpc.GenerationServiceServicer):
    """Answers with the caller's identity, from the handler and from a task the handler starts."""

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        yield generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(text=caller_identity(context)))
        await asyncio.sleep(0)
        yield generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(text=caller_identity(context)))

    async def Converse(
        self, request_iterator: AsyncIterator[generation_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.ConverseResponse]:
        async for _message in request_iterator:
            in_task = await asyncio.create_task(_identity_later(context))
            yield generation_pb2.ConverseResponse(chunk=generation_pb2.Chunk(text=in_task))


async def _identity_later(context: grpc.aio.ServicerContext) -> str:
    await asyncio.sleep(0)
    return caller_identity(context)


async def _serve(interceptors: list[grpc.aio.ServerInterceptor]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[StatusInterceptor(), *interceptors])
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(_EchoIdentity(), server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


@pytest.fixture
async def stub() -> AsyncIterator[tuple[generation_pb2_grpc.GenerationServiceStub, grpc.aio.Channel]]:
    server, port = await _serve([AuthInterceptor(KeyTable([f"alice:{ALICE_KEY}", ANON_KEY]))])
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield generation_pb2_grpc.GenerationServiceStub(ch), ch
    await ch.close()
    await server.stop(0)


async def _generate(stub: generation_pb2_grpc.GenerationServiceStub, metadata: list[tuple[str, str]]) -> list[str]:
    call = stub.Generate(generation_pb2.GenerateRequest(prompt="hi"), metadata=metadata, timeout=5)
    return [r.chunk.text async for r in call]


async def test_no_key_and_wrong_key_get_the_same_unauthenticated(
    stub: tuple[generation_pb2_grpc.GenerationServiceStub, grpc.aio.Channel],
) -> None:
    """No credential, a wrong key, a wrong bearer token: UNAUTHENTICATED with one fixed message, no key echoed."""
    for metadata in ([], [("x-api-key", "sk-alice-3f9a0c71d3")], [("authorization", "Bearer nope")]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _generate(stub[0], metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == DENIED_MESSAGE


async def test_identity_reaches_server_streaming_handlers(
    stub: tuple[generation_pb2_grpc.GenerationServiceStub, grpc.aio.Channel],
) -> None:
    """A server-streaming handler sees the key's name (or the hash identity), on every message."""
    assert await _generate(stub[0], [("x-api-key", ALICE_KEY)]) == ["alice", "alice"]
    anon = KeyTable([ANON_KEY]).identify(ANON_KEY)
    assert await _generate(stub[0], [("authorization", f"Bearer {ANON_KEY}")]) == [anon, anon]


async def test_identity_reaches_bidi_handlers_and_their_tasks(
    stub: tuple[generation_pb2_grpc.GenerationServiceStub, grpc.aio.Channel],
) -> None:
    """A bidirectional handler, and a task it starts, see the caller's identity; concurrent calls do not mix."""

    async def converse(key: str) -> list[str]:
        call = stub[0].Converse(metadata=[("x-api-key", key)], timeout=5)
        out = []
        for _ in range(2):
            await call.write(generation_pb2.ConverseRequest(generate=generation_pb2.GenerateRequest(prompt="hi")))
            out.append((await call.read()).chunk.text)
        await call.done_writing()
        return out

    alice, anon = await asyncio.gather(converse(ALICE_KEY), converse(ANON_KEY))
    assert alice == ["alice", "alice"]
    assert anon == [KeyTable([ANON_KEY]).identify(ANON_KEY)] * 2


async def test_health_stays_open(stub: tuple[generation_pb2_grpc.GenerationServiceStub, grpc.aio.Channel]) -> None:
    """Health checks need no key (probes carry none)."""
    reply = await health_pb2_grpc.HealthStub(stub[1]).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_without_auth_the_identity_is_the_peer_address() -> None:
    """With no interceptor (no keys), caller_identity is the peer's address without its port."""
    server, port = await _serve([])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            texts = await _generate(generation_pb2_grpc.GenerationServiceStub(ch), [])
    finally:
        await server.stop(0)
    assert texts == ["ipv4:127.0.0.1", "ipv4:127.0.0.1"]


def test_interceptor_needs_keys() -> None:
    """Installing the interceptor with no keys is a mistake (no keys = auth off = no interceptor)."""
    with pytest.raises(ValueError):
        AuthInterceptor(KeyTable())
