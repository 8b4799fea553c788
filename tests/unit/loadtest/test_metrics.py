"""The load generator's metric maths (GenAI-Perf definitions) on synthetic timings."""

from __future__ import annotations

import pytest

from loadtest.metrics import RequestRecord, chunk_gaps, distribution, inter_token_latency, summarize
from loadtest.procstats import ProcSample, cpu_per_1k_tokens


def _record(start: float, ttft: float, itl: float, tokens: int) -> RequestRecord:
    """A request whose first token came `ttft` after `start` and the rest every `itl`."""
    return RequestRecord(
        start=start, first_token=start + ttft, end=start + ttft + itl * (tokens - 1), output_tokens=tokens
    )


def test_ttft_is_first_token_minus_start() -> None:
    """Time to first token is the first non-empty response's time minus the request's start."""
    record = _record(10.0, 0.020, 0.010, 256)
    assert record.ttft == pytest.approx(0.020)


def test_itl_is_latency_minus_ttft_over_tokens_minus_one() -> None:
    """Inter-token latency is (end-to-end latency - TTFT) / (output tokens - 1)."""
    record = _record(0.0, 0.020, 0.010, 256)
    assert record.latency == pytest.approx(0.020 + 0.010 * 255)
    assert inter_token_latency(record) == pytest.approx(0.010)


def test_itl_is_undefined_below_two_tokens_or_on_failure() -> None:
    """A one-token answer has no inter-token latency, and neither has a failed request."""
    assert inter_token_latency(_record(0.0, 0.02, 0.01, 1)) is None
    failed = _record(0.0, 0.02, 0.01, 10)
    failed.error = "UNAVAILABLE"
    assert inter_token_latency(failed) is None


def test_itl_averages_over_uneven_gaps() -> None:
    """ITL is an average per request: a burst of late tokens changes it only through the last token's time."""
    record = RequestRecord(start=0.0, first_token=0.1, end=0.1 + 0.3, output_tokens=4)  # gaps 0.25, 0.025, 0.025
    assert inter_token_latency(record) == pytest.approx(0.1)


def test_percentiles_match_exact_ranks_within_hdr_precision() -> None:
    """p50/p90/p99 of 1..1000 ms are 500, 900 and 990 ms, to the histogram's 3 significant digits."""
    dist = distribution(i / 1000.0 for i in range(1, 1001))
    assert dist is not None
    assert dist.count == 1000
    assert dist.percentiles["p50"] == pytest.approx(500.0, rel=1e-3)
    assert dist.percentiles["p90"] == pytest.approx(900.0, rel=1e-3)
    assert dist.percentiles["p99"] == pytest.approx(990.0, rel=1e-3)
    assert dist.mean == pytest.approx(500.5)
    assert dist.min == pytest.approx(1.0, rel=1e-3)
    assert dist.max == pytest.approx(1000.0, rel=1e-3)


def test_percentiles_keep_sub_millisecond_resolution() -> None:
    """Latencies are recorded in microseconds: 0.25 ms and 0.30 ms stay apart."""
    dist = distribution([0.00025] * 50 + [0.00030] * 50)
    assert dist is not None
    assert dist.percentiles["p50"] == pytest.approx(0.25, abs=0.001)
    assert dist.percentiles["p99"] == pytest.approx(0.30, abs=0.001)


def test_distribution_of_nothing_is_none() -> None:
    """No values, no distribution (rather than zeros that read as measurements)."""
    assert distribution([]) is None


def test_summary_throughputs_and_errors() -> None:
    """Output tokens/s is tokens over the duration; failed requests count by status and stay out of latencies."""
    records = [_record(float(i), 0.02, 0.01, 100) for i in range(8)]
    failed = RequestRecord(start=3.0, error="UNAVAILABLE")
    incomplete = RequestRecord(start=4.0, first_token=4.1, output_tokens=5)  # no end: the stream never completed
    summary = summarize([*records, failed, incomplete], duration=10.0)
    assert summary["requests"] == 10
    assert summary["completed"] == 8
    assert summary["errors"] == {"INCOMPLETE": 1, "UNAVAILABLE": 1}
    assert summary["output_tokens"] == 800
    assert summary["output_tokens_per_s"] == pytest.approx(80.0)
    assert summary["request_throughput_per_s"] == pytest.approx(0.8)
    ttft = summary["ttft_ms"]
    assert isinstance(ttft, dict) and ttft["count"] == 8 and ttft["p50"] == pytest.approx(20.0, rel=1e-3)
    itl = summary["itl_ms"]
    assert isinstance(itl, dict) and itl["p99"] == pytest.approx(10.0, rel=1e-3)
    per_stream = summary["per_stream_tokens_per_s"]
    assert isinstance(per_stream, dict)
    assert per_stream["p50"] == pytest.approx(100 / (0.02 + 0.01 * 99), rel=1e-3)


def test_summary_uses_window_tokens_for_steady_state_throughput() -> None:
    """Given the tokens received inside the measurement window, throughput is those over the window."""
    records = [_record(0.0, 0.02, 0.01, 256)]
    summary = summarize(records, duration=20.0, window_tokens=6000)
    assert summary["output_tokens_per_s"] == pytest.approx(300.0)
    assert summary["output_tokens"] == 256


def test_summary_of_only_failures_has_no_latencies() -> None:
    """A level where everything failed reports its errors and no latency figures."""
    summary = summarize([RequestRecord(start=0.0, error="DEADLINE_EXCEEDED")], duration=1.0)
    assert summary["completed"] == 0
    assert summary["ttft_ms"] is None and summary["itl_ms"] is None
    assert summary["errors"] == {"DEADLINE_EXCEEDED": 1}


def _chunked(start: float, ttft: float, itl: float, tokens: int, per_chunk: int) -> RequestRecord:
    """Tokens generated every `itl` after a first one at `ttft`; the first arrives alone (so TTFT is the same
    for every `per_chunk`), the rest `per_chunk` at a time, each chunk with its last token (`tokens` - 1 is a
    multiple of `per_chunk`)."""
    record = _record(start, ttft, itl, tokens)
    record.chunk_times.append(start + ttft)
    record.chunk_tokens.append(1)
    for last in range(per_chunk, tokens, per_chunk):
        record.chunk_times.append(start + ttft + itl * last)
        record.chunk_tokens.append(per_chunk)
    return record


def test_chunk_gaps_are_the_differences_between_receipt_times() -> None:
    """A request's chunk gaps are the times between its consecutive chunks; a failed request has none."""
    record = RequestRecord(start=0.0, first_token=0.02, end=0.1, output_tokens=4)
    record.chunk_times += [0.02, 0.03, 0.07, 0.07]
    assert chunk_gaps(record) == pytest.approx([0.01, 0.04, 0.0])
    record.error = "CANCELLED"
    assert chunk_gaps(record) == []
    assert chunk_gaps(RequestRecord(start=0.0, first_token=0.02, end=0.02, output_tokens=1)) == []


def test_bunched_chunks_leave_itl_unchanged_but_show_in_chunk_gaps_and_tokens_per_chunk() -> None:
    """Tokens every 10 ms delivered one per chunk or five per chunk (text held back and released together) have
    the same ITL; the chunk gaps (10 vs 50 ms) and tokens per chunk (1 vs 5) tell them apart."""
    smooth = summarize([_chunked(float(i), 0.02, 0.01, 101, 1) for i in range(4)], duration=10.0)
    bunched = summarize([_chunked(float(i), 0.02, 0.01, 101, 5) for i in range(4)], duration=10.0)
    for summary in (smooth, bunched):
        itl = summary["itl_ms"]
        assert isinstance(itl, dict) and itl["p50"] == pytest.approx(10.0, rel=1e-3)
    gaps, per_chunk = smooth["chunk_gap_ms"], smooth["tokens_per_chunk"]
    assert isinstance(gaps, dict) and isinstance(per_chunk, dict)
    assert gaps["count"] == 4 * 100 and gaps["p50"] == pytest.approx(10.0, rel=1e-3)
    assert per_chunk["mean"] == pytest.approx(1.0) and per_chunk["p99"] == pytest.approx(1.0, rel=1e-3)
    gaps, per_chunk = bunched["chunk_gap_ms"], bunched["tokens_per_chunk"]
    assert isinstance(gaps, dict) and isinstance(per_chunk, dict)
    assert gaps["count"] == 4 * 20
    assert gaps["p50"] == pytest.approx(50.0, rel=1e-3) and gaps["p99"] == pytest.approx(50.0, rel=1e-3)
    assert per_chunk["mean"] == pytest.approx(101 / 21, abs=1e-3) and per_chunk["p99"] == pytest.approx(5.0, rel=1e-3)


def test_tokens_per_chunk_counts_text_chunks_without_tokens_and_p99_finds_the_bursts() -> None:
    """A text chunk with no token ids counts as a chunk of 0 tokens; two bursts of 12 in 100 chunks are the p99,
    which the mean (1.21) hides."""
    record = RequestRecord(start=0.0, first_token=0.01, end=1.0, output_tokens=121)
    record.chunk_times += [0.01 * (i + 1) for i in range(100)]
    record.chunk_tokens += [1] * 97 + [0, 12, 12]
    summary = summarize([record], duration=1.0)
    per_chunk = summary["tokens_per_chunk"]
    assert isinstance(per_chunk, dict)
    assert per_chunk["count"] == 100 and per_chunk["mean"] == pytest.approx(1.21)
    assert per_chunk["p50"] == pytest.approx(1.0, rel=1e-3) and per_chunk["p99"] == pytest.approx(12.0, rel=1e-3)
    assert per_chunk["min"] == 0.0


def test_a_level_without_chunk_times_has_no_chunk_figures() -> None:
    """Records that carry no chunk times (perf_analyzer's) report no chunk gaps rather than zeros."""
    summary = summarize([_record(0.0, 0.02, 0.01, 10)], duration=1.0)
    assert summary["chunk_gap_ms"] is None and summary["tokens_per_chunk"] is None


def test_cpu_per_1k_tokens() -> None:
    """CPU seconds per 1,000 output tokens: the CPU time spent between two samples, scaled by tokens."""
    before = {"gateway": ProcSample(10.0, 60.0, 61.0), "infer": ProcSample(5.0, 80.0, 80.0)}
    after = {"gateway": ProcSample(12.0, 62.0, 63.0), "infer": ProcSample(5.5, 80.0, 80.0), "new": ProcSample(1, 1, 1)}
    assert cpu_per_1k_tokens(before, after, 4000) == {"gateway": 0.5, "infer": 0.125}
    assert cpu_per_1k_tokens(before, after, 0) == {}
