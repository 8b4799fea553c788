"""Routing by cost, latency and quality: the labelled prompts sent under each routing policy, side by side.

    .venv/bin/python -m loadtest.routing --out loadtest/results/routing-<date>.json   # --callers 8 --max-tokens 24

Starts a mesh with the shipped model registry (Triton serving SmolLM2-135M and Gemma 3 270M, the four
services, logs in a temporary folder), or uses the one at `--address`, and sends every prompt of
`loadtest/prompts/routing.jsonl` under each policy in turn: the model `smollm2` ("always small"), the
model `gemma3-270m` ("always large"), and the routes `auto` (tiers by the complexity score), `careful` (the
cascade) and `ab` (the 50/50 split, sticky per caller). Requests are greedy (temperature 0) with a small
`max_tokens`, `fresh` (no joining or replay of an earlier identical generation, so every request is
generated and timed), at a fixed concurrency.

A split is sticky per caller, and the caller is the API key's identity: with `--callers N` the mesh is
started with N API keys (`LLMMESH_GATEWAY_API_KEYS`) and request i goes out with key i mod N. Without keys
every request comes from one caller, and `ab` sends them all to one arm.

Per request it records Final.model, Final.route, Final.usage (tokens, cost) and Final.timings (TTFT), with
the prompt's label. Per policy it reports each model's share of the requests, the cost per 1,000 requests
and its ratio to "always large", TTFT p50/p99 per answering model, the cascade's escalation rate (Final.route
says "escalated"), and the confusion of label against model (simple -> small, complex -> large). The JSON
goes to `--out`, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from llmmesh.launcher import Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .harness import started_on_free_ports

__all__ = ["POLICIES", "Policy", "Prompt", "Record", "load_prompts", "markdown", "percentile", "summarize"]

PROMPTS = Path(__file__).parent / "prompts" / "routing.jsonl"
SMALL, LARGE = "smollm2", "gemma3-270m"


@dataclass(frozen=True)
class Policy:
    name: str
    model: str  # what GenerateRequest.model names: a model or a route


POLICIES = (
    Policy("always small", SMALL),
    Policy("always large", LARGE),
    Policy("auto", "auto"),
    Policy("careful", "careful"),
    Policy("ab", "ab"),
)


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    label: str  # simple | complex
    category: str
    language: str
    split: str = ""


@dataclass(frozen=True)
class Record:
    policy: str
    prompt_id: str
    label: str
    caller: str
    model: str = ""
    route: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    error: str = ""  # the gRPC status code's name when the call failed


def load_prompts(path: Path = PROMPTS) -> list[Prompt]:
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompts.append(Prompt(**json.loads(line)))
    return prompts


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in (0, 100]); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _record(policy: Policy, prompt: Prompt, caller: str, final: generation_pb2.Final) -> Record:
    ttft = final.timings.time_to_first_token_ms
    return Record(
        policy=policy.name,
        prompt_id=prompt.id,
        label=prompt.label,
        caller=caller,
        model=final.model,
        route=final.route,
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        cost=final.usage.cost,
        # 0 = no chunk was sent (an empty answer): no first token to time.
        ttft_ms=ttft if ttft > 0 else None,
        total_ms=final.timings.total_ms,
    )


async def run_policy(
    stub: generation_pb2_grpc.GenerationServiceStub,
    policy: Policy,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int,
    concurrency: int,
    keys: Sequence[tuple[str, str]] = (),
    timeout: float = 300.0,
) -> list[Record]:
    """Every prompt under `policy`, `concurrency` at a time; records in prompt order."""
    records: list[Record | None] = [None] * len(prompts)
    queue = list(enumerate(prompts))
    queue.reverse()

    async def one(i: int, prompt: Prompt) -> Record:
        name, key = keys[i % len(keys)] if keys else ("", "")
        request = generation_pb2.GenerateRequest(
            request_id=f"routing-{policy.model}-{prompt.id}",
            prompt=prompt.prompt,
            model=policy.model,
            sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
            fresh=True,
        )
        metadata = (("x-api-key", key),) if key else ()
        try:
            final = None
            async for response in stub.Generate(request, metadata=metadata, timeout=timeout):
                if response.HasField("final"):
                    final = response.final
            if final is None:
                return Record(policy.name, prompt.id, prompt.label, name, error="NO_FINAL")
            return _record(policy, prompt, name, final)
        except grpc.aio.AioRpcError as exc:
            return Record(policy.name, prompt.id, prompt.label, name, error=exc.code().name)

    async def worker() -> None:
        while queue:
            i, prompt = queue.pop()
            records[i] = await one(i, prompt)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in records if r is not None]


def summarize(records: Sequence[Record], policies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per policy: shares, cost per 1,000 requests (and / always large), TTFT per model, escalations,
    label x model confusion. Failed requests are counted apart and left out of everything else."""
    out: dict[str, dict[str, Any]] = {}
    for policy in policies:
        mine = [r for r in records if r.policy == policy]
        ok = [r for r in mine if not r.error]
        n = len(ok)
        models = Counter(r.model for r in ok)
        ttft: dict[str, dict[str, float | int | None]] = {}
        for model in sorted(models):
            values = [r.ttft_ms for r in ok if r.model == model and r.ttft_ms is not None]
            ttft[model] = {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}
        confusion = Counter(f"{r.label}->{r.model}" for r in ok)
        simple = [r for r in ok if r.label == "simple"]
        complex_ = [r for r in ok if r.label == "complex"]
        out[policy] = {
            "requests": len(mine),
            "errors": dict(Counter(r.error for r in mine if r.error)),
            "share": {m: models[m] / n for m in sorted(models)} if n else {},
            "cost_per_1000": 1000 * sum(r.cost for r in ok) / n if n else None,
            "completion_tokens_mean": sum(r.completion_tokens for r in ok) / n if n else None,
            "ttft_ms": ttft,
            "ttft_ms_all": {
                "p50": percentile([r.ttft_ms for r in ok if r.ttft_ms is not None], 50),
                "p99": percentile([r.ttft_ms for r in ok if r.ttft_ms is not None], 99),
            },
            "escalation_rate": sum("escalated" in r.route for r in ok) / n if n else None,
            "confusion": dict(sorted(confusion.items())),
            # The label's model: simple -> small, complex -> large (what an ideal router would do).
            "simple_to_small": sum(r.model == SMALL for r in simple) / len(simple) if simple else None,
            "complex_to_large": sum(r.model == LARGE for r in complex_) / len(complex_) if complex_ else None,
            "callers": len({r.caller for r in mine}),
        }
    large = out.get("always large", {}).get("cost_per_1000")
    for summary in out.values():
        cost = summary["cost_per_1000"]
        summary["cost_vs_always_large"] = cost / large if cost is not None and large else None
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a markdown table, one row per policy."""
    lines = [
        f"| policy | requests | errors | {SMALL} share | cost / 1,000 req | vs always large | TTFT p50 / p99 "
        f"{SMALL} (ms) | TTFT p50 / p99 {LARGE} (ms) | escalated | simple->small | complex->large |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for policy, s in summary.items():
        t_small = s["ttft_ms"].get(SMALL, {})
        t_large = s["ttft_ms"].get(LARGE, {})
        lines.append(
            f"| {policy} | {s['requests']} | {sum(s['errors'].values())} | {_fmt(s['share'].get(SMALL, 0.0), '.0%')} "
            f"| {_fmt(s['cost_per_1000'], '.3f')} | {_fmt(s['cost_vs_always_large'], '.2f')} "
            f"| {_fmt(t_small.get('p50'), '.0f')} / {_fmt(t_small.get('p99'), '.0f')} "
            f"| {_fmt(t_large.get('p50'), '.0f')} / {_fmt(t_large.get('p99'), '.0f')} "
            f"| {_fmt(s['escalation_rate'], '.0%')} | {_fmt(s['simple_to_small'], '.0%')} "
            f"| {_fmt(s['complex_to_large'], '.0%')} |"
        )
    return "\n".join(lines)


def api_keys(callers: int) -> list[tuple[str, str]]:
    """N (name, key) pairs for the benchmark's callers: fresh random keys, so a run's keys open nothing else."""
    return [(f"bench{i:03d}", os.urandom(16).hex()) for i in range(callers)]


@contextlib.contextmanager
def started_mesh(log_dir: Path, keys: Sequence[tuple[str, str]]) -> Iterator[Mesh]:
    """The shipped registry's mesh (every Triton model of it, the safety classifier) on free ports."""
    env = {"LLMMESH_GATEWAY_API_KEYS": json.dumps([f"{n}:{k}" for n, k in keys])} if keys else {}
    with started_on_free_ports(lambda ports: Mesh(ports=ports, log_dir=log_dir, env=env), timeout=600) as mesh:
        yield mesh


async def _run(
    address: str,
    policies: Sequence[Policy],
    prompts: Sequence[Prompt],
    args: argparse.Namespace,
    keys: Sequence[tuple[str, str]],
    save: Callable[[list[Record], dict[str, float]], None],
) -> tuple[list[Record], dict[str, float]]:
    records: list[Record] = []
    seconds: dict[str, float] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for policy in policies:
            start = time.monotonic()
            got = await run_policy(
                stub, policy, prompts, max_tokens=args.max_tokens, concurrency=args.concurrency, keys=keys
            )
            seconds[policy.name] = round(time.monotonic() - start, 1)
            errors = sum(1 for r in got if r.error)
            print(f"{policy.name}: {len(got)} requests, {errors} errors, {seconds[policy.name]} s", file=sys.stderr)
            records.extend(got)
            # After every policy: a run stopped part way keeps what it measured.
            save(records, seconds)
    return records, seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/routing.json"))
    parser.add_argument("--address", help="a running mesh's gateway (host:port); default: start one")
    parser.add_argument("--api-key", action="append", default=[], help="with --address: name:key, repeatable")
    parser.add_argument("--callers", type=int, default=0, help="start the mesh with N API keys, spread requests")
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--policies", nargs="+", default=[p.name for p in POLICIES], choices=[p.name for p in POLICIES])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (a quick check)")
    args = parser.parse_args(argv)

    prompts = load_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    policies = [p for p in POLICIES if p.name in args.policies]
    started = time.time()
    load_before = os.getloadavg()
    keys = (
        [(e.partition(":")[0], e.partition(":")[2]) for e in args.api_key] if args.address else api_keys(args.callers)
    )
    summary: dict[str, dict[str, Any]] = {}

    def save(records: list[Record], seconds: dict[str, float]) -> None:
        summary.clear()
        summary.update(summarize(records, list(seconds)))
        result = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "command": " ".join([Path(sys.executable).name, "-m", "loadtest.routing", *(argv or sys.argv[1:])]),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
            "settings": {
                "max_tokens": args.max_tokens,
                "concurrency": args.concurrency,
                "callers": len(keys) or 1,
                "prompts": len(prompts),
                "address": args.address or "started",
            },
            "seconds_per_policy": seconds,
            "summary": summary,
            "records": [asdict(r) for r in records],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    if args.address:
        asyncio.run(_run(args.address, policies, prompts, args, keys, save))
    else:
        with tempfile.TemporaryDirectory(prefix="llmmesh-routing-") as tmp, started_mesh(Path(tmp), keys) as mesh:
            asyncio.run(_run(mesh.address("gateway"), policies, prompts, args, keys, save))
    print(markdown(summary))
    print(f"\nresults: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
