"""Where completed generations and request ids are remembered: in this process, or in Redis.

Two kinds of records, both with a time to live:
  - results: the token ids of a completed generation and why it ended, under a key (the request hash
    for the result cache, the request id for idempotent replays);
  - idempotency keys: the request hash a caller's idempotency key was first used with (the window).

`MemoryStore` keeps them in this process, bounded in bytes (cachetools' TTL cache evicts the least
recently used entries first when full). `RedisStore` keeps them in a Redis server that every replica
uses, so a result generated behind one gateway is a cache hit behind another. Redis trouble never fails
a request: a lookup that fails is a miss, a write that fails is logged and dropped.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import Protocol

import cachetools
import redis.asyncio as aioredis
import redis.exceptions

from llmmesh.common import metrics
from llmmesh.common.errors import ResourceExhausted
from llmmesh.common.logging import get_logger

__all__ = ["MemoryStore", "RedisStore", "ResultStore", "StoredResult", "decode_result", "encode_result"]

log = get_logger(__name__)

_HEADER = struct.Struct("<BB")  # format version, finish reason ("s"top or "l"ength)
_VERSION = 1


@dataclass(frozen=True)
class StoredResult:
    token_ids: list[int]
    # "stop" (end token or stop words) or "length" (max_tokens reached).
    finish: str


def encode_result(result: StoredResult) -> bytes:
    ids = array("i", result.token_ids)
    if ids.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte ints
        raise RuntimeError("array('i') is not 32-bit here")
    return _HEADER.pack(_VERSION, ord(result.finish[0])) + ids.tobytes()


def decode_result(blob: bytes) -> StoredResult | None:
    """The stored result, or None for a record this version cannot read (treated as a miss)."""
    if len(blob) < _HEADER.size or (len(blob) - _HEADER.size) % 4:
        return None
    version, finish = _HEADER.unpack_from(blob)
    if version != _VERSION or finish not in (ord("s"), ord("l")):
        return None
    ids = array("i")
    ids.frombytes(blob[_HEADER.size :])
    return StoredResult(ids.tolist(), "stop" if finish == ord("s") else "length")


class ResultStore(Protocol):
    async def get_result(self, key: str) -> StoredResult | None: ...

    async def put_result(self, key: str, result: StoredResult, ttl: float) -> None: ...

    async def delete_result(self, key: str) -> None: ...

    async def claim_idempotency_key(self, key: str, request_hash: str, ttl: float) -> str | None:
        """Records `request_hash` for an idempotency key unless one is recorded: returns the earlier hash, or None."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """This process only; results bounded to `max_bytes` in total, request ids to `max_request_ids`."""

    def __init__(self, max_bytes: int, result_ttl: float, request_id_ttl: float, max_request_ids: int = 100_000):
        self._results: cachetools.TTLCache[str, bytes] = cachetools.TTLCache(
            maxsize=max_bytes, ttl=result_ttl, getsizeof=len
        )
        # Idempotent replays live as long as the idempotency window, apart from the result cache.
        self._replays: cachetools.TTLCache[str, bytes] = cachetools.TTLCache(
            maxsize=max_bytes, ttl=request_id_ttl, getsizeof=len
        )
        self._request_ids: cachetools.TTLCache[str, str] = cachetools.TTLCache(
            maxsize=max_request_ids, ttl=request_id_ttl
        )

    def _table(self, key: str) -> cachetools.TTLCache[str, bytes]:
        return self._replays if key.startswith("rid:") else self._results

    async def get_result(self, key: str) -> StoredResult | None:
        blob = self._table(key).get(key)
        return None if blob is None else decode_result(blob)

    async def put_result(self, key: str, result: StoredResult, ttl: float) -> None:
        blob = encode_result(result)
        table = self._table(key)
        if len(blob) > table.maxsize:
            return  # larger than the whole cache: not cached
        table[key] = blob
        metrics.CACHE_BYTES.set(self._results.currsize + self._replays.currsize)

    async def delete_result(self, key: str) -> None:
        self._table(key).pop(key, None)
        metrics.CACHE_BYTES.set(self._results.currsize + self._replays.currsize)

    async def claim_idempotency_key(self, key: str, request_hash: str, ttl: float) -> str | None:
        table = self._request_ids
        earlier = table.get(key)
        if earlier is None:
            table.expire()
            if len(table) >= table.maxsize:
                # Evicting a live claim would let a resend generate twice: refuse the new key instead.
                raise ResourceExhausted("idempotency keys: the table is full; retry later", retry_after=1.0)
            table[key] = request_hash
        return earlier

    async def close(self) -> None:
        return None


class RedisStore:
    """Shared by every replica that names the same Redis; entries expire on Redis' own clock."""

    def __init__(self, url: str, prefix: str = "llmmesh:", max_entry_bytes: int = 1 << 20) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._prefix = prefix
        self._max_entry_bytes = max_entry_bytes

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    async def get_result(self, key: str) -> StoredResult | None:
        try:
            blob = await self._redis.get(self._key("result", key))
        except redis.exceptions.RedisError as exc:
            log.warning("result_store_unavailable", op="get", error=str(exc))
            return None
        return None if blob is None else decode_result(blob if isinstance(blob, bytes) else blob.encode())

    async def put_result(self, key: str, result: StoredResult, ttl: float) -> None:
        blob = encode_result(result)
        if len(blob) > self._max_entry_bytes:
            return
        try:
            await self._redis.set(self._key("result", key), blob, px=max(1, int(ttl * 1000)))
        except redis.exceptions.RedisError as exc:
            log.warning("result_store_unavailable", op="put", error=str(exc))
            return
        metrics.CACHE_BYTES_WRITTEN.inc(len(blob))

    async def delete_result(self, key: str) -> None:
        try:
            await self._redis.delete(self._key("result", key))
        except redis.exceptions.RedisError as exc:
            log.warning("result_store_unavailable", op="delete", error=str(exc))

    async def claim_idempotency_key(self, key: str, request_hash: str, ttl: float) -> str | None:
        key = self._key("idempotency", key)
        try:
            # SET NX GET (Redis >= 7): sets only when absent, and returns what was there.
            earlier = await self._redis.set(key, request_hash, px=max(1, int(ttl * 1000)), nx=True, get=True)
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith("OOM"):
                # Redis is full (noeviction): refuse the key rather than go on without its claim.
                raise ResourceExhausted("idempotency keys: the shared store is full; retry later", 1.0) from exc
            log.warning("result_store_unavailable", op="claim_idempotency_key", error=str(exc))
            return None
        except redis.exceptions.RedisError as exc:
            log.warning("result_store_unavailable", op="claim_idempotency_key", error=str(exc))
            return None
        if earlier is None:
            return None
        return earlier.decode() if isinstance(earlier, bytes) else str(earlier)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except redis.exceptions.RedisError:
            return False

    async def close(self) -> None:
        await self._redis.aclose()
