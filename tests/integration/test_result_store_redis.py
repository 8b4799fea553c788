"""RedisStore against a real redis-server: results, expiry, request ids, and a Redis that went away."""

from __future__ import annotations

import asyncio
import uuid

from llmmesh.infer.result_store import RedisStore, StoredResult
from llmmesh.launcher import free_port
from tests.conftest import RedisServer


def store(url: str) -> RedisStore:
    # A prefix per test: tests share the session's server and never see each other's keys.
    return RedisStore(url, prefix=f"test-{uuid.uuid4().hex}:")


async def test_results_are_shared_through_redis_and_expire(redis_server: RedisServer) -> None:
    writer, reader = store(redis_server.url), store(redis_server.url)
    reader._prefix = writer._prefix  # two replicas of one mesh: same prefix, separate connections
    result = StoredResult([5, 6, 7], "stop")
    await writer.put_result("h1", result, ttl=0.3)
    assert await reader.get_result("h1") == result
    await asyncio.sleep(0.4)
    assert await reader.get_result("h1") is None
    await writer.put_result("h2", result, ttl=30)
    await reader.delete_result("h2")
    assert await writer.get_result("h2") is None
    await writer.close()
    await reader.close()


async def test_a_request_id_is_claimed_once(redis_server: RedisServer) -> None:
    s = store(redis_server.url)
    assert await s.claim_idempotency_key("client-7", "hash-a", ttl=30) is None
    assert await s.claim_idempotency_key("client-7", "hash-b", ttl=30) == "hash-a"
    assert await s.claim_idempotency_key("client-8", "hash-b", ttl=30) is None
    await s.close()


async def test_entries_over_the_size_bound_are_not_stored(redis_server: RedisServer) -> None:
    s = RedisStore(redis_server.url, prefix=f"test-{uuid.uuid4().hex}:", max_entry_bytes=100)
    await s.put_result("big", StoredResult(list(range(100)), "length"), ttl=30)
    assert await s.get_result("big") is None
    await s.close()


async def test_an_unreachable_redis_is_a_miss_not_a_failure() -> None:
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    assert await s.get_result("h") is None
    await s.put_result("h", StoredResult([1], "stop"), ttl=30)  # logged and dropped
    assert await s.claim_idempotency_key("r", "h", ttl=30) is None
    assert not await s.ping()
    await s.close()
