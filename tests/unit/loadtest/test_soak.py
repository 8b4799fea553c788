"""The soak's arithmetic: requests split into windows by start, per-window figures, drift and memory growth."""

from __future__ import annotations

import pytest

from loadtest.metrics import RequestRecord
from loadtest.soak import drift, memory_growth, split_windows, summarize_soak, window_stats


def _record(
    start: float, ttft: float = 0.02, latency: float = 1.0, tokens: int = 10, error: str | None = None
) -> RequestRecord:
    if error is not None:
        return RequestRecord(start=start, error=error)
    return RequestRecord(start=start, first_token=start + ttft, end=start + latency, output_tokens=tokens)


def test_requests_fall_in_the_window_their_start_is_in() -> None:
    """Window k holds starts in [t0 + k·w, t0 + (k+1)·w); starts before t0 or past the last window are dropped."""
    t0 = 100.0
    records = [_record(s) for s in (99.9, 100.0, 159.999, 160.0, 219.0, 220.0, 400.0)]
    windows = split_windows(records, t0, 60.0, 2)
    assert [[r.start for r in w] for w in windows] == [[100.0, 159.999], [160.0, 219.0]]


def test_window_stats_count_errors_by_code_and_measure_only_completed_requests() -> None:
    """Errors are counted by status (a stream without a final is INCOMPLETE); percentiles use completed ones."""
    records = [_record(0.0, ttft=0.010, latency=1.0), _record(1.0, ttft=0.030, latency=2.0)]
    records += [_record(2.0, error="UNAVAILABLE"), _record(3.0, error="UNAVAILABLE")]
    records.append(RequestRecord(start=4.0, first_token=4.01))  # no end: never completed
    w = window_stats(0, records, 10.0)
    assert (w.requests, w.completed) == (5, 2)
    assert w.errors == {"INCOMPLETE": 1, "UNAVAILABLE": 2}
    assert w.output_tokens_per_s == 2.0  # 20 tokens of completed requests over 10 s
    assert w.ttft_p50_ms == pytest.approx(10.0, abs=0.01)
    assert w.ttft_p99_ms == pytest.approx(30.0, abs=0.05)
    assert w.latency_p99_ms == pytest.approx(2000.0, rel=1e-3)


def test_an_empty_window_has_no_percentiles() -> None:
    """A window without completed requests reports None, not zero."""
    w = window_stats(3, [_record(0.0, error="DEADLINE_EXCEEDED")], 60.0)
    assert w.ttft_p99_ms is None and w.latency_p99_ms is None
    assert w.errors == {"DEADLINE_EXCEEDED": 1}


def test_drift_is_last_minus_first_in_units_and_percent() -> None:
    """Drift compares the last window with the first; unknown ends give None."""
    assert drift(40.0, 50.0) == {"first": 40.0, "last": 50.0, "change": 10.0, "change_pct": 25.0}
    assert drift(40.0, 30.0)["change_pct"] == -25.0
    assert drift(None, 30.0)["change"] is None
    assert drift(0.0, 1.0)["change_pct"] is None


def test_memory_growth_is_last_minus_first_sample_per_process() -> None:
    """Per process: first, last, growth and max RSS; a process missing from later samples keeps its own."""
    samples = [{"gateway": 60.0, "infer": 80.0}, {"gateway": 75.0, "infer": 82.0}, {"gateway": 70.0}]
    growth = memory_growth(samples)
    assert growth["gateway"] == {"first_mib": 60.0, "last_mib": 70.0, "growth_mib": 10.0, "max_mib": 75.0}
    assert growth["infer"]["growth_mib"] == 2.0


def test_summary_sums_errors_over_windows_and_compares_first_with_last() -> None:
    """The verdict adds every window's errors and reports p99 drift between the first and last windows."""
    first = window_stats(0, [_record(0.0, ttft=0.020), _record(1.0, error="UNAVAILABLE")], 60.0)
    middle = window_stats(1, [_record(60.0, ttft=0.500)], 60.0)
    last = window_stats(2, [_record(120.0, ttft=0.025), _record(121.0, error="UNAVAILABLE")], 60.0)
    summary = summarize_soak([first, middle, last], [{"gateway": 60.0}, {"gateway": 61.0}])
    assert summary["errors"] == {"UNAVAILABLE": 2}
    assert (summary["requests"], summary["completed"]) == (5, 3)
    assert summary["ttft_p99_ms_drift"]["change"] == pytest.approx(5.0, abs=0.05)
    assert summary["memory"]["gateway"]["growth_mib"] == 1.0
