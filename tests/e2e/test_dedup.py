"""Dedup end to end: identical requests share one generation, counted at the model inside Triton.

The session mesh runs the real SmolLM2 on a real Triton with dedup on (the default, in-process cache).
Each test uses prompts of its own (a fresh uuid), so nothing another test generated is a cache hit here.
The shared-cache test runs a second mesh with Redis and a second gateway + preprocess + infer set.
"""

from __future__ import annotations

import threading
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.common.registry import registry_file
from llmmesh.launcher import Mesh, MeshPorts, free_port
from llmmesh.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import RedisServer

from .conftest import settled_counters

pytestmark = pytest.mark.e2e

REUSE = generation_pb2.Reuse


@dataclass
class Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    final: generation_pb2.Final | None = None


def unique_prompt(topic: str = "the sea") -> str:
    return f"Write two sentences about {topic}. (ref {uuid.uuid4().hex[:8]})"


def greedy(prompt: str, max_tokens: int = 24, **kw: object) -> generation_pb2.GenerateRequest:
    stop = kw.pop("stop", [])
    sampling = generation_pb2.SamplingParams(max_tokens=max_tokens, stop=stop, **kw)  # type: ignore[arg-type]
    if not sampling.HasField("temperature"):
        sampling.temperature = 0.0
    return generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling)


def collect(
    stub: generation_pb2_grpc.GenerationServiceStub,
    req: generation_pb2.GenerateRequest,
    on_tokens: threading.Event | None = None,
    after: int = 10,
) -> Answer:
    answer = Answer()
    for r in stub.Generate(req, timeout=120):
        if r.HasField("chunk"):
            answer.text += r.chunk.text
            answer.token_ids.extend(r.chunk.token_ids)
            if on_tokens is not None and len(answer.token_ids) >= after:
                on_tokens.set()
        else:
            answer.final = r.final
    assert answer.final is not None
    return answer


def infer_metrics(mesh: Mesh) -> dict[str, float]:
    """Infer's dedup and cache metrics from its Prometheus endpoint."""
    with urllib.request.urlopen(mesh.ports.metrics_url("infer"), timeout=5) as resp:
        text = resp.read().decode()
    out = {"in_flight": 0.0, "request_id": 0.0, "hit": 0.0, "miss": 0.0, "cache_bytes": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmmesh_dedup_joins_total":
                out[sample.labels["kind"]] = sample.value
            elif sample.name == "llmmesh_cache_lookups_total":
                out[sample.labels["result"]] = sample.value
            elif sample.name == "llmmesh_cache_bytes":
                out["cache_bytes"] = sample.value
    return out


def generations(before: dict[str, float], after: dict[str, float]) -> float:
    """Requests the model itself saw between two counter readings (completed + cancelled)."""
    return sum(after.get(k, 0.0) - before.get(k, 0.0) for k in ("completed", "cancelled"))


def test_twenty_identical_greedy_requests_cause_one_generation(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub
) -> None:
    req = greedy(unique_prompt(), max_tokens=32)
    before = settled_counters(mesh)
    infer_before = infer_metrics(mesh)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: collect(gateway, req), range(20)))
    after = settled_counters(mesh)
    assert generations(before, after) == 1
    infer_after = infer_metrics(mesh)
    delta = {k: infer_after.get(k, 0.0) - infer_before.get(k, 0.0) for k in infer_after}
    # Infer's own count: one cache miss (the leader), the others joined in flight or hit the cache.
    assert delta["miss"] == 1 and delta["in_flight"] + delta["hit"] == 19
    assert infer_after["cache_bytes"] > 0
    texts = {a.text for a in answers}
    assert len(texts) == 1 and next(iter(texts))
    assert {tuple(a.token_ids) for a in answers} == {tuple(answers[0].token_ids)}
    reuses = sorted(REUSE.Name(a.final.reuse) for a in answers if a.final)
    # One led the generation; every other one joined it in flight (or, arriving after it ended, hit the cache).
    assert reuses.count("REUSE_NONE") == 1
    assert set(reuses) <= {"REUSE_NONE", "REUSE_JOINED_IN_FLIGHT", "REUSE_CACHE_HIT"}
    assert all(a.final and a.final.usage.completion_tokens == len(answers[0].token_ids) for a in answers)


def test_a_follower_that_joins_after_the_tenth_token_gets_the_complete_text(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub
) -> None:
    req = greedy(unique_prompt("mountains"), max_tokens=64)
    before = settled_counters(mesh)
    tenth = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(collect, gateway, req, tenth, 10)
        assert tenth.wait(60)
        follower = pool.submit(collect, gateway, req).result()
        lead = leader.result()
    assert follower.text == lead.text and follower.token_ids == lead.token_ids
    assert len(lead.token_ids) > 10
    assert follower.final is not None and follower.final.reuse in (REUSE.REUSE_JOINED_IN_FLIGHT, REUSE.REUSE_CACHE_HIT)
    assert generations(before, settled_counters(mesh)) == 1


def test_cancelling_the_leader_leaves_the_followers_complete(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub
) -> None:
    req = greedy(unique_prompt("rivers"), max_tokens=64)
    before = settled_counters(mesh)
    # The undisturbed answer, for comparison, comes from a second identical generation later.
    leader_call = gateway.Generate(req, timeout=120)
    got = 0
    for r in leader_call:
        got += len(r.chunk.token_ids)
        if got >= 3:
            break
    attached = [threading.Event() for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(collect, gateway, req, ev, 1) for ev in attached]
        # Cancel the leader once every follower has received text (it has joined the generation).
        assert all(ev.wait(60) for ev in attached)
        leader_call.cancel()
        answers = [f.result() for f in futures]
    assert all(a.final and a.final.finish_reason != generation_pb2.FINISH_REASON_CANCELLED for a in answers)
    assert len({a.text for a in answers}) == 1
    reference = collect(gateway, req)  # a cache hit of the completed generation
    assert reference.text == answers[0].text
    after = settled_counters(mesh)
    assert generations(before, after) == 1
    assert after.get("cancelled", 0) == before.get("cancelled", 0)


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"seed": 11},
        {"stop": ["zzz"]},
        {"max_tokens": 25},
    ],
    ids=["temperature", "seed", "stop strings", "max_tokens"],
)
def test_requests_that_differ_in_one_parameter_never_share(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub, change: dict[str, object]
) -> None:
    prompt = unique_prompt("forests")
    base = {"max_tokens": 24, "temperature": 0.0, "seed": 5}
    a = greedy(prompt, **base)  # type: ignore[arg-type]
    b = greedy(prompt, **{**base, **change})  # type: ignore[arg-type]
    before = settled_counters(mesh)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda r: collect(gateway, r), [a, b]))
    assert generations(before, settled_counters(mesh)) == 2
    assert all(x.final and x.final.reuse == REUSE.REUSE_NONE for x in answers)


def test_a_sampled_request_without_a_seed_says_it_cannot_share(
    gateway: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    answer = collect(gateway, greedy(unique_prompt(), max_tokens=4, temperature=0.8))
    assert answer.final is not None and answer.final.reuse == REUSE.REUSE_NOT_SHAREABLE
    assert "without a seed" in answer.final.reuse_detail


def test_a_resent_idempotency_key_replays_the_stored_result_without_generating(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub
) -> None:
    req = greedy(unique_prompt("clouds"), max_tokens=24, temperature=0.9)  # sampled: only the key can dedup
    req.idempotency_key = f"client-{uuid.uuid4().hex}"
    req.request_id = f"trace-{uuid.uuid4().hex}"
    first = collect(gateway, req)
    before = settled_counters(mesh)
    again = collect(gateway, req)
    assert generations(before, settled_counters(mesh)) == 0
    assert again.text == first.text and again.token_ids == first.token_ids
    assert again.final is not None and again.final.reuse == REUSE.REUSE_DEDUPLICATED
    assert again.final.request_id == req.request_id

    other = greedy(unique_prompt("stones"), max_tokens=4)
    other.idempotency_key = req.idempotency_key
    with pytest.raises(grpc.RpcError) as err:
        collect(gateway, other)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (err.value.details() or "")


def test_prompts_that_differ_in_layout_or_case_never_share(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub
) -> None:
    """The model sees what was written, so whitespace and case variants are generated for themselves."""
    tag = uuid.uuid4().hex[:8]
    first = collect(gateway, greedy(f"Name a café in Paris ({tag}).", max_tokens=8))
    again = collect(gateway, greedy(f"Name a café in Paris ({tag}).", max_tokens=8))
    assert again.final is not None and again.final.reuse == REUSE.REUSE_CACHE_HIT
    assert again.text == first.text
    for variant in (f"  Name a café   in\tParis ({tag}). ", f"NAME A CAFÉ IN PARIS ({tag})."):
        other = collect(gateway, greedy(variant, max_tokens=8))
        assert other.final is not None and other.final.reuse == REUSE.REUSE_NONE, variant


# ---- shared cache: two replica sets behind one Redis ---------------------------------------------


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Mesh]]:
    """Mesh A (Triton with the instrument, four services) and set B (gateway, preprocess, infer) on other
    ports, sharing A's Triton and postprocess; both infer replicas keep results in the same Redis."""
    env = {"LLMMESH_INFER_CACHE_BACKEND": "redis", "LLMMESH_INFER_REDIS_URL": redis_server.url}
    models = registry_file(tmp_path_factory.mktemp("models"), triton_model="instrument")
    a = Mesh(
        ports=MeshPorts.free(),
        log_dir=tmp_path_factory.mktemp("replica-a"),
        env=env,
        triton_models=("instrument",),
        model_registry=models,
    )
    a.start()
    p = a.ports
    b = Mesh(
        ports=replace(
            MeshPorts.free(),
            postprocess=p.postprocess,
            triton_grpc=p.triton_grpc,
            triton_http=p.triton_http,
            triton_metrics=p.triton_metrics,
        ),
        log_dir=tmp_path_factory.mktemp("replica-b"),
        env=env,
        triton_models=("instrument",),
        model_registry=models,
    )
    try:
        for name in ("preprocess", "infer", "gateway"):
            b.start_service(name)
        b.wait_serving(("preprocess", "infer", "gateway"))
        yield a, b
    finally:
        codes_b = {name: b.stop_service(name) for name in ("gateway", "infer", "preprocess")}
        codes_a = a.stop()
        assert all(code == 0 for code in codes_b.values()), codes_b
        assert all(codes_a[name] == 0 for name in ("gateway", "infer", "preprocess", "postprocess")), codes_a


def test_a_second_replica_serves_a_cache_hit_produced_by_the_first(replicas: tuple[Mesh, Mesh]) -> None:
    a, b = replicas
    req = greedy(unique_prompt(), max_tokens=16)
    with grpc.insecure_channel(a.address("gateway")) as ca, grpc.insecure_channel(b.address("gateway")) as cb:
        gw_a, gw_b = generation_pb2_grpc.GenerationServiceStub(ca), generation_pb2_grpc.GenerationServiceStub(cb)
        first = collect(gw_a, req)
        before = settled_counters(a)
        hit = collect(gw_b, req)
        assert generations(before, settled_counters(a)) == 0
        assert first.final is not None and first.final.reuse == REUSE.REUSE_NONE
        assert hit.final is not None and hit.final.reuse == REUSE.REUSE_CACHE_HIT
        assert hit.text == first.text and hit.token_ids == first.token_ids and len(hit.token_ids) == 16

        # Idempotency keys are shared too: a resend to the other replica replays.
        sampled = greedy(unique_prompt(), max_tokens=8, temperature=1.0)
        sampled.idempotency_key = f"client-{uuid.uuid4().hex}"
        one = collect(gw_a, sampled)
        two = collect(gw_b, sampled)
        assert two.final is not None and two.final.reuse == REUSE.REUSE_DEDUPLICATED and two.text == one.text


def test_with_redis_gone_requests_still_succeed_without_the_cache(replicas: tuple[Mesh, Mesh]) -> None:
    """A cache outage is not an outage: checked with a replica pointed at a port where nothing listens."""
    a, _ = replicas
    c = Mesh(
        ports=replace(
            MeshPorts.free(),
            postprocess=a.ports.postprocess,
            preprocess=a.ports.preprocess,
            triton_grpc=a.ports.triton_grpc,
            triton_http=a.ports.triton_http,
            triton_metrics=a.ports.triton_metrics,
        ),
        log_dir=a.log_dir / "replica-c",
        env={
            "LLMMESH_INFER_CACHE_BACKEND": "redis",
            "LLMMESH_INFER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        },
        triton_models=("instrument",),
        model_registry=a.model_registry,
    )
    try:
        for name in ("infer", "gateway"):
            c.start_service(name)
        c.wait_serving(("infer", "gateway"))
        with grpc.insecure_channel(c.address("gateway")) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            answer = collect(stub, greedy(unique_prompt(), max_tokens=8))
        assert answer.final is not None and answer.final.usage.completion_tokens == 8
    finally:
        codes = {name: c.stop_service(name) for name in ("gateway", "infer")}
        assert all(code == 0 for code in codes.values()), codes
