"""Caller authentication at the gateway: API keys (`x-api-key`) or bearer tokens (`authorization: Bearer`).

Keys come from a file (`LLMMESH_GATEWAY_API_KEYS_FILE`: one key per line, `name:key` gives the caller a
name, `#` starts a comment) and/or the environment (`LLMMESH_GATEWAY_API_KEYS`, a JSON list of the same
`name:key` or `key` strings). A bearer token is checked against the same table. No keys = auth off.

A presented key is hashed and compared with every configured key's hash by `hmac.compare_digest`: equal
lengths, and no early exit, so neither the time taken nor the answer tells how close a guess was. Every
failure (no credential, unknown key, malformed header) is UNAUTHENTICATED with the same fixed message.
Health and reflection (`/grpc.*`) stay open: probes carry no keys.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

from llmmesh.common.logging import get_logger

__all__ = ["DENIED_MESSAGE", "AuthInterceptor", "KeyTable", "caller_identity", "parse_key_entry"]

log = get_logger(__name__)

DENIED_MESSAGE = "missing or invalid credentials"

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmmesh_caller", default=None)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_key_entry(entry: str) -> tuple[str | None, str] | None:
    """`name:key` → (name, key); `key` → (None, key); blank or `#` comment → None. Surrounding space is dropped.

    The name ends at the first ':', so a key that contains ':' needs a name in front of it.
    """
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    name, sep, key = entry.partition(":")
    if not sep:
        return None, entry
    name, key = name.strip(), key.strip()
    if not name or not key:
        raise ValueError("an API key entry 'name:key' needs both a name and a key")
    return name, key


@dataclass(frozen=True)
class _Key:
    identity: str
    digest: bytes


class KeyTable:
    """The configured keys, held as SHA-256 digests with the identity each one stands for."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        keys: list[_Key] = []
        seen: set[bytes] = set()
        names: set[str] = set()
        for entry in entries:
            parsed = parse_key_entry(entry)
            if parsed is None:
                continue
            name, key = parsed
            digest = _digest(key)
            if digest in seen:
                raise ValueError("an API key is listed twice")
            # Unnamed keys are known by a short hash: stable across restarts, and useless to a guesser.
            identity = name or f"key-{hashlib.sha256(b'llmmesh-caller:' + key.encode()).hexdigest()[:12]}"
            if identity in names:
                raise ValueError(f"API key name {identity!r} is used twice")
            seen.add(digest)
            names.add(identity)
            keys.append(_Key(identity, digest))
        self._keys = tuple(keys)

    @classmethod
    def from_sources(cls, keys_file: str = "", env_keys: Sequence[str] = ()) -> KeyTable:
        """Keys from the file (if named) and the environment's list, together."""
        lines = Path(keys_file).read_text(encoding="utf-8").splitlines() if keys_file else []
        return cls([*lines, *env_keys])

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, presented: str) -> str | None:
        """The identity of the key `presented`, or None. Compares against every key; time does not depend on
        which key (if any) matched or on how much of a guess was right."""
        digest = _digest(presented)
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.identity
        return found

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The caller's identity from `x-api-key` or `authorization: Bearer ...`, or None."""
        found: str | None = None
        for name, value in metadata or ():
            if isinstance(value, bytes):
                continue
            if name == "x-api-key":
                presented = value
            elif name == "authorization":
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() != "bearer":
                    continue
                presented = token.strip()
            else:
                continue
            identity = self.identify(presented)
            if identity is not None and found is None:
                found = identity
        return found


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.7:51234` → `ipv4:10.0.0.7`: the port changes with every connection."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-caller decisions (rate limits, quotas) and logs. Never a secret.

    With auth on: the authenticated key's name (`name:key` entries), or `key-` + 12 hex digits of a hash
    of the key for unnamed keys (stable across restarts). Set by `AuthInterceptor` for the handler's task
    (server-streaming and bidirectional handlers included, and tasks they start). With auth off, or outside
    an authenticated handler: the peer's address without its port, e.g. `ipv4:127.0.0.1`.
    """
    identity = _CALLER.get()
    if identity is not None:
        return identity
    return _peer_host(context.peer() or "unknown")


async def _deny_unary(_request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED_MESSAGE)


async def _deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED_MESSAGE)
    yield  # pragma: no cover - abort raises; the yield makes this an async generator, as stream handlers are


def _enter(identity: str) -> None:
    _CALLER.set(identity)
    structlog.contextvars.bind_contextvars(caller=identity)


def _as(identity: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler, running with `identity` as the caller (a context variable of the RPC's task)."""

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _enter(identity)
            return await behavior(request, context)

        return wrapped

    def stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            _enter(identity)
            async for item in behavior(request, context):
                yield item

        return wrapped

    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=stream(handler.unary_stream))
    if handler.stream_stream:
        return handler._replace(stream_stream=stream(handler.stream_stream))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    return handler


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        return handler._replace(unary_unary=_deny_unary)
    if handler.unary_stream:
        return handler._replace(unary_stream=_deny_stream)
    if handler.stream_stream:
        return handler._replace(stream_stream=_deny_stream)
    return handler._replace(stream_unary=_deny_unary)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a known key; `/grpc.*` (health, reflection) always passes."""

    def __init__(self, keys: KeyTable) -> None:
        if not len(keys):
            raise ValueError("AuthInterceptor needs at least one key (no keys = do not install it)")
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler
        identity = self._keys.authenticate(handler_call_details.invocation_metadata)
        if identity is None:
            log.info("unauthenticated", method=method)
            return _denied(handler)
        # Also set here, for interceptors after this one that decide before the handler runs (they share
        # the RPC's task); the handler wrapper sets it again in case a grpc version runs them apart.
        _CALLER.set(identity)
        return _as(identity, handler)
