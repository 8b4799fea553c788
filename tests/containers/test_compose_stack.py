"""The CPU compose stack in real containers: every image of deploy/Dockerfile built from a locally made base,
deploy/docker-compose.yml + docker-compose.cpu.yml brought up by docker-compose against podman, with the
swaps this machine forces in tests/containers/compose.podman.yml, and the mesh checked through the
containers: a streamed answer, a cache hit through the containerised Redis, a container killed mid-stream
and restarted alone, Prometheus scraping every service, traces reaching an OTLP receiver, and `down`
draining streams in flight (last: it ends the stack).

`make compose-test` runs this module alone; `make test` runs it with the rest. Skipped, with the reason,
only where the engine cannot start (tests/containers/engine.py, `unavailable_reason`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from llmmesh.healthcheck import check
from llmmesh.v1 import generation_pb2, generation_pb2_grpc
from tests.deploy.deployfiles import free_port_besides
from tests.e2e.otlp_receiver import OtlpReceiver

from . import engine

pytestmark = [pytest.mark.e2e, pytest.mark.containers, pytest.mark.timeout(3600)]

FILES = [
    engine.DEPLOY / "docker-compose.yml",
    engine.DEPLOY / "docker-compose.cpu.yml",
    engine.HERE / "compose.podman.yml",
]
MESH = ("preprocess", "infer", "postprocess", "gateway")
# What `up` starts: the gateway and, through depends_on, the stages, Triton and Redis; and Prometheus.
STARTED = ("triton", "redis", *MESH, "prometheus")
PORTS = (
    "GATEWAY",
    "GATEWAY_HTTP",
    "PREPROCESS",
    "INFER",
    "POSTPROCESS",
    "GATEWAY_METRICS",
    "PREPROCESS_METRICS",
    "INFER_METRICS",
    "POSTPROCESS_METRICS",
    "TRITON_GRPC",
    "TRITON_HTTP",
    "TRITON_METRICS",
    "REDIS",
    "PROMETHEUS",
)


@dataclass
class Stack:
    compose: engine.Compose
    ports: dict[str, int]
    otlp: OtlpReceiver
    config: dict[str, Any]
    build_seconds: dict[str, float] = field(default_factory=dict)
    up_seconds: float = 0.0

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['GATEWAY']}"

    def stub(self) -> generation_pb2_grpc.GenerationServiceStub:
        return generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(self.gateway))

    def exec(self, service: str, *argv: str) -> str:
        done = engine.podman("exec", self.compose.container(service), *argv, timeout=60)
        return done.stdout

    def wait_healthy(self, service: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            containers = engine.running_containers(self.compose.project)
            if service in containers:
                health = engine.inspect(containers[service])["State"].get("Health", {}).get("Status")
                if health == "healthy":
                    return
            time.sleep(1)
        raise TimeoutError(f"{service} not healthy after {timeout:.0f} s")


def prometheus_config(ports: dict[str, int], out: Path) -> Path:
    """deploy/prometheus.yml with its DNS discovery replaced by static loopback targets: the same jobs, the
    same `service` label per target."""
    real = yaml.safe_load((engine.DEPLOY / "prometheus.yml").read_text())
    for job in real["scrape_configs"]:
        (sd,) = job.pop("dns_sd_configs")
        job.pop("relabel_configs", None)
        job["static_configs"] = [
            {
                "targets": [f"127.0.0.1:{ports['TRITON_METRICS' if name == 'triton' else name.upper() + '_METRICS']}"],
                "labels": {"service": name},
            }
            for name in sd["names"]
        ]
    out.write_text(yaml.safe_dump(real))
    out.chmod(0o644)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = engine.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    run_dir = tmp_path_factory.mktemp("containers")
    run_dir.chmod(0o755)
    began = time.monotonic()
    base = engine.base_image()
    build_seconds = {"base": time.monotonic() - began, **engine.build_images(base, run_dir)}
    print(f"\nimages: {json.dumps({k: round(v, 1) for k, v in build_seconds.items()})}")

    ports: dict[str, int] = {}
    for name in PORTS:
        ports[name] = free_port_besides(ports.values())
    otlp = OtlpReceiver()
    otlp.start()
    variables = {f"CT_{k}_PORT": str(v) for k, v in ports.items()}
    variables |= {
        "CT_OTLP_PORT": str(otlp.http_port),
        "CT_PROMETHEUS_CONFIG": str(prometheus_config(ports, run_dir / "prometheus.yml")),
        "LLMMESH_VERSION": engine.VERSION,
        **engine.hard_limits(),
    }
    config = engine.compose_config(FILES, variables, run_dir / "compose.yml")
    project = f"llmmesh-ct-{uuid.uuid4().hex[:8]}"
    with engine.api_service(run_dir) as api:
        compose = engine.Compose(project, run_dir / "compose.yml", api.docker_host)
        health = engine.HealthLoop(project)
        try:
            began = time.monotonic()
            up = compose("up", "-d", "--no-build", "gateway", "prometheus", timeout=900)
            assert up.returncode == 0, up.stderr[-4000:]
            stack = Stack(compose, ports, otlp, config, build_seconds, time.monotonic() - began)
            stack.wait_healthy("gateway")
            stack.wait_healthy("prometheus")
            print(f"stack healthy {stack.up_seconds:.0f} s after `up`")
            yield stack
        finally:
            health.stop()
            down = compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=300)
            # Whatever down left (a failed up), removed by the project's label.
            for cid in engine.podman(
                "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}", check=False
            ).stdout.split():
                engine.podman("rm", "-f", cid, check=False)
            otlp.stop()
            assert down.returncode == 0, down.stderr[-2000:]


def generate(stub: Any, prompt: str, timeout: float = 120, **sampling: Any) -> tuple[str, list[Any], Any]:
    req = generation_pb2.GenerateRequest(prompt=prompt, sampling=generation_pb2.SamplingParams(**sampling))
    chunks, final = [], None
    for response in stub.Generate(req, timeout=timeout):
        if response.HasField("chunk"):
            chunks.append(response.chunk)
        else:
            final = response.final
    assert final is not None, "the stream ended without its final message"
    return "".join(c.text for c in chunks), chunks, final


def test_every_service_runs_its_image_healthy_unprivileged_and_read_only(stack: Stack) -> None:
    containers = engine.running_containers(stack.compose.project)
    assert set(STARTED) <= set(containers), containers
    for service in STARTED:
        info = engine.inspect(containers[service])
        assert info["State"]["Health"]["Status"] == "healthy", (service, info["State"]["Health"])
        assert info["Config"]["Image"].endswith(stack.config["services"][service]["image"]), service
        if service in MESH or service == "triton":
            assert info["Config"]["User"].startswith("10001"), (service, info["Config"]["User"])
        if service in MESH:
            assert info["HostConfig"]["ReadonlyRootfs"] is True, service
            assert check(f"127.0.0.1:{stack.ports[service.upper()]}", timeout=5) == "SERVING", service


def test_an_answer_streams_through_the_gateway_container(stack: Stack) -> None:
    # Several sentences: the shipped safety policy's classifier releases text a sentence at a time.
    text, chunks, final = generate(stack.stub(), "Describe Paris in three sentences.", temperature=0.0, max_tokens=64)
    assert "Paris" in text
    assert len(chunks) > 1, "the answer came in one piece, not streamed"
    assert final.model == "smollm2"
    assert final.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    # The OpenAI-compatible door of the same container.
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.ports['GATEWAY_HTTP']}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        reply = json.loads(resp.read())
    assert reply["choices"][0]["message"]["content"] and reply["model"] == "smollm2"
    # The CLI the README shows, run inside the gateway's container.
    out = stack.exec(
        "gateway",
        "llmmesh",
        "generate",
        "What is the capital of France?",
        "--address",
        stack.gateway,
        "--temperature",
        "0",
    )
    assert "Paris" in out


def test_a_repeated_greedy_request_is_a_cache_hit_from_the_redis_container(stack: Stack) -> None:
    stub, prompt = stack.stub(), f"Name one colour. ({uuid.uuid4().hex[:6]})"
    first_text, _, first = generate(stub, prompt, temperature=0.0, max_tokens=12)
    assert first.reuse != generation_pb2.REUSE_CACHE_HIT
    redis_cli = ("redis-cli", "-p", str(stack.ports["REDIS"]))
    deadline = time.monotonic() + 10
    while int(stack.exec("redis", *redis_cli, "dbsize")) == 0:
        assert time.monotonic() < deadline, "infer stored nothing in the Redis container"
        time.sleep(0.2)
    again_text, _, again = generate(stub, prompt, temperature=0.0, max_tokens=12)
    assert again.reuse == generation_pb2.REUSE_CACHE_HIT and again_text == first_text
    # The hit came from that Redis: emptied, the same request generates again.
    stack.exec("redis", *redis_cli, "flushall")
    _, _, after_flush = generate(stub, prompt, temperature=0.0, max_tokens=12)
    assert after_flush.reuse != generation_pb2.REUSE_CACHE_HIT


def test_traces_of_every_service_and_triton_reach_the_receiver(stack: Stack) -> None:
    generate(stack.stub(), "Say hello.", temperature=0.0, max_tokens=6)
    want = {*(f"llmmesh-{name}" for name in MESH), "triton"}
    deadline = time.monotonic() + 30
    while not want <= {s.service for s in stack.otlp.snapshot()} and time.monotonic() < deadline:
        time.sleep(0.5)
    spans = stack.otlp.snapshot()
    assert want <= {s.service for s in spans}, sorted({s.service for s in spans})
    # Triton's spans join the mesh's traces (infer passes its W3C trace context).
    mesh_traces = {s.trace_id for s in spans if s.service == "llmmesh-gateway"}
    assert any(s.trace_id in mesh_traces for s in spans if s.service == "triton")


def _prometheus(stack: Stack, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.ports['PROMETHEUS']}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_the_prometheus_container_scrapes_every_service(stack: Stack) -> None:
    generate(stack.stub(), "Count to three.", temperature=0.0, max_tokens=8)
    want = {*MESH, "triton"}
    deadline = time.monotonic() + 60
    while True:
        up = {r["metric"]["service"] for r in _prometheus(stack, "up == 1")}
        served = _prometheus(stack, 'sum(llmmesh_requests_total{job="llmmesh",service="gateway"})')
        if (want <= up and served and float(served[0]["value"][1]) >= 1) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert want <= up, f"targets up: {sorted(up)}"
    assert served and float(served[0]["value"][1]) >= 1, served
    assert _prometheus(stack, 'nv_inference_request_success{job="triton"}'), "no Triton metrics scraped"


def test_a_killed_container_fails_its_streams_fast_and_recovers_alone(stack: Stack) -> None:
    """infer's process is killed (SIGKILL) mid-stream: the client gets UNAVAILABLE within 2 s; restarted, the mesh
    answers again, and no other container was restarted."""
    before = {
        name: engine.inspect(cid)["State"]["StartedAt"]
        for name, cid in engine.running_containers(stack.compose.project).items()
    }
    # The container's main process as the host sees it, killed as a crash would: the time measured is the
    # mesh's, not the podman command's (which takes about a second here).
    infer_pid = int(engine.inspect(stack.compose.container("infer"))["State"]["Pid"])
    stub = stack.stub()
    req = generation_pb2.GenerateRequest(
        prompt="Write a long story about a lighthouse keeper.",
        sampling=generation_pb2.SamplingParams(temperature=0.7, max_tokens=2000),
    )
    stream = stub.Generate(req, timeout=120)
    killed_at = 0.0
    with pytest.raises(grpc.RpcError) as err:
        for response in stream:
            if response.HasField("chunk") and not killed_at:
                os.kill(infer_pid, signal.SIGKILL)
                killed_at = time.monotonic()
    failed_after = time.monotonic() - killed_at
    print(f"\nUNAVAILABLE {failed_after * 1000:.0f} ms after infer was killed")
    assert killed_at, "no chunk arrived before the stream ended"
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert failed_after < 2.0

    # Restarted alone (`unless-stopped` may already have restarted it; `start` is then a no-op).
    started = stack.compose("start", "infer", timeout=120)
    assert started.returncode == 0, started.stderr
    stack.wait_healthy("infer")
    deadline = time.monotonic() + 60
    while True:
        try:
            text, _, final = generate(stub, "What is the capital of France?", temperature=0.0, max_tokens=16)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert "Paris" in text and final.model == "smollm2"
    after = {
        name: engine.inspect(cid)["State"]["StartedAt"]
        for name, cid in engine.running_containers(stack.compose.project).items()
    }
    assert after["infer"] != before["infer"]
    assert {k: v for k, v in after.items() if k != "infer"} == {k: v for k, v in before.items() if k != "infer"}


def test_down_drains_the_streams_in_flight(stack: Stack) -> None:
    """`docker-compose down` while three streams are generating: each ends with its final message and every
    token it asked for; nothing is cut. Last in this module: it ends the stack."""
    stub = stack.stub()
    results: list[Any] = [None] * 3
    first_chunk = [threading.Event() for _ in results]

    def run(i: int) -> None:
        req = generation_pb2.GenerateRequest(
            prompt=f"Tell me about the sea, part {i}.",
            sampling=generation_pb2.SamplingParams(temperature=0.7, seed=i, max_tokens=96),
        )
        tokens, final = 0, None
        try:
            for response in stub.Generate(req, timeout=120):
                if response.HasField("chunk"):
                    tokens += len(response.chunk.token_ids)
                    first_chunk[i].set()
                else:
                    final = response.final
            results[i] = (tokens, final, time.monotonic())
        except grpc.RpcError as e:
            results[i] = e
        finally:
            first_chunk[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for event in first_chunk:
        assert event.wait(60)
    began = time.monotonic()
    down = stack.compose("down", timeout=300)
    for t in threads:
        t.join(120)
    print(f"\n`down` took {time.monotonic() - began:.1f} s with {len(results)} streams in flight")
    assert down.returncode == 0, down.stderr[-2000:]
    for result in results:
        assert not isinstance(result, BaseException), result
        tokens, final, ended = result
        assert final is not None
        assert final.usage.completion_tokens == tokens > 0
        assert ended > began, "the stream had ended before `down` began: nothing was drained"
    assert not engine.running_containers(stack.compose.project)
