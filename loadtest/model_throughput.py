"""The CPU model's own speed through a real Triton (no mesh): tokens/s and time to first token.

    .venv/bin/python loadtest/model_throughput.py --concurrency 1 4 --requests 8 --max-tokens 96

Starts its own Triton on free loopback ports, sends greedy requests straight to ModelStreamInfer
with infer's own Triton client, and writes loadtest/results/model_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from llmmesh.common.model_assets import load_model_assets
from llmmesh.infer.backend import Generation, TritonBackend
from llmmesh.infer.triton_server import TritonServer
from llmmesh.launcher import free_ports

PROMPTS = [
    "Write a long story about a dragon.",
    "Explain how a bicycle works.",
    "Describe the water cycle in detail.",
    "Write a poem about the sea.",
]


async def _one(backend: TritonBackend, ids: list[int], max_tokens: int, i: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    n = 0
    gen = Generation(f"bench-{i}", "smollm2", ids, max_tokens, 2, 2, 0.0, 1.0, 0, None)
    async for chunk in backend.generate(gen):
        if first is None:
            first = time.perf_counter()
        n += len(chunk)
    end = time.perf_counter()
    return (first or end) - start, end - start, n


async def _level(
    backend: TritonBackend, prompts: list[list[int]], concurrency: int, requests: int, max_tokens: int
) -> dict:
    queue = list(range(requests))
    results: list[tuple[float, float, int]] = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            results.append(await _one(backend, prompts[i % len(prompts)], max_tokens, i))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - started
    tokens = sum(n for _, _, n in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "duration_s": round(duration, 3),
        "output_tokens_per_s": round(tokens / duration, 1),
        "ttft_ms_p50": round(statistics.median(t for t, _, _ in results) * 1000, 1),
        "per_stream_tokens_per_s_p50": round(statistics.median(n / max(e - t, 1e-9) for t, e, n in results), 1),
    }


async def _main(args: argparse.Namespace) -> list[dict]:
    assets = load_model_assets()
    prompts = [
        assets.encode(
            assets.render_chat(
                [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
            )
        )
        for p in PROMPTS
    ]
    ports = free_ports(3)
    with TritonServer(*ports):
        backend = TritonBackend(f"127.0.0.1:{ports[0]}", {"smollm2": "smollm2"})
        await _level(backend, prompts, 1, 1, 16)  # warm-up, excluded
        out = [await _level(backend, prompts, c, args.requests, args.max_tokens) for c in args.concurrency]
        await backend.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_throughput.json")
    args = parser.parse_args()
    results = asyncio.run(_main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"command": "loadtest/model_throughput.py", "max_tokens": args.max_tokens, "levels": results}, indent=2
        )
        + "\n"
    )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
