"""`python -m loadtest run | report | plot | sequence | perf-analyzer` (from the repository root).

    # The issue's benchmark: starts Triton (instrument at 20 ms TTFT, 10 ms ITL) and the mesh on free
    # ports, runs each concurrency against Triton directly and then through the mesh, writes JSON + PNG.
    .venv/bin/python -m loadtest run --concurrency 1 8 32 64 --duration 20 --warmup 3

    # Open loop: Poisson arrivals at 2, 8 and 16 requests/s.
    .venv/bin/python -m loadtest run --rate 2 8 16 --duration 20

    # Against a running mesh / Triton (no processes started, no CPU figures).
    .venv/bin/python -m loadtest run --gateway 127.0.0.1:50051 --triton 127.0.0.1:8001 --triton-model instrument
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import procstats
from .clients import Client, DirectClient, MeshClient
from .metrics import summarize
from .runner import Level, run_level
from .workload import WORKLOADS, BuiltWorkload, Workload, build

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("direct", "mesh")


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from google.protobuf.internal import api_implementation

    import grpc

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf_backend": api_implementation.Type(),
        "load_average_at_start": os.getloadavg(),
    }


def _levels(args: argparse.Namespace) -> list[Level]:
    common: dict[str, Any] = {
        "duration": None if args.requests else args.duration,
        "warmup": args.warmup,
        "requests": args.requests,
        "warmup_requests": args.warmup_requests,
        "seed": args.seed,
    }
    if args.rate:
        return [Level("open", rate=r, **common) for r in args.rate]
    return [Level("closed", concurrency=c, **common) for c in args.concurrency]


@contextlib.contextmanager
def _endpoints(args: argparse.Namespace) -> Iterator[tuple[str | None, str | None, dict[str, int]]]:
    """(gateway address, Triton address, PIDs to measure): given, or started here."""
    if args.gateway or args.triton:
        yield args.gateway, args.triton, {}
        return
    from .harness import mesh_pids, running_mesh, running_triton, triton_pids

    log_dir = RESULTS / "tmp" / "logs" / time.strftime("%Y%m%d-%H%M%S")
    print(f"starting Triton (instrument: ttft {args.ttft_ms:g} ms, itl {args.itl_ms:g} ms) ...", file=sys.stderr)
    if args.target == "direct":
        with running_triton(args.ttft_ms, args.itl_ms, log_dir) as triton:
            yield None, triton.grpc_url, triton_pids(triton)
        return
    with running_mesh(args.ttft_ms, args.itl_ms, log_dir) as mesh:
        assert mesh.triton is not None
        print(f"mesh up: gateway {mesh.address('gateway')}, logs in {log_dir}", file=sys.stderr)
        yield mesh.address("gateway"), mesh.triton.grpc_url, mesh_pids(mesh)


def _clients(args: argparse.Namespace, built: BuiltWorkload, gateway: str | None, triton: str | None) -> dict[str, Client]:
    clients: dict[str, Client] = {}
    if args.target in ("both", "direct"):
        if triton is None:
            raise SystemExit("--target direct needs --triton (or no addresses: then Triton is started here)")
        clients["direct"] = DirectClient(triton, built)
    if args.target in ("both", "mesh"):
        if gateway is None:
            raise SystemExit("--target mesh needs --gateway (or no addresses: then the mesh is started here)")
        clients["mesh"] = MeshClient(gateway, built)
    return clients


def _one_line(target: str, level: Level, s: dict[str, Any]) -> str:
    def p(metric: str, stat: str) -> str:
        return f"{s[metric][stat]:.2f}" if s.get(metric) else "–"

    return (
        f"{target:<6} {level.label:<12} ttft p50 {p('ttft_ms', 'p50')} p99 {p('ttft_ms', 'p99')} ms | "
        f"itl p50 {p('itl_ms', 'p50')} ms | {s['output_tokens_per_s']:.0f} tok/s | "
        f"{s['completed']} requests, errors {s['errors'] or 0}"
    )


async def _bench(
    args: argparse.Namespace, built: BuiltWorkload, gateway: str | None, triton: str | None, pids: dict[str, int]
) -> list[dict[str, Any]]:
    clients = _clients(args, built, gateway, triton)  # grpc.aio channels belong to the running loop
    pids = {**pids, "loadgen": os.getpid()}

    def probe() -> dict[str, procstats.ProcSample]:
        return procstats.sample_all(pids)

    out = []
    for level in _levels(args):
        for target in clients:
            run = await run_level(
                clients[target], level, probe, progress=not args.no_progress, desc=f"{target} {level.label}"
            )
            summary = summarize(run.records, run.duration, run.window_tokens)
            tokens = run.window_tokens if run.window_tokens is not None else int(summary["output_tokens"])  # type: ignore[call-overload]
            summary = {
                "target": target,
                "mode": level.mode,
                "concurrency": level.concurrency if level.mode == "closed" else None,
                "rate": level.rate if level.mode == "open" else None,
                **summary,
                "cpu_s_per_1k_tokens": procstats.cpu_per_1k_tokens(run.at_start or {}, run.at_end or {}, tokens),
                "rss_mib": {name: s.rss_mib for name, s in (run.at_end or {}).items()},
                "load_average": os.getloadavg(),
            }
            print(_one_line(target, level, summary), file=sys.stderr)
            out.append(summary)
            await asyncio.sleep(args.pause)
    for client in clients.values():
        await client.close()
    return out


def _run(args: argparse.Namespace) -> int:
    from .report import markdown, plot

    workload = WORKLOADS[args.workload]
    if args.max_tokens:
        workload = Workload(workload.name, workload.description, workload.prompts, args.max_tokens, workload.temperature)
    built = build(workload, args.triton_model, instrument=args.triton_model == "instrument")
    results: dict[str, Any] = {
        "command": " ".join(["python -m loadtest", *sys.argv[1:]]),
        "machine": _machine(),
        "config": {
            "workload": workload.name,
            "max_tokens": workload.max_tokens,
            "prompt_tokens": list(built.prompt_tokens),
            "ttft_ms": args.ttft_ms,
            "itl_ms": args.itl_ms,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "requests": args.requests,
        },
    }
    with _endpoints(args) as (gateway, triton, pids):
        import uvloop

        results["levels"] = uvloop.run(_bench(args, built, gateway, triton, pids))
        results["peak_rss_mib"] = {name: s.peak_rss_mib for name, s in procstats.sample_all(pids).items()}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    out = args.out or RESULTS / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    png = plot(results, out.with_suffix(".png"))
    print(markdown(results))
    print(f"results: {out}\nplot:    {png}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import markdown, plot

    results = json.loads(args.results.read_text())
    print(markdown(results))
    if args.plot:
        print(f"plot: {plot(results, args.results.with_suffix('.png'))}", file=sys.stderr)
    return 0


def _sequence(args: argparse.Namespace) -> int:
    from .sequence import check, write

    if args.check:
        ok = check()
        print("sequence.json matches the tokenizer" if ok else "sequence.json is stale: run without --check")
        return 0 if ok else 1
    print(f"wrote {len(write())} token ids")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a benchmark: direct Triton and/or the mesh, per load level")
    load = run.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="closed loop levels")
    load.add_argument("--rate", type=float, nargs="+", help="open loop: Poisson arrival rates, requests/s")
    run.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    run.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level's window")
    run.add_argument("--requests", type=int, help="count-bounded: measured requests per level (instead of --duration)")
    run.add_argument("--warmup-requests", type=int, default=0, help="count-bounded: unmeasured requests first")
    run.add_argument("--target", choices=("both", *TARGETS), default="both")
    run.add_argument("--workload", choices=sorted(WORKLOADS), default="chat-256")
    run.add_argument("--max-tokens", type=int, help="override the workload's output tokens")
    run.add_argument("--ttft-ms", type=float, default=20.0, help="instrument's time to first token (started here)")
    run.add_argument("--itl-ms", type=float, default=10.0, help="instrument's inter-token latency (started here)")
    run.add_argument("--gateway", help="a running mesh's gateway (host:port); nothing is started")
    run.add_argument("--triton", help="a running Triton's gRPC address (host:port); nothing is started")
    run.add_argument("--triton-model", default="instrument", help="Triton model the direct client calls")
    run.add_argument("--seed", type=int, default=0, help="open loop: arrival process seed")
    run.add_argument("--pause", type=float, default=1.0, help="seconds between levels")
    run.add_argument("--name", default="mesh_vs_direct", help="results file stem under loadtest/results/")
    run.add_argument("--out", type=Path, help="results JSON path (the PNG goes beside it)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="print a results file's tables (markdown)")
    report.add_argument("results", type=Path)
    report.add_argument("--plot", action="store_true", help="(re)draw its PNG too")
    report.set_defaults(func=_report)

    seq = sub.add_parser("sequence", help="re-tokenize the instrument's text into its sequence.json")
    seq.add_argument("--check", action="store_true", help="only check that the stored ids are current")
    seq.set_defaults(func=_sequence)

    from .perf_analyzer import add_parser as add_perf_analyzer

    add_perf_analyzer(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    sys.exit(args.func(args))
