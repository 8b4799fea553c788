"""Per-request timings and their summary, with GenAI-Perf's metric definitions.

    time to first token (TTFT)  = first non-empty response - request start
    inter-token latency (ITL)   = (latency - TTFT) / (output tokens - 1)      per request, >= 2 tokens
    end-to-end latency          = last response - request start
    output token throughput     = output tokens / duration                    all streams together
    per-stream tokens/s         = output tokens / latency                     per request
    request throughput          = completed requests / duration

and, beside ITL, what the client sees of each chunk (a response that carries text on the mesh; a response
that carries tokens on the paths without text, direct and infer):

    chunk gap                   = receipt of a chunk - receipt of the previous chunk    every gap, all requests
    tokens per chunk            = tokens a chunk carried                                every chunk, all requests

ITL is an average per request: text held back and released in a burst (a safety hold, a stop-string
tail) leaves it unchanged, while chunk gaps and tokens per chunk show the bunching.

Percentiles come from an HDR histogram (microsecond resolution, 3 significant digits). Pure functions
and plain data: the unit tests drive them with synthetic timings.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

__all__ = [
    "PERCENTILES",
    "Distribution",
    "RequestRecord",
    "chunk_gaps",
    "distribution",
    "inter_token_latency",
    "summarize",
]

PERCENTILES = (50.0, 90.0, 99.0)
# Microseconds, 1 µs to 1 hour: any latency a benchmark here can see, at 3 significant digits.
_LOWEST_US, _HIGHEST_US, _DIGITS = 1, 3_600_000_000, 3


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it (perf_counter seconds). `error` is a status name, None when it succeeded."""

    start: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    error: str | None = None
    # The gateway's own timings from its final message (seconds): time to hand the request to infer
    # (preprocess included), and its time to first token. Mesh only; they split the mesh's TTFT.
    gateway_queue: float | None = None
    gateway_ttft: float | None = None
    # When each chunk arrived (perf_counter seconds) and how many tokens it carried, in order.
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None

    @property
    def ttft(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.start

    @property
    def latency(self) -> float:
        assert self.end is not None
        return self.end - self.start


def inter_token_latency(record: RequestRecord) -> float | None:
    """GenAI-Perf's ITL for one request; None when it has fewer than two tokens."""
    if not record.ok or record.output_tokens < 2:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def chunk_gaps(record: RequestRecord) -> list[float]:
    """The gaps between one request's consecutive chunks as the client received them (seconds); none for a
    failed request."""
    if not record.ok:
        return []
    return [later - earlier for earlier, later in itertools.pairwise(record.chunk_times)]


@dataclass(frozen=True)
class Distribution:
    """Summary of one metric in milliseconds (or tokens/s for per-stream throughput)."""

    count: int
    mean: float
    min: float
    max: float
    percentiles: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "min": self.min, "max": self.max, **self.percentiles}


def distribution(values: Iterable[float], scale: float = 1000.0) -> Distribution | None:
    """HDR-histogram percentiles of `values` (seconds, reported × `scale`: ms by default); None if empty."""
    hist = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
    n = 0
    total = 0.0
    for v in values:
        # Recorded in µs of the reported unit: ms values keep 3 decimals, tokens/s values too. Zero stays
        # zero (a chunk of text without token ids carries 0 tokens).
        hist.record_value(max(0, min(_HIGHEST_US, round(v * scale * 1000.0))))
        total += v * scale
        n += 1
    if n == 0:
        return None
    return Distribution(
        count=n,
        mean=round(total / n, 3),
        min=hist.get_min_value() / 1000.0,
        max=hist.get_max_value() / 1000.0,
        percentiles={f"p{p:g}": hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES},
    )


def summarize(records: Sequence[RequestRecord], duration: float, window_tokens: int | None = None) -> dict[str, object]:
    """The metrics of one load level: `records` are the measured requests (warm-up excluded).

    `duration` is the measurement window in seconds. Output token throughput is `window_tokens` (tokens
    received during the window, the steady state) / `duration` when given, else the completed requests'
    tokens / `duration`.
    """
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "INCOMPLETE" for r in records if not r.ok)
    tokens = sum(r.output_tokens for r in ok)
    out: dict[str, object] = {
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(sorted(errors.items())),
        "output_tokens": tokens,
        "duration_s": round(duration, 3),
        "request_throughput_per_s": round(len(ok) / duration, 3) if duration > 0 else 0.0,
        "output_tokens_per_s": round((tokens if window_tokens is None else window_tokens) / duration, 1)
        if duration > 0
        else 0.0,
    }
    metrics = {
        "ttft_ms": distribution(r.ttft for r in ok),
        "itl_ms": distribution(itl for r in ok if (itl := inter_token_latency(r)) is not None),
        "chunk_gap_ms": distribution(gap for r in ok for gap in chunk_gaps(r)),
        # Recorded in "seconds" units so that scale=1 keeps tokens.
        "tokens_per_chunk": distribution((n for r in ok for n in r.chunk_tokens), scale=1.0),
        "latency_ms": distribution(r.latency for r in ok),
        # tokens/s per stream: recorded in "seconds" units so that scale=1 keeps tokens/s.
        "per_stream_tokens_per_s": distribution((r.output_tokens / r.latency for r in ok if r.latency > 0), scale=1.0),
    }
    if any(r.gateway_ttft is not None for r in ok):
        metrics["gateway_queue_ms"] = distribution(r.gateway_queue for r in ok if r.gateway_queue is not None)
        metrics["gateway_ttft_ms"] = distribution(r.gateway_ttft for r in ok if r.gateway_ttft is not None)
    for name, dist in metrics.items():
        out[name] = dist.as_dict() if dist else None
    return out
