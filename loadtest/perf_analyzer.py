"""Cross-check: Triton's own load tool, perf_analyzer, against the benchmark instrument directly.

    .venv/bin/python -m loadtest perf-analyzer --setup                  # once: .venv-perf/ (+ libb64 via apt as root)
    .venv/bin/python -m loadtest perf-analyzer --concurrency 1 8 32 64  # starts Triton (instrument), runs each level

perf_analyzer ships inside the `tritonclient==2.51.0` wheel (the server's version; the PyPI package
`perf-analyzer` is only a placeholder). It needs Debian's `libb64-0d` and `libcudart.so.12` (PyPI
`nvidia-cuda-runtime-cu12`) on LD_LIBRARY_PATH, and lives in its own virtual environment, `.venv-perf/`,
so that the project's tritonclient (2.73) is unaffected.

Each level runs `perf_analyzer --streaming --concurrency-range C --request-count N` with the same
input ids as loadtest's direct client (preprocess's tokenization, infer's tensors), and exports every
request's send and response timestamps (`--profile-export-file`). TTFT, ITL and throughput are then
computed from those timestamps with loadtest's own GenAI-Perf definitions (the first `C` requests, the
first wave, are the warm-up), and perf_analyzer's own summary line is kept beside them.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "profile_records"]

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-perf"
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("tritonclient==2.51.0", "nvidia-cuda-runtime-cu12")


def _cudart_dir() -> Path:
    found = sorted(VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    if not found:
        raise SystemExit(f"libcudart not found under {VENV}: run with --setup first")
    return found[0]


def _has_libb64() -> bool:
    return ctypes.util.find_library("b64") is not None or any(
        Path(d, "libb64.so.0d").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib/x86_64-linux-gnu")
    )


def setup() -> None:
    """Creates .venv-perf with perf_analyzer and libcudart; installs libb64-0d with apt when root."""
    if not (VENV / "bin" / "python").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", *PACKAGES], check=True)
    if not _has_libb64():
        if os.geteuid() != 0:
            raise SystemExit("perf_analyzer needs libb64: sudo apt-get install -y libb64-0d")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "libb64-0d"], check=True)
    print(f"perf_analyzer ready: {VENV / 'bin' / 'perf_analyzer'}", file=sys.stderr)


def input_data(path: Path, workload_name: str, max_tokens: int | None) -> dict[str, Any]:
    """perf_analyzer's --input-data JSON: the tensors of loadtest's direct requests, one entry per prompt."""
    import numpy as np

    from .workload import WORKLOADS, Workload, build

    workload = WORKLOADS[workload_name]
    if max_tokens:
        workload = Workload(workload.name, workload.description, workload.prompts, max_tokens, workload.temperature)
    built = build(workload, "instrument")
    entries = []
    for request in built.direct_requests:
        entry: dict[str, Any] = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            dtype = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}[tensor.datatype]
            values = np.frombuffer(raw, dtype=dtype).tolist()
            shape = list(tensor.shape)[1:]  # perf_analyzer adds the batch dimension itself
            entry[tensor.name] = {"content": values, "shape": shape}
        entries.append(entry)
    doc = {"data": entries}
    path.write_text(json.dumps(doc))
    return {"expected_tokens": len(built.expected_ids or ()), "prompts": len(entries)}


def profile_records(export: dict[str, Any], skip: int = 0) -> list[Any]:
    """loadtest RequestRecords from a perf_analyzer profile export (nanosecond timestamps), the first `skip` dropped.

    Every response of the instrument carries one token (the last one flagged final), so a request's
    output tokens are its responses.
    """
    from .metrics import RequestRecord

    records = []
    for experiment in export.get("experiments", []):
        requests = sorted(experiment.get("requests", []), key=lambda r: r["timestamp"])
        for request in requests[skip:]:
            times = request.get("response_timestamps") or []
            start = request["timestamp"] / 1e9
            if not times:
                records.append(RequestRecord(start=start, error="INCOMPLETE"))
                continue
            records.append(
                RequestRecord(start=start, first_token=times[0] / 1e9, end=times[-1] / 1e9, output_tokens=len(times))
            )
    return records


def _summary_line(stdout: str) -> dict[str, str]:
    keep = ("Throughput", "Avg latency", "p50 latency", "p90 latency", "p99 latency", "Avg gRPC time")
    found = {}
    for line in stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key in keep and key not in found:
            found[key] = value.strip()
    return found


def run(args: argparse.Namespace) -> int:
    from .harness import INSTRUMENT, running_triton
    from .metrics import summarize

    if args.setup:
        setup()
        if not args.concurrency_given:
            return 0
    binary = VENV / "bin" / "perf_analyzer"
    if not binary.exists():
        raise SystemExit(f"{binary} missing: run `python -m loadtest perf-analyzer --setup` first")
    tmp = RESULTS / "tmp" / "perf_analyzer"
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "input_data.json"
    info = input_data(data, args.workload, args.max_tokens)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{_cudart_dir()}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    levels = []
    with running_triton(args.ttft_ms, args.itl_ms, tmp / "logs") as triton:
        for c in args.concurrency:
            requests = c * (args.waves + 1)  # the first wave is the warm-up
            export = tmp / f"profile_c{c}.json"
            command = [
                str(binary), "-m", INSTRUMENT, "-u", triton.grpc_url, "-i", "grpc", "--streaming",
                "--input-data", str(data), "--concurrency-range", str(c), "--request-count", str(requests),
                "--profile-export-file", str(export),
            ]  # fmt: skip
            print("$ " + " ".join(command), file=sys.stderr)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"perf_analyzer failed with {done.returncode}")
            records = profile_records(json.loads(export.read_text()), skip=c)
            measured = [r for r in records if r.end is not None]
            span = max(r.end for r in measured if r.end) - min(r.start for r in records) if measured else 0.0
            summary = summarize(records, span)
            wrong = sum(1 for r in measured if r.output_tokens != info["expected_tokens"])
            level = {
                "target": "perf_analyzer",
                "mode": "closed",
                "concurrency": c,
                **summary,
                "wrong_token_counts": wrong,
                "perf_analyzer_summary": _summary_line(done.stdout),
                "command": " ".join(command),
            }
            levels.append(level)
            ttft: dict[str, Any] = summary["ttft_ms"] or {}  # type: ignore[assignment]
            itl: dict[str, Any] = summary["itl_ms"] or {}  # type: ignore[assignment]
            print(
                f"perf_analyzer c={c}: ttft p50 {ttft.get('p50')} p99 {ttft.get('p99')} ms, "
                f"itl p50 {itl.get('p50')} ms, "
                f"{summary['output_tokens_per_s']} tok/s, {summary['completed']} requests, "
                f"errors {summary['errors'] or 0}, wrong token counts {wrong}",
                file=sys.stderr,
            )
    out = args.out or RESULTS / "perf_analyzer.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join(["python -m loadtest", *sys.argv[1:]]),
                "config": {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "workload": args.workload, **info},
                "levels": levels,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"results: {out}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("perf-analyzer", help="Triton's perf_analyzer against the instrument, directly")
    p.add_argument("--setup", action="store_true", help="create .venv-perf (and install libb64-0d when root)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--waves", type=int, default=8, help="measured requests per level = waves × concurrency")
    p.add_argument("--workload", default="chat-256")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per perf_analyzer run")
    p.add_argument("--out", type=Path)

    def func(args: argparse.Namespace) -> int:
        args.concurrency_given = args.concurrency is not None
        args.concurrency = args.concurrency or [1, 8, 32, 64]
        return run(args)

    p.set_defaults(func=func)
