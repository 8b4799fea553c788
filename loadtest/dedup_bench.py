"""What dedup saves: Triton requests and client time to first token, dedup on vs off, in one run.

    .venv/bin/python -m loadtest.dedup_bench --requests 400 --rate 10 --duplicate-share 0.5

The workload is a fixed, seeded sequence of greedy requests arriving as a Poisson process (open loop):
a stated share of them repeats one of a few popular prompts (a voice front end's retry, many users asking
the same thing), the rest are unique. The same sequence, with the same arrival times, is sent to two
meshes in turn, each in front of the benchmark instrument (20 ms to first token, 10 ms between tokens):
first with dedup on (the default: in-flight joining, in-process result cache), then with dedup off
(`LLMMESH_INFER_DEDUP=false`). Triton requests are counted at the model (its own Prometheus counters);
time to first token is measured by the client. Results go to loadtest/results/dedup.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.launcher import Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .harness import running_mesh

RESULTS = Path(__file__).parent / "results" / "dedup.json"
TOPICS = ("the sea", "mountains", "rivers", "forests", "deserts", "glaciers", "volcanoes", "islands")


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the start
    prompt: str
    duplicate: bool  # one of the popular prompts


def plan(requests: int, rate: float, duplicate_share: float, popular: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(requests):
        t += rng.expovariate(rate)
        if rng.random() < duplicate_share:
            out.append(Planned(t, f"Tell me about {TOPICS[rng.randrange(popular)]}.", True))
        else:
            out.append(Planned(t, f"Tell me about request number {i} ({seed}).", False))
    return out


def model_requests(mesh: Mesh) -> float:
    assert mesh.triton is not None
    with urllib.request.urlopen(mesh.triton.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmmesh_model_requests_total"
    )


async def _drive(address: str, workload: list[Planned], max_tokens: int) -> dict[str, Any]:
    ttft: dict[bool, list[float]] = {True: [], False: []}
    reuse: dict[str, int] = {}
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        t0 = time.monotonic()

        async def one(p: Planned) -> None:
            await asyncio.sleep(max(0.0, t0 + p.at - time.monotonic()))
            req = generation_pb2.GenerateRequest(
                prompt=p.prompt, sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
            )
            start, first = time.monotonic(), None
            try:
                async for r in stub.Generate(req, timeout=120):
                    if r.HasField("chunk"):
                        if first is None and r.chunk.text:
                            first = time.monotonic()
                    else:
                        name = generation_pb2.Reuse.Name(r.final.reuse).removeprefix("REUSE_").lower()
                        reuse[name] = reuse.get(name, 0) + 1
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                return
            if first is not None:
                ttft[p.duplicate].append((first - start) * 1000)

        await asyncio.gather(*(one(p) for p in workload))
        elapsed = time.monotonic() - t0
    every = ttft[True] + ttft[False]

    def q(values: list[float], pct: int) -> float | None:
        return round(statistics.quantiles(values, n=100)[pct - 1], 1) if len(values) >= 2 else None

    return {
        "seconds": round(elapsed, 1),
        "ttft_ms_p50": q(every, 50),
        "ttft_ms_p90": q(every, 90),
        "ttft_ms_p50_duplicates": q(ttft[True], 50),
        "ttft_ms_p50_unique": q(ttft[False], 50),
        "reuse": dict(sorted(reuse.items())),
        "errors": errors,
    }


def run_mode(dedup: bool, workload: list[Planned], max_tokens: int, log_dir: Path) -> dict[str, Any]:
    env = {"LLMMESH_INFER_DEDUP": "true" if dedup else "false"}
    with running_mesh(20, 10, log_dir, env=env) as mesh:
        before = model_requests(mesh)
        result = asyncio.run(_drive(mesh.address("gateway"), workload, max_tokens))
        time.sleep(0.5)  # let the last cancels and completions reach the model's counters
        result["triton_requests"] = int(model_requests(mesh) - before)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=10.0, help="arrivals per second (Poisson)")
    ap.add_argument("--duplicate-share", type=float, default=0.5, help="share of requests with a popular prompt")
    ap.add_argument("--popular", type=int, default=8, help="how many popular prompts (at most 8)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    workload = plan(args.requests, args.rate, args.duplicate_share, min(args.popular, len(TOPICS)), args.seed)
    with tempfile.TemporaryDirectory(prefix="llmmesh-dedup-bench-") as tmp:
        on = run_mode(True, workload, args.max_tokens, Path(tmp) / "on")
        off = run_mode(False, workload, args.max_tokens, Path(tmp) / "off")
    saved = off["triton_requests"] - on["triton_requests"]
    report = {
        "command": "python -m loadtest.dedup_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "workload": {
            "requests": args.requests,
            "rate_per_s": args.rate,
            "duplicate_share": args.duplicate_share,
            "duplicates_in_sequence": sum(p.duplicate for p in workload),
            "popular_prompts": args.popular,
            "max_tokens": args.max_tokens,
            "model": "instrument (20 ms TTFT, 10 ms ITL)",
            "order": "dedup on, then dedup off, same arrival times",
        },
        "dedup_on": on,
        "dedup_off": off,
        "triton_requests_saved": saved,
        "triton_requests_saved_share": round(saved / off["triton_requests"], 3) if off["triton_requests"] else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
