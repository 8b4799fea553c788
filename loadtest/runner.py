"""Load shapes: closed loop (fixed concurrency) and open loop (Poisson arrivals), duration- or count-bounded.

Closed loop: `concurrency` workers, each sending its next request as soon as the previous one ends.
Open loop: requests arrive at `rate` per second with exponential gaps (a Poisson process), whether or not
earlier ones have finished; a request's start is its scheduled arrival, so a client that falls behind
shows up as latency instead of being hidden (no coordinated omission).

Warm-up: requests that start during the first `warmup` seconds (or the first `warmup_requests`) are sent
but not measured. Duration-bounded levels measure the window [warm-up end, warm-up end + duration]:
requests that start in it are measured to their end (in-flight ones are awaited, not cut), and output
token throughput is the tokens received during the window over its length (the steady state).
Count-bounded levels measure `requests` requests after the warm-up ones; their throughput is their
tokens over the span from the first measured start to the last measured end.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from .clients import Client
from .metrics import RequestRecord

__all__ = ["Level", "LevelRun", "run_level"]


@dataclass(frozen=True)
class Level:
    mode: str  # "closed" or "open"
    concurrency: int = 1  # closed loop: requests in flight
    rate: float = 0.0  # open loop: arrivals per second
    duration: float | None = 20.0  # measured seconds (None: count-bounded)
    warmup: float = 3.0  # seconds not measured (duration-bounded)
    requests: int | None = None  # measured requests (count-bounded)
    warmup_requests: int = 0  # requests not measured (count-bounded)
    seed: int = 0  # open loop: the arrival process's random seed
    max_in_flight: int = 4096  # open loop: a safety cap on outstanding requests

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"


@dataclass
class LevelRun:
    records: list[RequestRecord]
    duration: float
    window_tokens: int | None
    # Whatever the caller sampled at the window's start and end (process CPU and memory).
    at_start: Any = None
    at_end: Any = None
    started_at: float = 0.0
    # Stream messages that carried tokens during the window (tokens / messages = how much was coalesced).
    window_messages: int | None = None


class _Progress:
    """A tqdm bar over seconds (duration-bounded) or requests (count-bounded); silent when disabled."""

    def __init__(self, enabled: bool, total: float, desc: str, unit: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def set(self, value: float, **postfix: object) -> None:
        if self._bar is not None:
            self._bar.n = round(min(value, self._bar.total), 1)
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_level(
    client: Client,
    level: Level,
    probe: Callable[[], Any] = lambda: None,
    progress: bool = True,
    desc: str = "",
) -> LevelRun:
    """Runs one load level against `client`; `probe()` is sampled at the measurement window's edges."""
    if level.duration is None:
        return await _count_bounded(client, level, probe, progress, desc)
    return await _duration_bounded(client, level, probe, progress, desc)


async def _duration_bounded(
    client: Client, level: Level, probe: Callable[[], Any], progress: bool, desc: str
) -> LevelRun:
    assert level.duration is not None
    t0 = perf_counter()
    window_start, window_end = t0 + level.warmup, t0 + level.warmup + level.duration
    measured: list[RequestRecord] = []
    edges: dict[str, Any] = {}
    bar = _Progress(progress, round(level.warmup + level.duration, 1), desc, "s")

    async def one(index: int, start: float) -> None:
        record = RequestRecord(start=start)
        await client.run(index, record)
        if start >= window_start:
            measured.append(record)

    async def closed_worker(first: int) -> None:
        for index in itertools.count(first, level.concurrency):
            now = perf_counter()
            if now >= window_end:
                return
            await one(index, now)

    async def open_arrivals() -> None:
        rng = random.Random(level.seed)
        tasks: set[asyncio.Task[None]] = set()
        at = t0
        for index in itertools.count():
            at += rng.expovariate(level.rate)
            if at >= window_end:
                break
            delay = at - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while len(tasks) >= level.max_in_flight:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(one(index, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def window() -> None:
        await asyncio.sleep(max(0.0, window_start - perf_counter()))
        edges["start"], edges["tokens0"], edges["probe0"] = perf_counter(), client.tokens_received, probe()
        edges["messages0"] = client.messages_received
        while (left := window_end - perf_counter()) > 0:
            await asyncio.sleep(min(left, 0.25))
            now = perf_counter()
            elapsed = now - edges["start"]
            rate = (client.tokens_received - edges["tokens0"]) / elapsed if elapsed > 0 else 0.0
            bar.set(now - t0, measured=len(measured), tok_s=f"{rate:.0f}")
        edges["end"], edges["tokens1"], edges["probe1"] = perf_counter(), client.tokens_received, probe()
        edges["messages1"] = client.messages_received

    async def ticker_during_warmup() -> None:
        while perf_counter() < window_start:
            bar.set(perf_counter() - t0, phase="warm-up")
            await asyncio.sleep(0.25)

    load = [closed_worker(i) for i in range(level.concurrency)] if level.mode == "closed" else [open_arrivals()]
    try:
        await asyncio.gather(window(), ticker_during_warmup(), *load)
    finally:
        bar.close()
    return LevelRun(
        records=measured,
        duration=edges["end"] - edges["start"],
        window_tokens=edges["tokens1"] - edges["tokens0"],
        at_start=edges["probe0"],
        at_end=edges["probe1"],
        started_at=t0,
        window_messages=edges["messages1"] - edges["messages0"],
    )


async def _count_bounded(client: Client, level: Level, probe: Callable[[], Any], progress: bool, desc: str) -> LevelRun:
    assert level.requests is not None
    total = level.warmup_requests + level.requests
    measured: list[RequestRecord] = []
    bar = _Progress(progress, level.requests, desc, "req")
    edges: dict[str, Any] = {}
    issued = itertools.count()

    async def one(index: int, start: float) -> None:
        if index == level.warmup_requests:
            edges["probe0"] = probe()
        record = RequestRecord(start=start)
        await client.run(index, record)
        if index >= level.warmup_requests:
            measured.append(record)
            bar.set(len(measured), errors=sum(1 for r in measured if not r.ok))

    async def closed_worker() -> None:
        while (index := next(issued)) < total:
            await one(index, perf_counter())

    async def open_arrivals() -> None:
        rng = random.Random(level.seed)
        at = perf_counter()
        tasks = []
        for index in range(total):
            at += rng.expovariate(level.rate)
            delay = at - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, at)))
        await asyncio.gather(*tasks)

    t0 = perf_counter()
    try:
        if level.mode == "closed":
            await asyncio.gather(*(closed_worker() for _ in range(level.concurrency)))
        else:
            await open_arrivals()
    finally:
        bar.close()
    edges["probe1"] = probe()
    done = [r for r in measured if r.end is not None]
    span = (max(r.end for r in done if r.end) - min(r.start for r in measured)) if done else 0.0
    return LevelRun(
        records=measured,
        duration=span,
        window_tokens=None,
        at_start=edges.get("probe0"),
        at_end=edges["probe1"],
        started_at=t0,
    )
