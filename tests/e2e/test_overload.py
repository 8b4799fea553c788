"""Overload: four times the gateway's capacity for 30 s, with interactive requests in the middle of it.

The mesh is real processes (Triton serving the benchmark instrument at 20 ms to first token and 10 ms
between tokens, and the four services) with small capacities: 8 generations in flight and 8 queued.
64 BATCH clients loop for 30 s (each waits what the server's retry information says after a refusal);
meanwhile one INTERACTIVE client asks again and again. Expected: the excess is refused at once with
RESOURCE_EXHAUSTED and retry information, every admitted request ends with a final message, no process
grows past a memory bound, and interactive requests keep their time to first token (compared with an
unloaded baseline taken in the same test, with a generous margin: a behaviour check, not a benchmark)
while batch requests wait in the queue.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.client.retry import retry_after_from_metadata
from llmmesh.launcher import SERVICES, Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtest import procstats  # noqa: E402 - loadtest/ is importable from the repository root only
from loadtest.harness import mesh_pids, running_mesh  # noqa: E402

pytestmark = pytest.mark.e2e

MAX_INFLIGHT = 8
MAX_QUEUED = 8
CLIENTS = 4 * (MAX_INFLIGHT + MAX_QUEUED)
LOAD_SECONDS = 30.0
RSS_LIMIT_MIB = 1024  # 1 GiB per process
BATCH_TOKENS = 16
INTERACTIVE_TOKENS = 8


@pytest.fixture(scope="module")
def overload_mesh() -> Iterator[Mesh]:
    env = {
        "LLMMESH_GATEWAY_MAX_INFLIGHT": str(MAX_INFLIGHT),
        "LLMMESH_GATEWAY_MAX_QUEUED": str(MAX_QUEUED),
        "LLMMESH_GATEWAY_LOG_LEVEL": "warning",
        "LLMMESH_INFER_LOG_LEVEL": "warning",
    }
    with (
        tempfile.TemporaryDirectory(prefix="llmmesh-overload-") as tmp,
        running_mesh(ttft_ms=20, itl_ms=10, log_dir=Path(tmp), env=env, pii=False) as mesh,
    ):
        yield mesh


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    retry_delays: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    sent: int = 0


def _retry_delay(err: grpc.aio.AioRpcError) -> tuple[float | None, float | None]:
    """(RetryInfo delay from grpc-status-details-bin, retry-after-ms trailer), in seconds."""
    info_delay = trailer = None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    info_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        elif key == "retry-after-ms":
            trailer = float(value) / 1000
    return info_delay, trailer


async def _one(
    stub: generation_pb2_grpc.GenerationServiceStub, priority: int, max_tokens: int, tally: Tally
) -> float | None:
    """One request; returns how long to wait before the next (after a refusal) or None."""
    # Sampled without a seed and a prompt of its own: never shared with another request or replayed from
    # the result cache, so every admitted request is a generation of its own.
    tally.sent += 1
    request = generation_pb2.GenerateRequest(
        prompt=f"Tell me about the sea ({priority}, {tally.sent}).",
        sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0),
        priority=priority,  # type: ignore[arg-type]
    )
    start = time.perf_counter()
    first: float | None = None
    final = False
    try:
        async for response in stub.Generate(request, timeout=60):
            if response.HasField("final"):
                final = True
            elif first is None and response.chunk.text:
                first = time.perf_counter() - start
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            tally.failures.append(f"{err.code().name}: {err.details()}")
            return None
        tally.outcomes["rejected"] += 1
        info_delay, trailer = _retry_delay(err)
        details = err.details() or ""
        if info_delay is None or trailer is None or not details.startswith("gateway at capacity: "):
            tally.failures.append(f"refusal without retry information: {details!r} {info_delay} {trailer}")
            return None
        if retry_after_from_metadata(err.trailing_metadata() or ()) != info_delay or abs(trailer - info_delay) > 0.001:
            tally.failures.append(f"the client library reads another delay: {info_delay} {trailer}")
        tally.retry_delays.append(info_delay)
        return info_delay
    if not final:
        tally.failures.append("admitted request ended without a final message")
        return None
    tally.outcomes["completed"] += 1
    if first is not None:
        tally.ttfts.append(first)
    return None


def _gateway_metrics(mesh: Mesh) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(mesh.ports.metrics_url("gateway"), timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("llmmesh_admission")
        for s in family.samples
    }


async def test_four_times_capacity_sheds_the_excess_and_keeps_interactive_latency(overload_mesh: Mesh) -> None:
    """4x capacity for 30 s: excess refused with retry info, admitted ones complete, RSS bounded, voice stays fast."""
    mesh = overload_mesh
    channel = grpc.aio.insecure_channel(mesh.address("gateway"))
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    try:
        baseline = Tally()
        for _ in range(3):  # warm-up
            await _one(stub, generation_pb2.PRIORITY_INTERACTIVE, INTERACTIVE_TOKENS, Tally())
        for _ in range(10):
            await _one(stub, generation_pb2.PRIORITY_INTERACTIVE, INTERACTIVE_TOKENS, baseline)
        assert not baseline.failures and len(baseline.ttfts) == 10

        batch, interactive = Tally(), Tally()
        rss_max: dict[str, float] = {}
        depth_max: Counter[str] = Counter()
        stop_at = time.monotonic() + LOAD_SECONDS

        async def batch_client() -> None:
            while time.monotonic() < stop_at:
                wait = await _one(stub, generation_pb2.PRIORITY_BATCH, BATCH_TOKENS, batch)
                if wait is not None:
                    await asyncio.sleep(min(max(wait, 0.05), 1.0))

        async def interactive_client() -> None:
            await asyncio.sleep(3.0)  # let the queue fill first
            while time.monotonic() < stop_at - 1.0:
                await _one(stub, generation_pb2.PRIORITY_INTERACTIVE, INTERACTIVE_TOKENS, interactive)
                await asyncio.sleep(0.3)

        async def watch() -> None:
            pids = mesh_pids(mesh)
            while time.monotonic() < stop_at:
                for name, proc in procstats.sample_all(pids).items():
                    rss_max[name] = max(rss_max.get(name, 0.0), proc.rss_mib)
                samples = await asyncio.to_thread(_gateway_metrics, mesh)
                for (name, labels), value in samples.items():
                    if name == "llmmesh_admission_queue_depth":
                        priority = dict(labels)["priority"]
                        depth_max[priority] = max(depth_max[priority], int(value))
                await asyncio.sleep(1.0)

        await asyncio.gather(*(batch_client() for _ in range(CLIENTS)), interactive_client(), watch())
        metrics = _gateway_metrics(mesh)
    finally:
        await channel.close()

    base = statistics.median(baseline.ttfts)
    loaded = statistics.median(interactive.ttfts) if interactive.ttfts else float("inf")
    rejections = {dict(k[1])["reason"]: v for k, v in metrics.items() if k[0] == "llmmesh_admission_rejections_total"}
    waits = {
        dict(k[1])["priority"]: v for k, v in metrics.items() if k[0] == "llmmesh_admission_queue_wait_seconds_sum"
    }
    print(
        f"\nbatch {dict(batch.outcomes)}, interactive {dict(interactive.outcomes)}, rejections by reason {rejections}"
        f"\ninteractive TTFT median: unloaded {base * 1000:.1f} ms, loaded {loaded * 1000:.1f} ms"
        f" (max {max(interactive.ttfts, default=0) * 1000:.1f} ms, n={len(interactive.ttfts)})"
        f"\nbatch TTFT median {statistics.median(batch.ttfts) * 1000:.1f} ms;"
        f" retry-after median {statistics.median(batch.retry_delays or [0]) * 1000:.0f} ms"
        f"\nqueue depth max {dict(depth_max)}; queue wait sum by priority {waits}"
        f"\nmax RSS MiB { {k: round(v) for k, v in rss_max.items()} }"
    )

    # The excess was refused, with retry information, and nothing admitted failed.
    assert not batch.failures, batch.failures[:5]
    assert not interactive.failures, interactive.failures[:5]
    assert batch.outcomes["rejected"] > 100 and batch.outcomes["completed"] > 100
    assert all(d > 0 for d in batch.retry_delays)
    # Batch requests waited in the queue; interactive requests were never refused and were not held back.
    assert depth_max["batch"] > 0 and waits.get("batch", 0) > 0
    assert interactive.outcomes["rejected"] == 0 and interactive.outcomes["completed"] >= 10
    assert loaded <= 2 * base + 0.3, f"interactive TTFT {loaded:.3f} s under load vs {base:.3f} s unloaded"
    # Memory stayed bounded and every process is still there and serving.
    assert rss_max and all(v < RSS_LIMIT_MIB for v in rss_max.values()), rss_max
    assert all(proc.poll() is None for proc in mesh.procs.values())
    for name in SERVICES:
        with grpc.insecure_channel(mesh.address(name)) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
