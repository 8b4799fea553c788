"""Where the first token's time goes at concurrency 1: the mesh's added TTFT, split by what the gateway saw.

For each mesh layout (four processes; postprocess in the gateway; pre- and postprocess in the gateway) and
PII redaction on and off, one
mesh is started and loaded at concurrency 1, direct to its Triton and through its gateway, the same
workload as `run`. From the gateway's own timings in each final message:

- gateway queue: arrival at the gateway until the infer call is made (Prepare's round trip, admission);
- client ↔ gateway: the client's TTFT minus the gateway's (request in, first chunk out);
- the rest: the gateway's TTFT minus its queue minus direct's TTFT: the infer hop and the text stage
  (postprocess, and the PII hold when it is on).

Then the price of waking an idle process: a unary Prepare and a health check, back to back and with 20 ms
between calls (a request at concurrency 1 finds every process idle), and the same CPU work (template and
tokenizer) back to back and after 20 ms of sleep, without any gRPC.

    python -m loadtest first-token [--duration 10]    → results/first_token.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .clients import DirectClient, MeshClient
from .harness import running_mesh
from .metrics import summarize
from .runner import Level, run_level
from .workload import WORKLOADS, build

__all__ = ["add_parser"]

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS: dict[str, tuple[str, ...]] = {
    "four processes": (),
    "postprocess in gateway": ("postprocess",),
    "pre+postprocess in gateway": ("preprocess", "postprocess"),
}


async def _rpc_latency(address: str, calls: int = 60) -> dict[str, float]:
    from llmmesh.stages.v1 import preprocess_pb2, preprocess_pb2_grpc
    from llmmesh.v1 import generation_pb2

    request = preprocess_pb2.PrepareRequest(
        request=generation_pb2.GenerateRequest(
            prompt="Tell me about lighthouses.", sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=8)
        )
    )
    out: dict[str, float] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        prepare = preprocess_pb2_grpc.PreprocessServiceStub(channel).Prepare
        health = health_pb2_grpc.HealthStub(channel).Check
        for gap in (0.0, 0.02):
            for name, call in (
                ("prepare", lambda: prepare(request, timeout=5)),
                ("health_check", lambda: health(health_pb2.HealthCheckRequest(), timeout=5)),
            ):
                took = []
                for _ in range(calls):
                    started = time.perf_counter()
                    await call()
                    took.append(time.perf_counter() - started)
                    if gap:
                        await asyncio.sleep(gap)
                key = f"{name}_ms_{'idle_20ms' if gap else 'back_to_back'}"
                out[key] = round(statistics.median(took[calls // 4 :]) * 1000, 3)
    return out


def _cold_cpu(calls: int = 100) -> dict[str, float]:
    """The same CPU work (SmolLM2's chat template and tokenizer on one prompt) back to back and after
    20 ms of sleep: what a process pays for having been idle, before any gRPC is involved."""
    from llmmesh.common.model_assets import load_model_assets

    assets = load_model_assets()
    messages = [{"role": "user", "content": "Tell me about lighthouses and their keepers."}]
    out = {}
    for gap in (0.0, 0.02):
        took = []
        for _ in range(calls):
            started = time.perf_counter()
            assets.encode(assets.render_chat(messages))
            took.append(time.perf_counter() - started)
            if gap:
                time.sleep(gap)
        out[f"template_and_tokenize_ms_{'idle_20ms' if gap else 'back_to_back'}"] = round(
            statistics.median(took[calls // 4 :]) * 1000, 3
        )
    return out


async def _measure(mesh: Any, built: Any, duration: float) -> dict[str, Any]:
    level = Level("closed", concurrency=1, duration=duration, warmup=2.0)
    figures: dict[str, Any] = {}
    for name, kind, address in (
        ("direct", DirectClient, mesh.triton.grpc_url),
        ("mesh", MeshClient, mesh.address("gateway")),
    ):
        client = kind(address, built)
        result = await run_level(client, level, progress=False)
        await client.close()
        figures[name] = summarize(result.records, result.duration, result.window_tokens)
    direct, through = figures["direct"], figures["mesh"]
    p50 = {
        "direct_ttft": direct["ttft_ms"]["p50"],
        "mesh_ttft": through["ttft_ms"]["p50"],
        "gateway_ttft": through["gateway_ttft_ms"]["p50"],
        "gateway_queue": through["gateway_queue_ms"]["p50"],
    }
    return {
        "p50_ms": p50,
        "added_ttft_ms": round(p50["mesh_ttft"] - p50["direct_ttft"], 3),
        "split_ms": {
            "gateway_queue": p50["gateway_queue"],
            "client_gateway": round(p50["mesh_ttft"] - p50["gateway_ttft"], 3),
            "infer_and_text": round(p50["gateway_ttft"] - p50["gateway_queue"] - p50["direct_ttft"], 3),
        },
        "requests": {"direct": direct["completed"], "mesh": through["completed"]},
        "errors": {"direct": direct["errors"], "mesh": through["errors"]},
        # Only where preprocess is a process of its own.
        "rpc_latency": await _rpc_latency(mesh.address("preprocess")) if "preprocess" in mesh.services else None,
    }


def run(args: argparse.Namespace) -> int:
    import uvloop

    # Short answers: the first token is what is measured, and more requests fit in the window.
    workload = dataclasses.replace(WORKLOADS[args.workload], max_tokens=args.max_tokens)
    built = build(workload, "instrument")
    log_dir = RESULTS / "tmp" / "logs" / f"first-token-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for index, (layout, in_gateway) in enumerate(LAYOUTS.items()):
        for pii in (True, False):
            with running_mesh(
                args.ttft_ms,
                args.itl_ms,
                log_dir / f"{index}-pii-{int(pii)}",
                pii=pii,
                in_gateway=in_gateway,
            ) as mesh:
                row = {"layout": layout, "pii_redaction": "on" if pii else "off"}
                row.update(uvloop.run(_measure(mesh, built, args.duration)))
            rows.append(row)
            split = row["split_ms"]
            print(
                f"{layout:<27} PII {row['pii_redaction']:<3}  added TTFT p50 {row['added_ttft_ms']:6.2f} ms = "
                f"gateway queue {split['gateway_queue']:.2f} + client↔gateway {split['client_gateway']:.2f} + "
                f"infer and text {split['infer_and_text']:.2f}   | {row['rpc_latency']}"
            )
    cold = _cold_cpu()
    print(f"the same CPU work, back to back and after 20 ms idle: {cold}")
    out = {
        "command": " ".join(["python -m loadtest", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {
            "workload": args.workload,
            "max_tokens": args.max_tokens,
            "ttft_ms": args.ttft_ms,
            "itl_ms": args.itl_ms,
            "duration_s": args.duration,
        },
        "rows": rows,
        "cold_cpu": cold,
    }
    path = args.out or RESULTS / "first_token.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {path}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("first-token", help="split the mesh's added TTFT at concurrency 1 (layouts × PII on/off)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per target and mesh")
    p.add_argument("--workload", default="chat-256")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=run)
