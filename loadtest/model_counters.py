"""A model's own counters on Triton's metrics endpoint, polled while something happens: when each cancel
was first seen, and whether the engine stopped generating. Used by the voice benchmark's barge-in part
(`loadtest/voice_bench.py`); the counters are the ones triton_models/smollm2/1/model.py (and the
instrument) export.
"""

from __future__ import annotations

import bisect
import http.client
import itertools
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "BargeInOutcome",
    "CounterPoller",
    "ModelCounters",
    "analyse_barge_ins",
    "increment_times",
    "pair_by_order",
    "parse_model_counters",
]

POLL_INTERVAL = 0.005
_REQUESTS, _TOKENS = "llmmesh_model_requests_total", "llmmesh_model_generated_tokens_total"


@dataclass(frozen=True, slots=True)
class ModelCounters:
    """One model's counters on Triton's metrics endpoint (see triton_models/smollm2/1/model.py)."""

    cancelled: float = 0.0
    completed: float = 0.0
    tokens: float = 0.0


def parse_model_counters(text: str, model: str) -> ModelCounters:
    """The model's request outcomes and generated tokens from a Prometheus text exposition."""
    # Only the model's own sample lines are parsed: the page holds every Triton metric and is read every 5 ms.
    lines = "".join(line + "\n" for line in text.splitlines() if line.startswith("llmmesh_model_"))
    values = {"cancelled": 0.0, "completed": 0.0, "tokens": 0.0}
    for family in text_string_to_metric_families(lines):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == _TOKENS:
                values["tokens"] += sample.value
            elif sample.name == _REQUESTS and sample.labels.get("outcome") in ("cancelled", "completed"):
                values[sample.labels["outcome"]] += sample.value
    return ModelCounters(**values)


def increment_times(samples: Sequence[tuple[float, float]]) -> list[float]:
    """When each unit increment of a counter was first seen, from (time, value) samples in time order, the
    first being the baseline; a jump by n is n increments at that sample's time."""
    out: list[float] = []
    for (_, before), (at, after) in itertools.pairwise(samples):
        out += [at] * max(0, round(after - before))
    return out


def pair_by_order(interrupts: Sequence[float], stops: Sequence[float]) -> list[tuple[float, float]]:
    """(interrupt, stop) pairs: the k-th stop with the k-th interrupt, both in time order. A stop seen before
    the next unpaired interrupt cannot be its consequence and is skipped; interrupts left over saw no stop."""
    pending = sorted(interrupts)
    pairs: list[tuple[float, float]] = []
    for stop in sorted(stops):
        if len(pairs) < len(pending) and pending[len(pairs)] <= stop:
            pairs.append((pending[len(pairs)], stop))
    return pairs


def _value_at(samples: Sequence[tuple[float, float]], at: float) -> float:
    """The counter's last sampled value at or before `at` (the baseline before the first sample)."""
    k = bisect.bisect_right([t for t, _ in samples], at)
    return samples[max(k, 1) - 1][1]


@dataclass(frozen=True)
class BargeInOutcome:
    # Seconds from each paired interrupt to its engine stop.
    stop_latencies: list[float]
    # Tokens the model generated (model-wide) between each paired interrupt and its stop.
    tokens_until_stop: list[float]
    # Tokens generated after the last paired stop (0: the engine stopped); None when nothing was paired.
    tokens_after_last_stop: float | None
    # Generations that completed instead of being cancelled.
    completed: int


def analyse_barge_ins(interrupts: Sequence[float], samples: Sequence[tuple[float, ModelCounters]]) -> BargeInOutcome:
    """One batch's barge-ins against the model's counters as polled (changes only, the first = baseline)."""
    if not samples:
        return BargeInOutcome([], [], None, 0)
    stops = increment_times([(t, c.cancelled) for t, c in samples])
    pairs = pair_by_order(interrupts, stops)
    tokens = [(t, c.tokens) for t, c in samples]
    last = max((stop for _, stop in pairs), default=None)
    return BargeInOutcome(
        stop_latencies=[stop - interrupt for interrupt, stop in pairs],
        tokens_until_stop=[_value_at(tokens, stop) - _value_at(tokens, interrupt) for interrupt, stop in pairs],
        tokens_after_last_stop=None if last is None else tokens[-1][1] - _value_at(tokens, last),
        completed=round(samples[-1][1].completed - samples[0][1].completed),
    )


class CounterPoller:
    """Polls Triton's metrics endpoint on a thread of its own (the event loop, busy with the sessions, would
    delay it), keeping each change of the model's counters with the `time.monotonic()` it was first seen."""

    def __init__(self, url: str, model: str, interval: float = POLL_INTERVAL) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self._host, self._port, self._path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self._model = model
        self._interval = interval
        self.samples: list[tuple[float, ModelCounters]] = []
        self.polls = 0
        self.failures = 0
        self.started_at = 0.0
        self._stop = threading.Event()
        self._first = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="triton-metrics-poller", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        """Starts polling; returns once the baseline is read. Blocks: call it off the event loop."""
        self.started_at = time.monotonic()
        self._thread.start()
        if not self._first.wait(timeout):
            self.stop()
            raise RuntimeError(f"Triton's metrics endpoint {self.url} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def wait_for_cancels(self, n: int, timeout: float) -> bool:
        """Blocks until `n` cancels were seen since the baseline, or `timeout` passed."""
        with self._changed:
            return self._changed.wait_for(lambda: self.cancels() >= n, timeout)

    def cancels(self) -> int:
        """Cancels seen since the baseline."""
        samples = self.samples
        return round(samples[-1][1].cancelled - samples[0][1].cancelled) if samples else 0

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=2.0)
        try:
            while not self._stop.is_set():
                due = time.monotonic() + self._interval
                try:
                    conn.request("GET", self._path)
                    reply = conn.getresponse()
                    body = reply.read()
                    if reply.status != 200:
                        raise http.client.HTTPException(f"HTTP {reply.status}")
                except (OSError, http.client.HTTPException):
                    conn.close()  # the next request reconnects
                    self.failures += 1
                else:
                    seen = time.monotonic()
                    counters = parse_model_counters(body.decode(errors="replace"), self._model)
                    self.polls += 1
                    if not self.samples or counters != self.samples[-1][1]:
                        with self._changed:
                            self.samples.append((seen, counters))
                            self._changed.notify_all()
                    self._first.set()
                self._stop.wait(max(0.0, due - time.monotonic()))
        finally:
            conn.close()
