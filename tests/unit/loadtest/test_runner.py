"""Load shapes against a fake client: warm-up excluded, bounds honoured, concurrency held, failures counted."""

from __future__ import annotations

import asyncio
from time import perf_counter

import pytest

from loadtest.metrics import RequestRecord, summarize
from loadtest.runner import Level, run_level


class FakeClient:
    """Streams `tokens` tokens, one every `gap` seconds; request numbers in `fail` end UNAVAILABLE."""

    name = "fake"

    def __init__(self, tokens: int = 5, gap: float = 0.002, fail: frozenset[int] = frozenset()) -> None:
        self.tokens, self.gap, self.fail = tokens, gap, fail
        self.tokens_received = 0
        self.messages_received = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.indexes: list[int] = []

    async def run(self, index: int, record: RequestRecord) -> None:
        self.indexes.append(index)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if index in self.fail:
                record.error = "UNAVAILABLE"
                return
            for _ in range(self.tokens):
                await asyncio.sleep(self.gap)
                now = perf_counter()
                if record.first_token is None:
                    record.first_token = now
                record.output_tokens += 1
                self.tokens_received += 1
                self.messages_received += 1
            record.end = perf_counter()
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        pass


async def test_closed_loop_count_bounded_measures_exactly_the_requests_after_warmup() -> None:
    """Count-bounded: warm-up requests are sent but not measured; exactly `requests` are measured."""
    client = FakeClient()
    run = await run_level(
        client, Level("closed", concurrency=3, duration=None, requests=12, warmup_requests=4), progress=False
    )
    assert len(client.indexes) == 16
    assert len(run.records) == 12
    assert client.most_in_flight == 3
    assert all(r.ok and r.output_tokens == 5 for r in run.records)
    assert run.duration > 0 and run.window_tokens is None


async def test_closed_loop_duration_bounded_excludes_warmup_and_counts_window_tokens() -> None:
    """Duration-bounded: only requests started after the warm-up are measured, all of them to their end."""
    client = FakeClient(tokens=4, gap=0.005)
    level = Level("closed", concurrency=4, duration=0.3, warmup=0.1)
    started = perf_counter()
    run = await run_level(client, level, progress=False)
    assert all(r.start >= started + 0.1 for r in run.records)
    assert len(run.records) < len(client.indexes)  # the warm-up's requests were left out
    assert all(r.ok for r in run.records)
    assert run.duration >= 0.29  # the event loop may wake a clock tick early
    assert run.window_tokens is not None and 0 < run.window_tokens <= client.tokens_received
    assert run.window_messages == run.window_tokens
    assert client.most_in_flight == 4


async def test_open_loop_sends_at_about_the_rate_and_does_not_wait_for_answers() -> None:
    """Open loop: Poisson arrivals at the rate, overlapping when answers are slower than the gaps."""
    client = FakeClient(tokens=10, gap=0.01)  # each request takes ~0.1 s
    run = await run_level(client, Level("open", rate=200.0, duration=0.5, warmup=0.0, seed=1), progress=False)
    assert 50 <= len(client.indexes) <= 200  # ~100 expected
    assert client.most_in_flight > 5
    assert len(run.records) == len(client.indexes)


async def test_failures_are_counted_by_status_not_measured() -> None:
    """A failed request appears in the error counts and in no latency figure."""
    client = FakeClient(fail=frozenset({1, 3}))
    run = await run_level(client, Level("closed", concurrency=1, duration=None, requests=6), progress=False)
    summary = summarize(run.records, run.duration, run.window_tokens)
    assert summary["errors"] == {"UNAVAILABLE": 2}
    assert summary["completed"] == 4
    ttft = summary["ttft_ms"]
    assert isinstance(ttft, dict) and ttft["count"] == 4


async def test_probe_is_sampled_at_the_window_edges() -> None:
    """The probe (process CPU and memory) is sampled once at each edge of the measurement window."""
    calls: list[float] = []

    def probe() -> float:
        calls.append(perf_counter())
        return calls[-1]

    run = await run_level(
        FakeClient(), Level("closed", concurrency=2, duration=0.2, warmup=0.05), probe, progress=False
    )
    assert len(calls) == 2
    assert run.at_end - run.at_start == pytest.approx(run.duration, abs=0.005)
    assert run.duration == pytest.approx(0.2, abs=0.05)
