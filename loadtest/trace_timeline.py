"""Where one answer's first speakable chunk waits: every span of its trace, on one time line.

    .venv/bin/python -m loadtest.trace_timeline --requests 16   → results/trace_timeline.json

Starts the real mesh (the shipped registry and policy: SmolLM2 on llama.cpp, the safety classifier; dedup
off) with every service exporting its spans over OTLP, and Triton its own, to the OTLP receiver of the e2e
tests (tests/e2e/otlp_receiver.py). Sends `--requests` voice-style requests one at a time (CLAUSE chunking,
greedy, `fresh`, 0.3 s apart; two more first, not counted), each under a client span whose context goes
with it, and notes when the first chunk with text arrives. Then, per span (service, name and its
occurrence in the trace: `triton:safety_classifier#2` is the second classifier execution, the first
clause's check), the median start relative to the moment the client called, and the median duration, in
the order they start; the client's first chunk is a row too. Tracing costs the services some CPU (every
span is exported), so the absolute times are a little later than `voice_bench`'s; the order and the
sizes of the steps are what this is for.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider

from llmmesh.client import AsyncClient, Chunking
from llmmesh.launcher import Mesh, MeshPorts
from tests.e2e.otlp_receiver import OtlpReceiver

RESULTS = Path(__file__).parent / "results" / "trace_timeline.json"
PROMPT = "Describe Paris in a few sentences."


async def _send(address: str, requests: int, max_tokens: int) -> list[tuple[str, int, int]]:
    """(trace id, call time, first text time) per counted request, in ns of the wall clock (as spans are)."""
    tracer = TracerProvider().get_tracer("loadtest.trace_timeline")
    sent: list[tuple[str, int, int]] = []
    async with AsyncClient(address) as client:
        for i in range(requests + 2):
            with tracer.start_as_current_span("client") as span:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                called, first = time.time_ns(), 0
                stream = client.generate(
                    PROMPT,
                    max_tokens=max_tokens,
                    temperature=0.0,
                    chunking=Chunking.CLAUSE,
                    fresh=True,
                    metadata=tuple(carrier.items()),
                )
                async for chunk in stream:
                    if not first and chunk.text:
                        first = time.time_ns()
                trace_id = format(span.get_span_context().trace_id, "032x")
            if i >= 2 and first:
                sent.append((trace_id, called, first))
            await asyncio.sleep(0.3)
    return sent


def timeline(receiver: OtlpReceiver, sent: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    rows: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    spans = receiver.snapshot()
    for trace_id, called, first in sent:
        rows["client:first chunk with text"].append(((first - called) / 1e6, 0.0))
        seen: collections.Counter[tuple[str, str]] = collections.Counter()
        for span in sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns):
            seen[(span.service, span.name)] += 1
            key = f"{span.service}:{span.name}#{seen[(span.service, span.name)]}"
            rows[key].append(((span.start_ns - called) / 1e6, (span.end_ns - span.start_ns) / 1e6))
    table = [
        {
            "span": key,
            "traces": len(values),
            "start_ms_p50": round(statistics.median(v[0] for v in values), 2),
            "duration_ms_p50": round(statistics.median(v[1] for v in values), 2),
        }
        for key, values in rows.items()
    ]
    return sorted(table, key=lambda row: row["start_ms_p50"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.trace_timeline", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    receiver = OtlpReceiver()
    receiver.start()
    try:
        with tempfile.TemporaryDirectory(prefix="llmmesh-timeline-") as tmp:
            mesh = Mesh(
                ports=MeshPorts.free(),
                log_dir=Path(tmp),
                env={"LLMMESH_INFER_DEDUP": "false"},
                otlp_endpoint=receiver.grpc_endpoint,
                otlp_protocol="grpc",
                triton_trace_url=receiver.http_traces_url,
            )
            mesh.start()
            try:
                sent = asyncio.run(_send(mesh.address("gateway"), args.requests, args.max_tokens))
                time.sleep(8)  # the services' batch exporters flush every 5 s
            finally:
                mesh.stop()
        rows = timeline(receiver, sent)
    finally:
        receiver.stop()
    report = {
        "command": f"python -m loadtest.trace_timeline --requests {args.requests}",
        "prompt": PROMPT,
        "wall_seconds": round(time.monotonic() - started, 1),
        "spans": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print("| span | traces | start p50 (ms) | duration p50 (ms) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['span']} | {row['traces']} | {row['start_ms_p50']} | {row['duration_ms_p50']} |")
    print(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
