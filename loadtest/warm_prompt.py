"""Time to first token of a voice turn whose prompt was warmed while the user spoke, vs cold, side by side.

    .venv/bin/python -m loadtest.warm_prompt --rounds 12     → results/warm_prompt.json

Starts the real mesh (Triton serving SmolLM2 through llama.cpp, the safety classifier, the four services;
dedup off) unless `--address` names a running gateway. Each turn is a new user text of about 100 prompt
tokens (a note number, four sentences of `prompts/safety_labelled.jsonl`'s benign set and a question) that
starts unlike any other, so nothing but the chat template and system prompt can already be in the model's
prompt cache. Per round, in
rotating order, one turn of each variant over `Converse`:

- cold: the request alone;
- cold (A/A): the same again, another text: the spread between two identical variants;
- warm, 1000 ms and 400 ms: an interim turn (the text without its last four words) that long before the
  request, as a speech recogniser's interim transcript comes while the user says the last words;
- warm, 0 ms: the interim and the request back to back (the request waits for the warm-up's prefill).

TTFT is measured by the client from sending the request (not the interim) to the first chunk with text,
and by the gateway (Final.timings, from the request's arrival). Greedy, one token per answer: its text
leaves at the end of the generation, so the safety layer's sentence hold does not add later tokens' time,
and TTFT is the prompt's processing and the first token (what a warm-up can save), plus the mesh. The
model's own counters (llmmesh_model_prompt_tokens_total) tell how many prompt tokens each turn (warm-up
and request together) took from llama.cpp's prompt cache and how many it computed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc.aio

from llmmesh.launcher import Mesh, MeshPorts
from llmmesh.v1 import generation_pb2 as G
from llmmesh.v1 import generation_pb2_grpc

from .metrics import distribution

RESULTS = Path(__file__).parent / "results" / "warm_prompt.json"
SENTENCES = Path(__file__).parent / "prompts" / "safety_labelled.jsonl"
VARIANTS = ("cold", "cold_aa", "warm_1000ms", "warm_400ms", "warm_0ms")
PAUSE = {"warm_1000ms": 1.0, "warm_400ms": 0.4, "warm_0ms": 0.0}


def turns(count: int) -> list[str]:
    """`count` distinct user turns: four benign sentences (a different set each) and a question."""
    rows = [json.loads(line) for line in SENTENCES.read_text(encoding="utf-8").splitlines() if line.strip()]
    benign = [r["text"] for r in rows if r["label"] == "benign"]
    out = []
    for k in range(count):
        picked = [benign[(k * 4 + j * 13) % len(benign)] for j in range(4)]
        # The turn's number first: no turn starts like another (llama.cpp reuses a cached prompt's prefix).
        out.append(f"Note {k}. " + " ".join(picked) + " What do these four things have in common, in one sentence?")
    return out


def interim_of(text: str, drop_words: int = 4) -> str:
    """The transcript before the user's last words."""
    return text.rsplit(" ", drop_words)[0]


def prompt_tokens(metrics_url: str | None) -> dict[str, float]:
    """The model's prompt tokens so far by source ("cached", "computed"), from Triton's metrics; {} without."""
    if not metrics_url:
        return {}
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmmesh_model_prompt_tokens_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            out[source] = out.get(source, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _request(text: str) -> G.GenerateRequest:
    return G.GenerateRequest(
        prompt=text,
        sampling=G.SamplingParams(max_tokens=1, temperature=0.0),
        chunking=G.CHUNKING_MODE_TOKEN,
        fresh=True,
    )


async def one_turn(
    stub: generation_pb2_grpc.GenerationServiceStub, text: str, pause: float | None, metrics: str | None
) -> dict[str, Any]:
    """One Converse turn; `pause` None: cold; else the interim goes `pause` seconds before the request. With
    Triton's `metrics` URL, the prompt tokens the model took from its cache and computed for the request."""
    before = await asyncio.to_thread(prompt_tokens, metrics)
    call = stub.Converse(timeout=120)
    if pause is not None:
        await call.write(G.ConverseRequest(interim=_request(interim_of(text))))
        await asyncio.sleep(pause)
    sent = time.monotonic()
    await call.write(G.ConverseRequest(generate=_request(text)))
    await call.done_writing()
    first: float | None = None
    final: G.Final | None = None
    async for response in call:
        if response.HasField("chunk") and response.chunk.text and first is None:
            first = time.monotonic()
        elif response.HasField("final"):
            final = response.final
    assert first is not None and final is not None, "a turn ended without text or final"
    await asyncio.sleep(0.05)  # the model counts a request once its engine task has returned
    after = await asyncio.to_thread(prompt_tokens, metrics)
    return {
        "client_ttft_s": first - sent,
        "gateway_ttft_ms": final.timings.time_to_first_token_ms,
        "prompt_tokens": final.usage.prompt_tokens,
        # The turn's: its warm-up's and its request's together.
        "cached": after.get("cached", 0.0) - before.get("cached", 0.0) if before else None,
        "computed": after.get("computed", 0.0) - before.get("computed", 0.0) if before else None,
    }


async def bench(address: str, rounds: int, metrics: str | None) -> dict[str, Any]:
    texts = iter(turns(rounds * len(VARIANTS) + 1))
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        await one_turn(stub, next(texts), None, metrics)  # warm-up of the mesh itself, not counted
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                pause = PAUSE.get(variant)
                results[variant].append(await one_turn(stub, next(texts), pause, metrics))
    out: dict[str, Any] = {}
    for variant, runs in results.items():
        client = distribution(r["client_ttft_s"] for r in runs)
        gateway = distribution(r["gateway_ttft_ms"] / 1000.0 for r in runs)
        out[variant] = {
            "turns": len(runs),
            "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in runs),
            "computed_prompt_tokens_median": _median([r["computed"] for r in runs if r["computed"] is not None]),
            "cached_prompt_tokens_median": _median([r["cached"] for r in runs if r["cached"] is not None]),
            "client_ttft_ms": client.as_dict() if client else None,
            "gateway_ttft_ms": gateway.as_dict() if gateway else None,
        }
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@contextlib.contextmanager
def _gateway(address: str | None, metrics: str | None, log_dir: Path) -> Iterator[tuple[str, str | None]]:
    if address:
        yield address, metrics
        return
    mesh = Mesh(ports=MeshPorts.free(), log_dir=log_dir, env={"LLMMESH_INFER_DEDUP": "false"})
    mesh.start()
    try:
        assert mesh.triton is not None
        yield mesh.address("gateway"), mesh.triton.metrics_url
    finally:
        mesh.stop()


def table(results: dict[str, Any]) -> str:
    cold = results["cold"]["client_ttft_ms"]["p50"]
    lines = [
        "| variant | turns | prompt tokens | computed / from cache (median) | client TTFT p50 / p90 (ms) "
        "| gateway TTFT p50 (ms) | p50 vs cold |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, entry in results.items():
        c, g = entry["client_ttft_ms"], entry["gateway_ttft_ms"]
        lines.append(
            f"| {variant} | {entry['turns']} | {entry['prompt_tokens_median']:g} "
            f"| {_n(entry['computed_prompt_tokens_median'])} / {_n(entry['cached_prompt_tokens_median'])} "
            f"| {c['p50']:.0f} / {c['p90']:.0f} "
            f"| {g['p50']:.0f} | {c['p50'] / cold:.2f} |"
        )
    return "\n".join(lines)


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.warm_prompt", description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running gateway; default: start the real mesh on free ports")
    parser.add_argument("--triton-metrics", help="with --address: Triton's metrics URL, for the prompt-cache counts")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with _gateway(args.address, args.triton_metrics, RESULTS.parent / "tmp" / "warm_prompt" / "logs") as (
        address,
        metrics,
    ):
        results = asyncio.run(bench(address, args.rounds, metrics))
    report = {
        "command": f"python -m loadtest.warm_prompt --rounds {args.rounds}",
        "mesh": args.address or "started here: Triton (smollm2 via llama.cpp, safety_classifier) + 4 services",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "wall_seconds": round(time.monotonic() - started, 1),
        "variants": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\n{report['command']}: {report['wall_seconds']} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
