"""`python -m loadtest run | report | plot | sequence | perf-analyzer | soak` (from the repository root).

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
import functools
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import procstats
from .clients import Client, DirectClient, HttpClient, InferStageClient, MeshClient
from .metrics import summarize
from .runner import Level, run_level
from .workload import WORKLOADS, BuiltWorkload, Workload, build

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
# direct: Triton alone; infer: Triton + the infer stage; mesh: the gateway's public API (every stage);
# http: the same mesh through the gateway's OpenAI-compatible HTTP port; variant: the same through a second
# mesh running a patched copy of the services (--variant).
TARGETS = ("direct", "infer", "mesh", "http", "variant")


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import grpc
    from google.protobuf.internal import api_implementation

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


# target -> the Prometheus URLs of its gateway, infer and postprocess (meshes started here).
_METRICS: dict[str, list[str]] = {}


def _stage_metrics(mesh: Any) -> list[str]:
    return [mesh.ports.metrics_url(s) for s in ("gateway", "infer", "postprocess") if s not in mesh.in_gateway]


def _frames(target: str) -> dict[str, float]:
    """(stage, direction) counters of the multiplexed stage calls, summed over the target's services:
    frames and the ops/events they carried (llmmesh_stream_frame{s,_items}_total)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for url in _METRICS.get(target, []):
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name not in ("llmmesh_stream_frames", "llmmesh_stream_frame_items"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = f"{family.name}|{sample.labels['stage']} {sample.labels['direction']}"
                    out[key] = out.get(key, 0.0) + sample.value
    return out


def _per_frame(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """Requests' ops/events per frame during a level, per stage and direction ("infer to_stage": the gateway's
    ops to infer; both ends count each frame, which leaves the ratio as it is)."""
    out = {}
    for key, frames in after.items():
        name, _, where = key.partition("|")
        if name != "llmmesh_stream_frames":
            continue
        n = frames - before.get(key, 0.0)
        items = after.get(f"llmmesh_stream_frame_items|{where}", 0.0) - before.get(
            f"llmmesh_stream_frame_items|{where}", 0.0
        )
        if n > 0:
            out[where] = round(items / n, 3)
    return out or None


@contextlib.contextmanager
def _endpoints(args: argparse.Namespace) -> Iterator[tuple[dict[str, str], dict[str, dict[str, int]]]]:
    """(target -> address, target -> {process name: PID} to measure): as given, or started here."""
    given = {t: getattr(args, t) for t in ("direct", "infer", "mesh") if getattr(args, t)}
    if given:
        missing = [t for t in args.targets if t not in given]
        if missing:
            raise SystemExit(f"addresses given, but none for: {', '.join(missing)} (--{' --'.join(missing)})")
        yield given, {}
        return
    from .harness import mesh_pids, running_mesh, running_triton, triton_pids

    log_dir = RESULTS / "tmp" / "logs" / time.strftime("%Y%m%d-%H%M%S")
    print(f"starting Triton (instrument: ttft {args.ttft_ms:g} ms, itl {args.itl_ms:g} ms) ...", file=sys.stderr)
    if args.targets == ["direct"]:
        with running_triton(args.ttft_ms, args.itl_ms, log_dir) as triton:
            yield {"direct": triton.grpc_url}, {"direct": triton_pids(triton)}
        return
    options = {"pii": args.pii == "on", "classifier": args.classifier}
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(running_mesh(args.ttft_ms, args.itl_ms, log_dir, **options))
        assert mesh.triton is not None
        print(f"mesh up: gateway {mesh.address('gateway')}, logs in {log_dir}", file=sys.stderr)
        addresses = {
            "direct": mesh.triton.grpc_url,
            "infer": mesh.address("infer"),
            "mesh": mesh.address("gateway"),
            "http": mesh.http_url,
        }
        pids = dict.fromkeys(("direct", "infer", "mesh", "http"), mesh_pids(mesh))
        _METRICS.update(dict.fromkeys(("mesh", "http"), _stage_metrics(mesh)))
        if args.variant or args.in_gateway:
            # A second mesh whose services import `llmmesh` from the given folder first: a patched copy
            # of services/, measured side by side with this checkout's under the same load and noise. Or
            # (--in-gateway) this checkout with stages in the gateway's process.
            env = {"PYTHONPATH": str(args.variant.resolve())} if args.variant else {}
            variant = stack.enter_context(
                running_mesh(
                    args.ttft_ms,
                    args.itl_ms,
                    log_dir / "variant",
                    env,
                    in_gateway=tuple(args.in_gateway),
                    **options,
                )
            )
            what = f"llmmesh from {args.variant}" if args.variant else f"{' and '.join(args.in_gateway)} in the gateway"
            print(f"variant up: gateway {variant.address('gateway')} ({what})", file=sys.stderr)
            addresses["variant"] = variant.address("gateway")
            pids["variant"] = mesh_pids(variant)
            _METRICS["variant"] = _stage_metrics(variant)
        yield addresses, pids


def _clients(args: argparse.Namespace, built: BuiltWorkload, addresses: dict[str, str]) -> dict[str, Client]:
    kinds: dict[str, type[DirectClient] | type[InferStageClient] | type[MeshClient] | type[HttpClient]] = {
        "direct": DirectClient,
        "infer": InferStageClient,
        "mesh": MeshClient,
        "http": HttpClient,
        "variant": MeshClient,
    }
    return {t: kinds[t](addresses[t], built, args.request_timeout) for t in args.targets}


def _one_line(target: str, level: Level, s: dict[str, Any]) -> str:
    def p(metric: str, stat: str) -> str:
        return f"{s[metric][stat]:.2f}" if s.get(metric) else "–"

    return (
        f"{target:<6} {level.label:<12} ttft p50 {p('ttft_ms', 'p50')} p99 {p('ttft_ms', 'p99')} ms | "
        f"itl p50 {p('itl_ms', 'p50')} ms | chunk gap p50 {p('chunk_gap_ms', 'p50')} p99 {p('chunk_gap_ms', 'p99')} "
        f"ms | tokens/chunk {p('tokens_per_chunk', 'mean')} p99 {p('tokens_per_chunk', 'p99')} | "
        f"{s['output_tokens_per_s']:.0f} tok/s | {s['completed']} requests, errors {s['errors'] or 0}"
    )


async def _bench(
    args: argparse.Namespace, built: BuiltWorkload, addresses: dict[str, str], pids: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    clients = _clients(args, built, addresses)  # grpc.aio channels belong to the running loop
    out = []
    for level in _levels(args):
        for target in clients:
            measured = {**pids.get(target, {}), "loadgen": os.getpid()}
            frames_before = await asyncio.to_thread(_frames, target)
            run = await run_level(
                clients[target],
                level,
                functools.partial(procstats.sample_all, measured),
                progress=not args.no_progress,
                desc=f"{target} {level.label}",
            )
            frames_after = await asyncio.to_thread(_frames, target)
            summary = summarize(run.records, run.duration, run.window_tokens)
            tokens = run.window_tokens if run.window_tokens is not None else int(summary["output_tokens"])  # type: ignore[call-overload]
            summary = {
                "target": target,
                "mode": level.mode,
                "concurrency": level.concurrency if level.mode == "closed" else None,
                "rate": level.rate if level.mode == "open" else None,
                **summary,
                "tokens_per_message": round(run.window_tokens / run.window_messages, 3)
                if run.window_tokens and run.window_messages
                else None,
                "cpu_s_per_1k_tokens": procstats.cpu_per_1k_tokens(run.at_start or {}, run.at_end or {}, tokens),
                "rss_mib": {name: s.rss_mib for name, s in (run.at_end or {}).items()},
                # How many requests' ops/events one frame of a multiplexed stage call carried (whole level).
                "items_per_frame": _per_frame(frames_before, frames_after),
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

    if args.variant and args.in_gateway:
        raise SystemExit("--variant and --in-gateway both name the variant mesh: choose one")
    if (args.variant or args.in_gateway) and "variant" not in args.targets:
        args.targets = [*args.targets, "variant"]
    if "variant" in args.targets and not (args.variant or args.in_gateway):
        raise SystemExit("target variant needs --variant DIR or --in-gateway STAGE...")
    workload = WORKLOADS[args.workload]
    if args.max_tokens:
        workload = Workload(
            workload.name, workload.description, workload.prompts, args.max_tokens, workload.temperature
        )
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
            "pii_redaction": args.pii,
            "safety_classifier": args.classifier,
            "variant": f"{' and '.join(args.in_gateway)} in the gateway's process"
            if args.in_gateway
            else str(args.variant or ""),
        },
    }
    with _endpoints(args) as (addresses, pids):
        import uvloop

        results["levels"] = uvloop.run(_bench(args, built, addresses, pids))
        labels = (("mesh", "peak_rss_mib"), ("variant", "variant_peak_rss_mib"), ("direct", "peak_rss_mib"))
        for target, label in labels:
            if target in pids and label not in results:
                results[label] = {name: s.peak_rss_mib for name, s in procstats.sample_all(pids[target]).items()}
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


def _variant(args: argparse.Namespace) -> int:
    """A patched copy of the source root services/ for `run --variant`; this checkout stays as it is."""
    import shutil
    import subprocess

    services = Path(__file__).resolve().parents[1] / "services"
    out = args.out or RESULTS / "tmp" / "variants" / args.patch.stem
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(services / "llmmesh", out / "llmmesh", ignore=shutil.ignore_patterns("__pycache__"))
    # The patch names services/llmmesh/...; PYTHONPATH=out finds out/llmmesh/.
    (out / "services").symlink_to(".")
    subprocess.run(["patch", "-p1", "-s", "-d", str(out), "-i", str(args.patch.resolve())], check=True)
    print(f"{out}  (run: python -m loadtest run --variant {out})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a benchmark: direct Triton and/or the mesh, per load level")
    load = run.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="closed loop levels")
    load.add_argument("--rate", type=float, nargs="+", help="open loop: Poisson arrival rates, requests/s")
    run.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    run.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level's window")
    run.add_argument("--requests", type=int, help="count-bounded: measured requests per level (instead of --duration)")
    run.add_argument("--warmup-requests", type=int, default=0, help="count-bounded: unmeasured requests first")
    run.add_argument(
        "--targets", nargs="+", choices=TARGETS, default=["direct", "mesh"],
        help="what to load, in this order at each level (infer: Triton + the infer stage alone)",
    )  # fmt: skip
    run.add_argument("--workload", choices=sorted(WORKLOADS), default="chat-256")
    run.add_argument("--max-tokens", type=int, help="override the workload's output tokens")
    run.add_argument("--ttft-ms", type=float, default=20.0, help="instrument's time to first token (started here)")
    run.add_argument("--itl-ms", type=float, default=10.0, help="instrument's inter-token latency (started here)")
    run.add_argument(
        "--pii", choices=("on", "off"), default="on",
        help="PII redaction in the mesh started here (on: the default policy; it holds each trailing word back)",
    )  # fmt: skip
    run.add_argument(
        "--classifier", action="store_true", help="load the safety classifier into Triton (its layer is off without)"
    )
    run.add_argument("--mesh", "--gateway", dest="mesh", help="a running mesh's gateway (host:port)")
    run.add_argument("--infer", help="a running infer stage (host:port)")
    run.add_argument("--direct", "--triton", dest="direct", help="a running Triton's gRPC address (host:port)")
    run.add_argument(
        "--variant", type=Path,
        help="a folder holding a patched copy of services/llmmesh/ as llmmesh/: a second mesh runs it (target variant)",
    )  # fmt: skip
    run.add_argument(
        "--in-gateway", nargs="+", choices=("preprocess", "postprocess"), default=[], metavar="STAGE",
        help="target variant: this checkout's mesh with these stages in the gateway's process",
    )  # fmt: skip
    run.add_argument("--triton-model", default="instrument", help="Triton model the direct client calls")
    run.add_argument("--seed", type=int, default=0, help="open loop: arrival process seed")
    run.add_argument(
        "--request-timeout", type=float, default=60.0, help="per-request deadline (s): a stuck stream is an error"
    )
    run.add_argument("--pause", type=float, default=1.0, help="seconds between levels")
    run.add_argument("--name", default="mesh_vs_direct", help="results file stem under loadtest/results/")
    run.add_argument("--out", type=Path, help="results JSON path (the PNG goes beside it)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="print a results file's tables (markdown)")
    report.add_argument("results", type=Path)
    report.add_argument("--plot", action="store_true", help="(re)draw its PNG too")
    report.set_defaults(func=_report)

    variant = sub.add_parser("variant", help="copy services/ and apply a patch, for run --variant")
    variant.add_argument("patch", type=Path, help="a patch against the repository root (a/services/...)")
    variant.add_argument("--out", type=Path, help="folder to create (default loadtest/results/tmp/variants/NAME)")
    variant.set_defaults(func=_variant)

    seq = sub.add_parser("sequence", help="re-tokenize the instrument's text into its sequence.json")
    seq.add_argument("--check", action="store_true", help="only check that the stored ids are current")
    seq.set_defaults(func=_sequence)

    from .aiperf_http import add_parser as add_aiperf
    from .first_token import add_parser as add_first_token
    from .perf_analyzer import add_parser as add_perf_analyzer
    from .profile import add_parser as add_profile
    from .soak import add_parser as add_soak

    add_first_token(sub)
    add_perf_analyzer(sub)
    add_aiperf(sub)
    add_profile(sub)
    add_soak(sub)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the processes started here are stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(args.func(args))
