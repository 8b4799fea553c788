"""Where the mesh's CPU goes per token: py-spy on every service while the mesh is under load.

    .venv/bin/python -m loadtest profile --concurrency 32 --duration 15

Starts Triton (instrument) and the mesh, loads the gateway with the chat-256 workload at a fixed
concurrency, and samples gateway, infer and postprocess with `py-spy record --nonblocking` (it reads
the processes' memory without stopping them). Prints each service's busiest functions, by their own
time and including what they call, as a share of that service's samples, and its CPU seconds per
1,000 output tokens; writes loadtest/results/profile_c<N>.json and keeps the raw stacks under
loadtest/results/tmp/profile/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import procstats
from .harness import mesh_pids, running_mesh
from .metrics import summarize
from .runner import Level, run_level
from .workload import WORKLOADS, build

__all__ = ["add_parser", "aggregate"]

RESULTS = Path(__file__).resolve().parent / "results"
PROFILED = ("gateway", "infer", "postprocess")
_LINE = re.compile(r":\d+\)$")


def _frame(frame: str) -> str:
    """`func (path/file.py:123)` -> `func (path/file.py)`: lines of one function count together."""
    return _LINE.sub(")", frame.strip())


def aggregate(raw: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "self_pct": shares(own), "inclusive_pct": shares(inclusive)}


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return found


def run(args: argparse.Namespace) -> int:
    raw_dir = RESULTS / "tmp" / "profile"
    raw_dir.mkdir(parents=True, exist_ok=True)
    built = build(WORKLOADS[args.workload], "instrument")
    spy = _py_spy()
    services = [s for s in args.services if s not in args.in_gateway]
    with running_mesh(
        args.ttft_ms, args.itl_ms, raw_dir / "logs", pii=args.pii == "on", in_gateway=tuple(args.in_gateway)
    ) as mesh:
        pids = {**mesh_pids(mesh), "loadgen": os.getpid()}

        async def load() -> dict[str, Any]:
            from .clients import MeshClient

            client = MeshClient(mesh.address("gateway"), built)
            await run_level(
                client, Level("closed", concurrency=args.concurrency, duration=3.0, warmup=0.0), progress=False
            )
            # --native (C frames: grpc core, protobuf, uvloop) needs py-spy to pause the process per sample.
            mode = ["--native"] if args.native else ["--nonblocking"]
            spies = []
            for name in services:
                command = [spy, "record", *mode, "-p", str(pids[name]), "-d", str(int(args.duration))]
                command += ["-r", str(args.rate), "-f", "raw", "-o", str(raw_dir / f"{name}.txt")]
                spies.append(
                    await asyncio.create_subprocess_exec(
                        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
                    )
                )
            level = Level("closed", concurrency=args.concurrency, duration=float(args.duration), warmup=0.0)
            result = await run_level(client, level, lambda: procstats.sample_all(pids), progress=False)
            for p in spies:
                await p.wait()
            await client.close()
            summary = summarize(result.records, result.duration, result.window_tokens)
            summary["cpu_s_per_1k_tokens"] = procstats.cpu_per_1k_tokens(
                result.at_start, result.at_end, result.window_tokens or 0
            )
            summary["tokens_per_message"] = (
                round(result.window_tokens / result.window_messages, 3)
                if result.window_tokens and result.window_messages
                else None
            )
            return summary

        import uvloop

        summary = uvloop.run(load())
    profiles = {
        name: aggregate((raw_dir / f"{name}.txt").read_text(), args.top)
        for name in services
        if (raw_dir / f"{name}.txt").exists()
    }
    out = {
        "command": " ".join(["python -m loadtest", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "concurrency": args.concurrency,
        "native": args.native,
        "pii_redaction": args.pii,
        "in_gateway": args.in_gateway,
        "load": {
            k: summary[k]
            for k in ("completed", "errors", "output_tokens_per_s", "tokens_per_message", "ttft_ms", "itl_ms")
        },
        "cpu_s_per_1k_tokens": summary["cpu_s_per_1k_tokens"],
        "profiles": profiles,
    }
    path = args.out or RESULTS / f"profile_c{args.concurrency}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"load: {summary['output_tokens_per_s']} tok/s, {summary['tokens_per_message']} tokens per message "
        f"at the client, errors {summary['errors'] or 0}"
    )
    print(f"CPU s per 1,000 tokens: {summary['cpu_s_per_1k_tokens']}")
    for name, prof in profiles.items():
        print(f"\n== {name}: {prof['samples']} samples (self %)")
        for frame, pct in prof["self_pct"]:
            print(f"  {pct:5.1f}  {frame}")
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("profile", help="py-spy every service while the mesh is loaded")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=15.0, help="seconds sampled")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--workload", default="chat-256")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--pii", choices=("on", "off"), default="on", help="PII redaction in the mesh")
    p.add_argument("--services", nargs="+", choices=PROFILED, default=list(PROFILED))
    p.add_argument(
        "--in-gateway", nargs="+", choices=("preprocess", "postprocess"), default=[], metavar="STAGE",
        help="stages run in the gateway's process",
    )  # fmt: skip
    p.add_argument("--native", action="store_true", help="C frames too (py-spy pauses the process per sample)")
    p.add_argument("--top", type=int, default=15, help="functions listed per service")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=run)
