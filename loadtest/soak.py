"""`python -m loadtest soak`: steady load for minutes; errors by code, p99 drift, memory growth per process.

    .venv/bin/python -m loadtest soak --minutes 10 --concurrency 16

Starts Triton (benchmark instrument) and the mesh on free ports (`harness.running_mesh`), then runs a
closed loop of `concurrency` streams against the gateway for a warm-up and `minutes` of measurement,
cut into windows (default one minute) by request start. Per window: requests, errors by status code,
TTFT and end-to-end p50/p99, output tokens/s, and the resident memory (VmRSS from /proc) of every process
of the mesh, sampled at the window's end: the four services, tritonserver and its python stub. The
summary compares the first and the last window (p99 drift) and the first and the last memory sample
(growth). Requests are sampled (temperature 1, no seed) so that none is deduplicated or served from the
result cache: every one is a real stream through every stage. Results: `loadtest/results/soak-*.json`.

The window and drift arithmetic are pure functions (unit-tested in tests/unit/loadtest/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from . import procstats
from .clients import MeshClient
from .metrics import RequestRecord, distribution

__all__ = ["WindowStats", "add_parser", "drift", "memory_growth", "split_windows", "summarize_soak", "window_stats"]

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class WindowStats:
    index: int
    requests: int
    completed: int
    errors: dict[str, int]
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def split_windows(records: Sequence[RequestRecord], t0: float, window_s: float, n: int) -> list[list[RequestRecord]]:
    """Requests by the window their start falls in ([t0 + k·window_s, t0 + (k+1)·window_s)); others dropped."""
    windows: list[list[RequestRecord]] = [[] for _ in range(n)]
    for record in records:
        k = int((record.start - t0) // window_s)
        if 0 <= k < n:
            windows[k].append(record)
    return windows


def window_stats(index: int, records: Sequence[RequestRecord], window_s: float) -> WindowStats:
    """One window's figures: every request that started in it, measured to its end."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "INCOMPLETE" for r in records if not r.ok)
    ttft = distribution(r.ttft for r in ok)
    latency = distribution(r.latency for r in ok)
    return WindowStats(
        index=index,
        requests=len(records),
        completed=len(ok),
        errors=dict(sorted(errors.items())),
        output_tokens_per_s=round(sum(r.output_tokens for r in ok) / window_s, 1) if window_s > 0 else 0.0,
        ttft_p50_ms=ttft.percentiles["p50"] if ttft else None,
        ttft_p99_ms=ttft.percentiles["p99"] if ttft else None,
        latency_p50_ms=latency.percentiles["p50"] if latency else None,
        latency_p99_ms=latency.percentiles["p99"] if latency else None,
    )


def drift(first: float | None, last: float | None) -> dict[str, float | None]:
    """How a figure moved from the first window to the last: absolute and relative (None when unknown)."""
    if first is None or last is None:
        return {"first": first, "last": last, "change": None, "change_pct": None}
    return {
        "first": first,
        "last": last,
        "change": round(last - first, 3),
        "change_pct": round((last - first) * 100.0 / first, 1) if first else None,
    }


def memory_growth(samples: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per process: RSS (MiB) at the first and the last sample, their difference, and the highest seen.

    A process missing from a sample (it died) is reported from the samples that have it.
    """
    out: dict[str, dict[str, float]] = {}
    names = sorted({name for sample in samples for name in sample})
    for name in names:
        seen = [sample[name] for sample in samples if name in sample]
        out[name] = {
            "first_mib": seen[0],
            "last_mib": seen[-1],
            "growth_mib": round(seen[-1] - seen[0], 1),
            "max_mib": max(seen),
        }
    return out


def summarize_soak(windows: Sequence[WindowStats], rss: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The soak's verdict: errors by code over every window, p99 drift first → last window, memory growth."""
    errors: Counter[str] = Counter()
    for w in windows:
        errors.update(w.errors)
    first, last = windows[0], windows[-1]
    return {
        "windows": len(windows),
        "requests": sum(w.requests for w in windows),
        "completed": sum(w.completed for w in windows),
        "errors": dict(sorted(errors.items())),
        "ttft_p99_ms_drift": drift(first.ttft_p99_ms, last.ttft_p99_ms),
        "latency_p99_ms_drift": drift(first.latency_p99_ms, last.latency_p99_ms),
        "ttft_p50_ms_drift": drift(first.ttft_p50_ms, last.ttft_p50_ms),
        "latency_p50_ms_drift": drift(first.latency_p50_ms, last.latency_p50_ms),
        "memory": memory_growth(rss),
    }


async def _soak(
    client: MeshClient,
    concurrency: int,
    warmup: float,
    window_s: float,
    n: int,
    probe: Callable[[], dict[str, procstats.ProcSample]],
    progress: bool,
) -> tuple[list[RequestRecord], float, list[dict[str, float]], list[tuple[float, float, float]]]:
    """Closed loop for warm-up + n windows; RSS (and the load average) sampled at every window edge."""
    start = perf_counter()
    t0 = start + warmup
    end = t0 + n * window_s
    records: list[RequestRecord] = []
    rss: list[dict[str, float]] = []
    load: list[tuple[float, float, float]] = []
    indexes = itertools.count()

    async def worker() -> None:
        while (now := perf_counter()) < end:
            record = RequestRecord(start=now)
            await client.run(next(indexes), record)
            if record.start >= t0:
                records.append(record)

    async def sampler() -> None:
        for k in range(n + 1):
            await asyncio.sleep(max(0.0, t0 + k * window_s - perf_counter()))
            rss.append({name: s.rss_mib for name, s in probe().items()})
            load.append(os.getloadavg())
            if progress and k:
                w = window_stats(k - 1, split_windows(records, t0, window_s, n)[k - 1], window_s)
                print(
                    f"window {k}/{n}: {w.requests} requests, errors {w.errors or 0}, ttft p99 {w.ttft_p99_ms} ms, "
                    f"e2e p99 {w.latency_p99_ms} ms, rss {rss[-1]}",
                    file=sys.stderr,
                )

    await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    return records, t0, rss, load


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from .cli import _machine
    from .harness import mesh_pids, running_mesh
    from .workload import WORKLOADS, Workload, build

    base = WORKLOADS[args.workload]
    # Sampled, not greedy: deterministic requests would be shared or replayed from the result cache.
    workload = Workload(base.name, base.description, base.prompts, args.max_tokens or base.max_tokens, 1.0)
    built = build(workload, "instrument")
    n = max(1, round(args.minutes * 60.0 / args.window))
    log_dir = RESULTS / "tmp" / "logs" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.time()
    machine = _machine()
    with running_mesh(args.ttft_ms, args.itl_ms, log_dir) as mesh:
        pids = mesh_pids(mesh)
        print(
            f"mesh up (gateway {mesh.address('gateway')}), processes {sorted(pids)}; logs in {log_dir}", file=sys.stderr
        )

        async def main() -> tuple[list[RequestRecord], float, list[dict[str, float]], list[tuple[float, float, float]]]:
            client = MeshClient(mesh.address("gateway"), built, args.request_timeout)
            try:
                return await _soak(
                    client,
                    args.concurrency,
                    args.warmup,
                    args.window,
                    n,
                    lambda: procstats.sample_all(pids),
                    not args.no_progress,
                )
            finally:
                await client.close()

        records, t0, rss, load = uvloop.run(main())
        peak = {name: s.peak_rss_mib for name, s in procstats.sample_all(pids).items()}
    windows = [window_stats(k, w, args.window) for k, w in enumerate(split_windows(records, t0, args.window, n))]
    results = {
        "command": " ".join(["python -m loadtest", *sys.argv[1:]]),
        "started_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "config": {
            "workload": workload.name,
            "max_tokens": workload.max_tokens,
            "temperature": workload.temperature,
            "concurrency": args.concurrency,
            "minutes": args.minutes,
            "window_s": args.window,
            "warmup_s": args.warmup,
            "ttft_ms": args.ttft_ms,
            "itl_ms": args.itl_ms,
        },
        "summary": summarize_soak(windows, rss),
        "peak_rss_mib": peak,
        "windows": [
            {**w.as_dict(), "rss_mib_at_end": rss[k + 1], "load_average_at_end": load[k + 1]}
            for k, w in enumerate(windows)
        ],
        "rss_mib_at_start": rss[0],
    }
    out = args.out or RESULTS / f"soak-c{args.concurrency}-{args.minutes:g}min.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"results: {out}", file=sys.stderr)
    return 0


def markdown(results: Mapping[str, Any]) -> str:
    """The soak's tables: one row per window, then memory per process."""
    lines = [
        "| window | requests | errors | tok/s | TTFT p50 / p99 ms | e2e p50 / p99 ms | load avg |",
        "|---:|---:|---|---:|---|---|---:|",
    ]
    for w in results["windows"]:
        errors = ", ".join(f"{k} {v}" for k, v in w["errors"].items()) or "0"
        lines.append(
            f"| {w['index'] + 1} | {w['requests']} | {errors} | {w['output_tokens_per_s']:.0f} | "
            f"{w['ttft_p50_ms']} / {w['ttft_p99_ms']} | {w['latency_p50_ms']} / {w['latency_p99_ms']} | "
            f"{w['load_average_at_end'][0]:.2f} |"
        )
    lines += ["", "| process | RSS first | RSS last | growth | max |", "|---|---:|---:|---:|---:|"]
    for name, m in results["summary"]["memory"].items():
        lines.append(f"| {name} | {m['first_mib']} | {m['last_mib']} | {m['growth_mib']:+.1f} | {m['max_mib']} |")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    soak = sub.add_parser("soak", help="steady load for minutes: errors by code, p99 drift, memory growth")
    soak.add_argument("--minutes", type=float, default=10.0, help="measured minutes (after the warm-up)")
    soak.add_argument("--concurrency", type=int, default=16, help="streams in flight (closed loop)")
    soak.add_argument("--window", type=float, default=60.0, help="seconds per window")
    soak.add_argument("--warmup", type=float, default=15.0, help="unmeasured seconds first")
    soak.add_argument("--workload", default="chat-256", help="prompts and output length (sampled, temperature 1)")
    soak.add_argument("--max-tokens", type=int, help="override the workload's output tokens")
    soak.add_argument("--ttft-ms", type=float, default=20.0, help="instrument's time to first token")
    soak.add_argument("--itl-ms", type=float, default=10.0, help="instrument's inter-token latency")
    soak.add_argument("--request-timeout", type=float, default=60.0, help="per-request deadline (s)")
    soak.add_argument("--out", type=Path, help="results JSON (default loadtest/results/soak-cN-Mmin.json)")
    soak.add_argument("--no-progress", action="store_true", help="no line per window on stderr")
    soak.set_defaults(func=_run)
