"""The sharing hub with a scripted backend (a fake of Triton, for a unit test about its caller)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from llmmesh.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from llmmesh.infer.backend import Generation
from llmmesh.infer.result_store import MemoryStore, StoredResult, decode_result, encode_result
from llmmesh.infer.sharing import SharingHub, SharingPolicy, Subscription

TOKENS = list(range(100, 140))


class ScriptedBackend:
    """Streams TOKENS one at a time, each after `gap` seconds; counts generations and cancels."""

    def __init__(self, gap: float = 0.002, fail_after: int | None = None) -> None:
        self.gap = gap
        self.fail_after = fail_after
        self.started = 0
        self.cancelled = 0
        self.completed = 0

    async def generate(self, gen: Generation, timeout: float | None = None) -> AsyncIterator[list[int]]:
        self.started += 1
        try:
            for i, tok in enumerate(TOKENS[: gen.max_tokens]):
                if self.fail_after is not None and i == self.fail_after:
                    raise Unavailable("triton went away")
                await asyncio.sleep(self.gap)
                yield [tok]
            self.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def gen(request_id: str = "r", max_tokens: int = 40, priority: int = 0) -> Generation:
    return Generation(
        request_id=request_id,
        model="m",
        input_ids=[1, 2, 3],
        max_tokens=max_tokens,
        end_id=2,
        pad_id=2,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        priority=priority,
    )


def hub(backend: ScriptedBackend, enabled: bool = True) -> SharingHub:
    store = MemoryStore(1 << 20, result_ttl=60, request_id_ttl=60)
    return SharingHub(backend, store, SharingPolicy(enabled=enabled, batch_tokens=16))


async def collect(sub: Subscription, stop_after: int | None = None) -> list[int]:
    out: list[int] = []
    async with contextlib.aclosing(sub.__aiter__()) as stream:
        async for ids in stream:
            out.extend(ids)
            if stop_after is not None and len(out) >= stop_after:
                break
    return out


async def subscribe(
    h: SharingHub, g: Generation, key: str = "k", shareable: bool = True, idem: str = "", fresh: bool = False
) -> Subscription:
    return await h.subscribe(g, request_hash=key, shareable=shareable, idempotency_key=idem, fresh=fresh)


async def test_identical_shareable_requests_share_one_generation() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    subs = [await subscribe(h, gen(f"r{i}")) for i in range(20)]
    results = await asyncio.gather(*(collect(s) for s in subs))
    assert backend.started == 1
    assert all(r == TOKENS for r in results)
    assert subs[0].reuse == "none" and all(s.reuse == "joined_in_flight" for s in subs[1:])
    assert {s.finish for s in subs} == {"length"} and subs[5].completion_tokens == len(TOKENS)


async def test_a_late_joiner_gets_everything_generated_so_far_then_the_tail() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    leader = await subscribe(h, gen("a"))
    seen: list[int] = []

    async def lead() -> None:
        async for ids in leader:
            seen.extend(ids)

    task = asyncio.create_task(lead())
    while len(seen) < 10:  # noqa: ASYNC110 - polling the leader's progress is the point here
        await asyncio.sleep(0.001)
    follower = await subscribe(h, gen("b"))
    assert follower.reuse == "joined_in_flight"
    pieces = [ids async for ids in follower]
    await task
    assert [i for p in pieces for i in p] == TOKENS == seen
    assert len(pieces[0]) >= 10  # the replay of what came before it joined arrives at once
    assert backend.started == 1


async def test_a_lagging_reader_gets_what_it_missed_in_pieces_and_a_prompt_one_waits_for_nothing() -> None:
    """Coalescing happens only when the reader lags (at most batch_tokens ids per message), never by waiting."""
    backend = ScriptedBackend()
    h = hub(backend)
    sub = await subscribe(h, gen("slow"))
    pieces: list[list[int]] = []
    async with contextlib.aclosing(sub.__aiter__()) as stream:
        pieces.append(await anext(stream))  # read as soon as it exists: the first id alone
        while not backend.completed:  # noqa: ASYNC110 - this reader is busy while the model goes on
            await asyncio.sleep(0.001)
        pieces += [ids async for ids in stream]
    assert pieces[0] == TOKENS[:1]
    assert [len(p) for p in pieces[1:]] == [16, 16, 7]  # the 39 it missed: full pieces, then the rest
    assert [i for p in pieces for i in p] == TOKENS


async def test_the_leaders_cancel_does_not_end_the_followers() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    leader = await subscribe(h, gen("a"))
    followers = [await subscribe(h, gen(f"f{i}")) for i in range(3)]
    tasks = [asyncio.create_task(collect(f)) for f in followers]
    assert len(await collect(leader, stop_after=5)) >= 5  # the leader goes away mid-stream
    assert [await t for t in tasks] == [TOKENS] * 3
    assert backend.started == 1 and backend.cancelled == 0 and backend.completed == 1


async def test_a_followers_cancel_never_hurts_the_others() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    leader = await subscribe(h, gen("a"))
    quitter = await subscribe(h, gen("q"))
    lead = asyncio.create_task(collect(leader))
    await collect(quitter, stop_after=3)
    assert await lead == TOKENS
    assert backend.cancelled == 0


async def test_the_generation_is_cancelled_when_every_subscriber_has_gone() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    subs = [await subscribe(h, gen(f"r{i}")) for i in range(3)]
    tasks = [asyncio.create_task(collect(s)) for s in subs]
    await asyncio.sleep(0.02)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert backend.cancelled == 1 and backend.completed == 0
    # Nothing partial was cached: the next identical request generates anew.
    again = await subscribe(h, gen("x"))
    assert await collect(again) == TOKENS and again.reuse == "none" and backend.started == 2


@pytest.mark.parametrize(
    ("second_key", "shareable"),
    [("other-hash", True), ("k", False)],
    ids=["different request hash", "sampled without a seed"],
)
async def test_requests_that_may_not_share_generate_separately(second_key: str, shareable: bool) -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    a = await subscribe(h, gen("a"), key="k", shareable=shareable)
    b = await subscribe(h, gen("b"), key=second_key, shareable=shareable)
    await asyncio.gather(collect(a), collect(b))
    assert backend.started == 2
    if not shareable:
        assert a.reuse == b.reuse == "not_shareable"


async def test_a_completed_result_is_replayed_from_the_cache_in_pieces() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    assert await collect(await subscribe(h, gen("a"))) == TOKENS
    hit = await subscribe(h, gen("b"))
    pieces = [ids async for ids in hit]
    assert [i for p in pieces for i in p] == TOKENS and max(map(len, pieces)) <= 16 and len(pieces) > 1
    assert hit.reuse == "cache_hit" and hit.finish == "length" and backend.started == 1


async def test_forget_drops_a_cached_result() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    await collect(await subscribe(h, gen("a")))
    await h.forget("k")
    again = await subscribe(h, gen("b"))
    await collect(again)
    assert again.reuse == "none" and backend.started == 2


async def test_forget_while_running_keeps_the_result_out_of_the_cache() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    first = await subscribe(h, gen("a"))
    task = asyncio.create_task(collect(first))
    await asyncio.sleep(0.01)
    await h.forget("k")
    await task
    again = await subscribe(h, gen("b"))
    await collect(again)
    assert again.reuse == "none" and backend.started == 2


async def test_a_resent_idempotency_key_replays_its_result_even_when_sampled() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    first = await subscribe(h, gen("client-1"), key="h1", shareable=False, idem="alice/job-1")
    assert await collect(first) == TOKENS
    again = await subscribe(h, gen("client-1"), key="h1", shareable=False, idem="alice/job-1")
    assert await collect(again) == TOKENS
    assert again.reuse == "deduplicated" and backend.started == 1


async def test_a_resent_idempotency_key_attaches_to_its_running_generation() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    first = await subscribe(h, gen("client-1"), key="h1", shareable=False, idem="alice/job-1")
    task = asyncio.create_task(collect(first))
    await asyncio.sleep(0.01)
    again = await subscribe(h, gen("client-1"), key="h1", shareable=False, idem="alice/job-1")
    assert await collect(again) == TOKENS and await task == TOKENS
    assert again.reuse == "deduplicated" and backend.started == 1


async def test_an_idempotency_key_reused_for_a_different_request_is_refused() -> None:
    backend = ScriptedBackend()
    h = hub(backend)
    await collect(await subscribe(h, gen("client-1"), key="h1", idem="alice/job-1"))
    with pytest.raises(InvalidArgument) as err:
        await subscribe(h, gen("client-1"), key="h2", idem="alice/job-1")
    assert err.value.field == "idempotency_key" and "different request" in str(err.value)


async def test_a_failure_reaches_every_subscriber_and_nothing_is_cached() -> None:
    backend = ScriptedBackend(fail_after=5)
    h = hub(backend)
    subs = [await subscribe(h, gen(f"r{i}")) for i in range(3)]
    results = await asyncio.gather(*(collect(s) for s in subs), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    backend.fail_after = None
    again = await subscribe(h, gen("x"))
    assert await collect(again) == TOKENS and again.reuse == "none"


async def test_with_dedup_off_every_request_generates() -> None:
    backend = ScriptedBackend()
    h = hub(backend, enabled=False)
    subs = [await subscribe(h, gen(f"r{i}"), idem="alice/job-1") for i in range(3)]
    await asyncio.gather(*(collect(s) for s in subs))
    assert backend.started == 3 and {s.reuse for s in subs} == {"disabled"}


async def test_memory_store_is_bounded_in_bytes() -> None:
    store = MemoryStore(max_bytes=1000, result_ttl=60, request_id_ttl=60)
    big = StoredResult(list(range(200)), "length")  # 802 bytes encoded
    await store.put_result("a", big, 60)
    await store.put_result("b", big, 60)
    assert await store.get_result("a") is None and await store.get_result("b") == big
    await store.put_result("huge", StoredResult(list(range(1000)), "stop"), 60)
    assert await store.get_result("huge") is None


def test_results_round_trip_and_unknown_records_read_as_misses() -> None:
    result = StoredResult([0, -1, 2**31 - 1, 49151], "stop")
    assert decode_result(encode_result(result)) == result
    assert decode_result(b"\x09s" + b"\x00" * 4) is None  # a future format version
    assert decode_result(b"\x01s\x00") is None


async def test_request_ids_alone_never_make_a_call_idempotent() -> None:
    """Two sampled calls with the same request id but no idempotency key each generate."""
    backend = ScriptedBackend()
    h = hub(backend)
    first = await subscribe(h, gen("job-42"), key="h1", shareable=False)
    await collect(first)
    second = await subscribe(h, gen("job-42"), key="h2", shareable=False)
    await collect(second)
    assert backend.started == 2 and {first.reuse, second.reuse} == {"not_shareable"}


async def test_idempotency_keys_of_different_callers_never_meet() -> None:
    """The same key from two callers (the gateway prefixes each caller's identity) is two calls."""
    backend = ScriptedBackend()
    h = hub(backend)
    alice = await subscribe(h, gen("a"), key="h1", shareable=False, idem="alice/job-42")
    await collect(alice)
    bob = await subscribe(h, gen("b"), key="h2", shareable=False, idem="bob/job-42")
    await collect(bob)
    assert backend.started == 2 and bob.reuse == "not_shareable"


async def test_an_interactive_request_never_joins_a_batch_generation() -> None:
    """Identical requests share only within their priority class; each class shares among itself."""
    backend = ScriptedBackend(gap=0.01)
    h = hub(backend)
    batch = await subscribe(h, gen("b", priority=2))
    batch_task = asyncio.create_task(collect(batch))
    await asyncio.sleep(0.03)
    interactive = await subscribe(h, gen("i", priority=1))
    unspecified = await subscribe(h, gen("u", priority=0))  # unspecified is interactive
    more_batch = await subscribe(h, gen("b2", priority=2))
    results = await asyncio.gather(collect(interactive), collect(unspecified), collect(more_batch), batch_task)
    assert all(r == TOKENS for r in results)
    assert backend.started == 2
    assert (interactive.reuse, unspecified.reuse, more_batch.reuse) == ("none", "joined_in_flight", "joined_in_flight")


async def test_a_fresh_request_generates_anew_and_others_may_join_it() -> None:
    """`fresh` skips the cache and any running generation; its own generation is shared and cached."""
    backend = ScriptedBackend(gap=0.01)
    h = hub(backend)
    await collect(await subscribe(h, gen("a")))
    cached = await subscribe(h, gen("b"))
    await collect(cached)
    assert cached.reuse == "cache_hit" and backend.started == 1
    fresh = await subscribe(h, gen("c"), fresh=True)
    fresh_task = asyncio.create_task(collect(fresh))
    await asyncio.sleep(0.03)
    joiner = await subscribe(h, gen("d"))
    assert await collect(joiner) == TOKENS and await fresh_task == TOKENS
    assert fresh.reuse == "none" and joiner.reuse == "joined_in_flight" and backend.started == 2


async def test_a_full_idempotency_table_refuses_new_keys_instead_of_evicting_live_claims() -> None:
    """Evicting a claim would let a resend generate twice: a full table answers RESOURCE_EXHAUSTED."""
    store = MemoryStore(1 << 20, result_ttl=60, request_id_ttl=60, max_request_ids=2)
    assert await store.claim_idempotency_key("a/1", "h1", 60) is None
    assert await store.claim_idempotency_key("a/2", "h2", 60) is None
    with pytest.raises(ResourceExhausted):
        await store.claim_idempotency_key("a/3", "h3", 60)
    assert await store.claim_idempotency_key("a/1", "h1", 60) == "h1"
