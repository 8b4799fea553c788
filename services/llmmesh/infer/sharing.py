"""One generation for every identical request: in-flight joining, the result cache, idempotent request ids.

Every call to infer's Generate subscribes to a `LiveGeneration`. A driver task reads the tokens from
the backend (Triton) into the generation's list; each subscriber reads that list from its own position,
so a subscriber that joins late first receives everything generated so far, then the live tail, and every
subscriber ends exactly as the generation ends (same tokens, same finish, same error). A subscriber that
lags receives everything new in one message (at most `batch_tokens` ids per message); nobody ever waits
for more tokens to arrive.

Who shares (preprocess decides, see preprocess/dedup.py):
  - shareable requests (greedy, or an explicit seed) with the same sharing key (the request hash within
    its sharing scope: the caller, or the whole mesh) join one live generation of their own priority
    class, and when none is running, replay a cached result of an identical request before generating
    anew; a `fresh` request does neither (it still registers, so others may join it, and is cached);
  - a request that carries an idempotency key (scoped by caller) and resends it within the idempotency
    window attaches to that call's live generation or replays its stored result, sampled or not; the
    same key with a different request hash is refused (INVALID_ARGUMENT).

Cancellation: the Triton request is cancelled only when its last subscriber has gone. A follower leaving
never touches the generation; the leader leaving does not end the followers' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from llmmesh.common import metrics
from llmmesh.common.errors import InvalidArgument, Unavailable
from llmmesh.common.logging import get_logger
from llmmesh.infer.backend import Generation, InferenceBackend, TokenBatch
from llmmesh.infer.result_store import ResultStore, StoredResult

__all__ = ["Reuse", "SharingHub", "SharingPolicy", "Subscription"]

log = get_logger(__name__)

# How a subscription got its tokens (the servicer maps it to llmmesh.v1.Reuse).
Reuse = Literal["none", "not_shareable", "joined_in_flight", "cache_hit", "deduplicated", "disabled"]


@dataclass(frozen=True)
class SharingPolicy:
    # False: every request generates for itself (benchmarks compare with dedup off).
    enabled: bool = True
    # Completed shareable results are replayed for this long.
    cache_ttl_seconds: float = 300.0
    # A client's request id, resent within this window, attaches to or replays its first request.
    idempotency_window_seconds: float = 600.0
    # At most this many token ids in one message to a subscriber (replays are streamed in pieces too).
    batch_tokens: int = 16


@dataclass(eq=False)
class LiveGeneration:
    """One generation and what it has produced so far; subscribers read `tokens` from their own position."""

    keys: tuple[str, ...]
    max_tokens: int
    # What its subscribers report: a generation replayed from the cache reports "cache_hit".
    source: Literal["generated", "cache"] = "generated"
    tokens: list[int] = field(default_factory=list)
    # Each token's log-probability, when the generation's request asked for them (a cache replay has none).
    log_probs: list[float] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length" once complete
    error: BaseException | None = None
    subscribers: int = 0
    store: bool = True  # cleared by `forget` while running: a filtered result is never cached
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def over(self) -> bool:
        return self.finish is not None or self.error is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def extend(self, ids: list[int]) -> None:
        self.tokens.extend(ids)
        log_probs = getattr(ids, "log_probs", None)
        if log_probs is not None and len(self.log_probs) == len(self.tokens) - len(ids):
            self.log_probs.extend(log_probs)
        self._notify()

    def complete(self) -> None:
        self.finish = "length" if len(self.tokens) >= self.max_tokens else "stop"
        self._notify()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._notify()

    async def changed(self) -> None:
        await self._changed.wait()


class Subscription:
    """A subscriber's view: iterate for token id lists; then `finish`, `completion_tokens` and `reuse`."""

    def __init__(self, hub: SharingHub, live: LiveGeneration, reuse: Reuse, batch: int) -> None:
        self._hub = hub
        self._live = live
        self._reuse: Reuse = reuse
        self._batch = batch
        live.subscribers += 1

    @property
    def reuse(self) -> Reuse:
        # The generation it led or joined turned out to be a cache replay (looked up after it was registered).
        if self._live.source == "cache" and self._reuse in ("none", "joined_in_flight"):
            return "cache_hit"
        return self._reuse

    @property
    def finish(self) -> str:
        return self._live.finish or "stop"

    @property
    def completion_tokens(self) -> int:
        return len(self._live.tokens)

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        live = self._live
        pos = 0
        try:
            while True:
                if pos < len(live.tokens):
                    end = min(len(live.tokens), pos + self._batch)
                    chunk = TokenBatch(
                        live.tokens[pos:end], live.log_probs[pos:end] if len(live.log_probs) >= end else None
                    )
                    pos = end
                    yield chunk
                elif live.error is not None:
                    raise live.error
                elif live.finish is not None:
                    return
                else:
                    await live.changed()
        finally:
            self._hub._leave(live)


class SharingHub:
    def __init__(self, backend: InferenceBackend, store: ResultStore | None, policy: SharingPolicy) -> None:
        self._backend = backend
        self._store = store if policy.enabled else None
        self._policy = policy
        self._live: dict[str, LiveGeneration] = {}

    async def subscribe(
        self,
        gen: Generation,
        *,
        request_hash: str,
        shareable: bool,
        idempotency_key: str = "",
        fresh: bool = False,
        timeout: float | None = None,
    ) -> Subscription:
        policy = self._policy
        if not policy.enabled:
            return self._start(gen, (), None, timeout, "disabled")
        rid_key = f"rid:{idempotency_key}" if idempotency_key else None
        # One live generation per priority class: an interactive request never waits on a batch one.
        hash_key = f"hash:{gen.priority or 1}:{request_hash}" if shareable and request_hash else None
        if rid_key is not None and self._store is not None:
            earlier = await self._store.claim_idempotency_key(
                idempotency_key, request_hash, policy.idempotency_window_seconds
            )
            if earlier is not None and earlier != request_hash:
                raise InvalidArgument(
                    "idempotency_key",
                    f"this key was used for a different request within the last "
                    f"{policy.idempotency_window_seconds:g} s; use a new key for a new request",
                )
            if earlier is not None:
                live = self._live.get(rid_key)
                if live is not None:
                    metrics.DEDUP_JOINS.labels("request_id").inc()
                    return Subscription(self, live, "deduplicated", policy.batch_tokens)
                stored = await self._store.get_result(rid_key)
                if stored is not None:
                    metrics.DEDUP_JOINS.labels("request_id").inc()
                    return self._replay(stored, "deduplicated")
                # The first request failed or was cancelled (nothing stored): this one generates.
        if hash_key is not None and not fresh:
            live = self._live.get(hash_key)
            if live is not None:
                metrics.DEDUP_JOINS.labels("in_flight").inc()
                if rid_key is not None:
                    self._alias(live, rid_key)
                return Subscription(self, live, "joined_in_flight", policy.batch_tokens)
        keys = tuple(k for k in (hash_key, rid_key) if k is not None)
        return self._start(
            gen,
            keys,
            request_hash if hash_key else None,
            timeout,
            "none" if shareable else "not_shareable",
            lookup=not fresh,
        )

    def _start(
        self,
        gen: Generation,
        keys: tuple[str, ...],
        cache_key: str | None,
        timeout: float | None,
        reuse: Reuse,
        lookup: bool = True,
    ) -> Subscription:
        live = LiveGeneration(keys=keys, max_tokens=gen.max_tokens)
        for key in keys:
            self._live[key] = live
        # A generation others may join outlives its first caller's deadline; it ends when all have gone.
        live.task = asyncio.create_task(self._drive(live, gen, cache_key, None if keys else timeout, lookup))
        return Subscription(self, live, reuse, self._policy.batch_tokens)

    def _replay(self, stored: StoredResult, reuse: Reuse) -> Subscription:
        live = LiveGeneration(keys=(), max_tokens=len(stored.token_ids), source="cache")
        live.tokens = stored.token_ids
        live.finish = stored.finish
        return Subscription(self, live, reuse, self._policy.batch_tokens)

    def _alias(self, live: LiveGeneration, key: str) -> None:
        if key not in self._live:
            live.keys = (*live.keys, key)
            self._live[key] = live

    async def _drive(
        self, live: LiveGeneration, gen: Generation, cache_key: str | None, timeout: float | None, lookup: bool
    ) -> None:
        try:
            if lookup and cache_key is not None and self._store is not None:
                stored = await self._store.get_result(cache_key)
                metrics.CACHE_LOOKUPS.labels("hit" if stored is not None else "miss").inc()
                if stored is not None:
                    live.source = "cache"
                    live.tokens.extend(stored.token_ids)
                    live.finish = stored.finish
                    live._notify()
                    return
            async for ids in self._backend.generate(gen, timeout=timeout):
                live.extend(ids)
            live.complete()
            if self._store is not None and live.store:
                await self._remember(live, cache_key)
        except asyncio.CancelledError:
            # Only when every subscriber has gone (or at shutdown): nobody is left to read this.
            live.fail(Unavailable("the generation was cancelled"))
            raise
        except Exception as exc:
            live.fail(exc)
        finally:
            self._unregister(live)

    async def _remember(self, live: LiveGeneration, cache_key: str | None) -> None:
        assert self._store is not None and live.finish is not None
        result = StoredResult(list(live.tokens), live.finish)
        if cache_key is not None:
            await self._store.put_result(cache_key, result, self._policy.cache_ttl_seconds)
        for key in live.keys:
            if key.startswith("rid:"):
                await self._store.put_result(key, result, self._policy.idempotency_window_seconds)

    def _leave(self, live: LiveGeneration) -> None:
        live.subscribers -= 1
        if live.subscribers == 0 and not live.over and live.task is not None:
            # The last subscriber has gone: cancel the Triton request, and let nobody join it from now on.
            self._unregister(live)
            live.task.cancel()

    def _unregister(self, live: LiveGeneration) -> None:
        for key in live.keys:
            if self._live.get(key) is live:
                del self._live[key]

    async def forget(self, request_hash: str) -> None:
        """Drops a cached result; a generation of it still running (of any priority) will not be stored."""
        for priority in (1, 2):
            live = self._live.get(f"hash:{priority}:{request_hash}")
            if live is not None:
                live.store = False
        if self._store is not None:
            await self._store.delete_result(request_hash)

    async def close(self) -> None:
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._store is not None:
            await self._store.close()
