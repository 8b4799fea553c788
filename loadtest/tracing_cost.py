"""What tracing costs the mesh: throughput with tracing disabled, sampling 0.0 and sampling 1.0, in one run.

    .venv/bin/python -m loadtest.tracing_cost --concurrency 8 --seconds 15

Each mode starts its own mesh in front of the benchmark instrument (20 ms TTFT, 10 ms ITL), runs the same
closed-loop workload against the gateway, and stops it. With tracing on, every service exports OTLP/HTTP to
a sink in this process that accepts and drops the spans (Triton's own tracing stays off: this measures the
mesh). Results go to loadtest/results/tracing_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc.aio

from llmmesh.launcher import SERVICES, free_port
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .harness import running_mesh

RESULTS = Path(__file__).parent / "results" / "tracing_cost.json"


class _Sink(BaseHTTPRequestHandler):
    received = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def _load(address: str, concurrency: int, seconds: float, warmup: float, max_tokens: int) -> dict[str, Any]:
    req = generation_pb2.GenerateRequest(
        prompt="Tell me a story.", sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )
    tokens = 0
    ttfts: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    stop_at = time.monotonic() + warmup + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def worker() -> None:
            nonlocal tokens
            while time.monotonic() < stop_at:
                start, first, n = time.monotonic(), None, 0
                try:
                    async for r in stub.Generate(req, timeout=60):
                        if r.HasField("chunk"):
                            first = first or time.monotonic()
                            n += len(r.chunk.token_ids)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                if measuring:
                    tokens += n
                    if first:
                        ttfts.append(first - start)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        measuring, t0 = True, time.monotonic()
        await asyncio.gather(*tasks)
        duration = time.monotonic() - t0
    return {
        "output_tokens_per_s": round(tokens / duration, 1),
        "ttft_ms_p50": round(statistics.median(ttfts) * 1000, 2) if ttfts else float("nan"),
        "requests": len(ttfts),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    sink = ThreadingHTTPServer(("127.0.0.1", free_port()), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}"
    modes: dict[str, dict[str, str]] = {"disabled": {}}
    for ratio in ("0.0", "1.0"):
        env = {}
        for name in SERVICES:
            env[f"LLMMESH_{name.upper()}_OTLP_ENDPOINT"] = endpoint
            env[f"LLMMESH_{name.upper()}_TRACE_SAMPLE_RATIO"] = ratio
        modes[f"sampling {ratio}"] = env
    results: dict[str, Any] = {}
    for mode, env in modes.items():
        before = _Sink.received
        with tempfile.TemporaryDirectory() as logs, running_mesh(20, 10, Path(logs), env) as mesh:
            results[mode] = asyncio.run(
                _load(mesh.address("gateway"), args.concurrency, args.seconds, args.warmup, args.max_tokens)
            )
        results[mode]["otlp_exports"] = _Sink.received - before
        print(mode, json.dumps(results[mode]))
    sink.shutdown()
    base = results["disabled"]["output_tokens_per_s"]
    for r in results.values():
        r["throughput_vs_disabled"] = round(r["output_tokens_per_s"] / base, 3) if base else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": f"python -m loadtest.tracing_cost --concurrency {args.concurrency} --seconds {args.seconds}",
                "instrument": {"ttft_ms": 20, "itl_ms": 10, "max_tokens": args.max_tokens},
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
