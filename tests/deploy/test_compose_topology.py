"""The CPU compose topology, run for real as local processes: each service of deploy/docker-compose.yml +
docker-compose.cpu.yml starts as a local process
with the environment its image and the compose file give it (compose hostnames and container ports
mapped to free loopback ports; the image's own folders, such as its model cache, left to the machine's), in
compose's health-gated order, next to the real Triton serving the models compose loads (SmolLM2, Gemma 3
270M and the safety classifier), with the trace flags compose gives it. The same files in real containers:
tests/containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmmesh.common.safety import load_policy
from llmmesh.healthcheck import check
from llmmesh.infer.triton_server import TritonServer
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .deployfiles import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    DEPLOY,
    IMAGE_PATH_ENV,
    MESH,
    dockerfile_stages,
    duration_seconds,
    env_prefix,
    flag_values,
    free_port_besides,
    healthcheck_argv,
    load_compose,
    volume_target,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

# Redis holds infer's result cache and request ids (compose: LLMMESH_INFER_CACHE_BACKEND=redis).
STARTED = ("triton", "redis", *MESH)
# A compose hostname with a port, wherever it appears in a value ("infer:50053", "dns:///x:1",
# "http://otel-collector:4318/v1/traces").
_HOST_PORT = re.compile(r"(?<![\w.-])(?P<host>[a-z][a-z0-9-]*):(?P<port>\d+)")
_LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:(?P<port>\d+)")


class OtlpSink:
    """A real OTLP/HTTP receiver: records the service.name of every span batch posted to /v1/traces,
    protobuf (the services) or JSON (Triton)."""

    def __init__(self) -> None:
        self.services: set[str] = set()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with contextlib.suppress(Exception):
                    sink.services |= sink.service_names(body, self.headers.get("Content-Type", ""))
                json_body = "json" in self.headers.get("Content-Type", "")
                reply = b"{}" if json_body else b""
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if json_body else "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def service_names(body: bytes, content_type: str) -> set[str]:
        if "json" in content_type:
            resources = [r.get("resource", {}) for r in json.loads(body).get("resourceSpans", [])]
            return {
                a["value"].get("stringValue", "")
                for r in resources
                for a in r.get("attributes", [])
                if a.get("key") == "service.name"
            }
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest.FromString(body)
        return {
            a.value.string_value
            for rs in request.resource_spans
            for a in rs.resource.attributes
            if a.key == "service.name"
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ProcessTopology:
    """The compose services as local processes on loopback, started and stopped in compose's order."""

    def __init__(self, compose: dict[str, Any], log_dir: Path) -> None:
        self.compose = compose
        self.services: dict[str, Any] = compose["services"]
        self.log_dir = log_dir
        self.stages = dockerfile_stages()
        self.ports: dict[tuple[str, int], int] = {}
        self.sink = OtlpSink()
        # The collector's OTLP/HTTP port is the sink: what compose sends to the collector arrives there.
        self.ports[("otel-collector", 4318)] = self.sink.port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.triton: TritonServer | None = None
        self.exit_codes: dict[str, int | None] | None = None
        self.stop_seconds: dict[str, float] = {}
        self.gateway = self.address("gateway")

    # -- addresses ---------------------------------------------------------------------------------
    def loopback(self, host: str, port: int) -> int:
        """The free loopback port that stands for `host:port` inside the compose network."""
        if (host, port) not in self.ports:
            self.ports[(host, port)] = free_port_besides(self.ports.values())
        return self.ports[(host, port)]

    def translate(self, value: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m["host"] not in self.services:
                return m[0]
            return f"127.0.0.1:{self.loopback(m['host'], int(m['port']))}"

        return _HOST_PORT.sub(sub, value)

    def container_port(self, name: str, key: str) -> int:
        return int(self.services[name]["environment"][env_prefix(name) + key])

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.loopback(name, self.container_port(name, 'PORT'))}"

    def metrics_url(self, name: str) -> str:
        if name == "triton":
            assert self.triton is not None
            return self.triton.metrics_url
        return f"http://127.0.0.1:{self.loopback(name, self.container_port(name, 'METRICS_PORT'))}/metrics"

    # -- start -------------------------------------------------------------------------------------
    def service_env(self, name: str) -> dict[str, str]:
        """The image's environment, then the compose file's, with compose addresses mapped to loopback and
        the paths of files compose mounts (the model registry) mapped to those files."""
        prefix = env_prefix(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMMESH_")}
        env.update({k: v for k, v in self.stages[name].env.items() if k not in IMAGE_PATH_ENV})
        compose_env = dict(self.services[name]["environment"])
        assert compose_env[prefix + "HOST"] == "0.0.0.0"
        mounted = {
            volume_target(v): str((DEPLOY / str(v).split(":")[0]).resolve())
            for v in self.services[name].get("volumes", [])
        }
        env.update({k: mounted.get(v, self.translate(v)) for k, v in compose_env.items()})
        env[prefix + "HOST"] = "127.0.0.1"
        env[prefix + "PORT"] = str(self.loopback(name, int(compose_env[prefix + "PORT"])))
        env[prefix + "METRICS_PORT"] = str(self.loopback(name, int(compose_env[prefix + "METRICS_PORT"])))
        return env

    def _start_triton(self) -> None:
        command = list(self.services["triton"]["command"])
        (repository,) = flag_values(command, "--model-repository")
        (source,) = [str(v).split(":")[0] for v in self.services["triton"]["volumes"] if volume_target(v) == repository]
        self.triton = TritonServer(
            grpc_port=self.loopback("triton", int(flag_values(command, "--grpc-port")[0])),
            http_port=self.loopback("triton", int(flag_values(command, "--http-port")[0])),
            metrics_port=self.loopback("triton", int(flag_values(command, "--metrics-port")[0])),
            models=tuple(flag_values(command, "--load-model")),
            model_repository=(DEPLOY / source).resolve(),
            log_path=self.log_dir / "triton.log",
            extra_args=tuple(self.translate(a) for a in command if a.startswith("--trace-config=")),
        )
        self.triton.start()

    def _start_redis(self) -> None:
        """The real redis-server with compose's flags, on the loopback port standing for redis:6379."""
        command = [str(a) for a in self.services["redis"]["command"]]
        assert command[0] == "redis-server"
        port = self.loopback("redis", 6379)
        with open(self.log_dir / "redis.log", "ab") as log:
            self.procs["redis"] = subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    *command[1:],
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--dir",
                    str(self.log_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _start_service(self, name: str) -> None:
        entrypoint = self.stages[name].entrypoint
        assert entrypoint is not None and entrypoint[0] == "python"
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *entrypoint[1:]],
                env=self.service_env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def healthy(self, name: str) -> bool:
        if name == "triton":
            assert self.triton is not None
            return self.triton.is_ready()
        if name == "redis":
            return self.run_healthcheck("redis") == 0
        return check(self.address(name), timeout=1.0) == "SERVING"

    def _log_tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""

    def waves(self) -> list[list[str]]:
        """Compose's start order: a service starts once everything it depends on is healthy."""
        pending, done, waves = list(STARTED), set[str](), []
        while pending:
            wave = [n for n in pending if set(self.services[n].get("depends_on", {})) <= done]
            assert wave, f"dependency cycle among {pending}"
            waves.append(wave)
            done |= set(wave)
            pending = [n for n in pending if n not in wave]
        return waves

    def start(self, timeout: float = 300.0) -> None:
        for wave in self.waves():
            for name in wave:
                if name == "triton":
                    self._start_triton()
                elif name == "redis":
                    self._start_redis()
                else:
                    self._start_service(name)
            deadline = time.monotonic() + timeout
            if "triton" in wave:
                assert self.triton is not None
                self.triton.wait_ready(timeout)  # raises with Triton's log tail if it exits or times out
            waiting = [name for name in wave if name != "triton"]
            while waiting:
                for name in list(waiting):
                    proc = self.procs[name]
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self._log_tail(name)}")
                    if self.healthy(name):
                        waiting.remove(name)
                if waiting and time.monotonic() > deadline:
                    raise TimeoutError(f"not healthy after {timeout:.0f} s: {waiting}")
                if waiting:
                    time.sleep(0.3)

    # -- checks and stop ---------------------------------------------------------------------------
    def run_healthcheck(self, name: str) -> int:
        """Runs the service's own compose health check command, its container ports mapped to loopback."""
        test = healthcheck_argv(self.services[name])
        if test[0] == "redis-cli":
            port = str(self.loopback(name, 6379))
            return subprocess.run(["redis-cli", "-p", port, *test[1:]], capture_output=True, timeout=30).returncode
        assert test[0] in ("python", "python3")

        def sub(m: re.Match[str]) -> str:
            return f"127.0.0.1:{self.loopback(name, int(m['port']))}"

        argv = [sys.executable, *(_LOOPBACK_PORT.sub(sub, a) for a in test[1:])]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(self.metrics_url(name), timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self) -> dict[str, int | None]:
        """SIGTERM in reverse start order, each waited for up to its compose stop_grace_period."""
        if self.exit_codes is not None:
            return self.exit_codes
        codes: dict[str, int | None] = {}
        for wave in reversed(self.waves()):
            for name in wave:
                grace = duration_seconds(self.services[name]["stop_grace_period"])
                began = time.monotonic()
                if name == "triton":
                    codes[name] = self.triton.stop(timeout=grace) if self.triton else None
                else:
                    proc = self.procs.pop(name, None)
                    if proc is None:
                        continue
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(grace)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                    codes[name] = proc.returncode
                self.stop_seconds[name] = time.monotonic() - began
        self.sink.close()
        self.exit_codes = codes
        return codes


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(
            "redis-server is not installed (make sysdeps installs it): compose's infer keeps its cache in Redis"
        )
    topo = ProcessTopology(load_compose(COMPOSE_GPU, COMPOSE_CPU), tmp_path_factory.mktemp("topology"))
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


@pytest.fixture(scope="module")
def gateway(topology: Any) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(topology.gateway) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def _generate(stub: Any, prompt: str, **sampling: Any) -> tuple[str, list[int], Any]:
    stop = sampling.pop("stop", [])
    req = generation_pb2.GenerateRequest(prompt=prompt, sampling=generation_pb2.SamplingParams(stop=stop, **sampling))
    text, ids, final = "", [], None
    for response in stub.Generate(req, timeout=120):
        if response.HasField("chunk"):
            text += response.chunk.text
            ids += list(response.chunk.token_ids)
        else:
            final = response.final
    assert final is not None, "the stream ended without its final message"
    return text, ids, final


def test_every_service_passes_its_compose_health_check(topology: Any) -> None:
    """The health check command compose runs in each container reports healthy for Triton and all four."""
    for name in STARTED:
        assert topology.run_healthcheck(name) == 0, name


def test_answers_through_the_gateway(topology: Any, gateway: Any) -> None:
    """The published gateway streams a real answer: Paris, with usage that counts the streamed tokens."""
    text, ids, final = _generate(gateway, "What is the capital of France?", temperature=0.0, max_tokens=32)
    assert "Paris" in text
    assert final.finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    assert final.usage.prompt_tokens > 0 and final.usage.completion_tokens == len(ids)


def test_a_repeated_greedy_request_is_a_cache_hit_from_redis(topology: Any, gateway: Any) -> None:
    """Compose points infer at Redis: the second identical greedy request replays the first's result."""
    prompt = f"Name one colour. ({uuid.uuid4().hex[:6]})"
    first_text, first_ids, first = _generate(gateway, prompt, temperature=0.0, max_tokens=8)
    text, ids, final = _generate(gateway, prompt, temperature=0.0, max_tokens=8)
    assert first.reuse == generation_pb2.REUSE_NONE and final.reuse == generation_pb2.REUSE_CACHE_HIT
    assert (text, ids) == (first_text, first_ids)


def test_stop_string_ends_the_stream(topology: Any, gateway: Any) -> None:
    """A stop string ends the answer before it, reported as STOP_STRING."""
    text, _, final = _generate(
        gateway, "What is the capital of France?", temperature=0.0, max_tokens=32, stop=["Paris"]
    )
    assert final.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING and "Paris" not in text


def test_bad_request_is_invalid_argument_naming_the_field(topology: Any, gateway: Any) -> None:
    """A bad sampling value is refused with INVALID_ARGUMENT and the field's name."""
    with pytest.raises(grpc.RpcError) as err:
        _generate(gateway, "Hello", top_p=1.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.top_p")


def test_metrics_are_served_where_prometheus_scrapes(topology: Any, gateway: Any) -> None:
    """Each service serves llmmesh_ metrics on its compose metrics port; Triton its own and the model's."""
    _generate(gateway, "Say hi.", temperature=0.0, max_tokens=4)
    for name in MESH:
        assert "llmmesh_" in topology.metrics(name), name
    triton = topology.metrics("triton")
    assert "nv_inference_request_success" in triton and "llmmesh_model_generated_tokens_total" in triton


def test_traces_reach_the_collector_endpoint(topology: Any, gateway: Any) -> None:
    """With compose's OTLP settings, all four services and Triton export spans to the collector's address."""
    _generate(gateway, "Say hi.", temperature=0.0, max_tokens=4)
    wanted = {*(f"llmmesh-{name}" for name in MESH), "triton"}
    deadline = time.monotonic() + 20
    while not wanted <= topology.sink.services and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wanted <= topology.sink.services


def _classifier_requests(triton: TritonServer, model: str) -> int:
    """Requests Triton's `model` has answered successfully (its statistics)."""
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/{model}/stats", timeout=5) as resp:
        return int(json.load(resp)["model_stats"][0]["inference_stats"]["success"]["count"])


def _repository(triton: TritonServer, model: str, action: str) -> None:
    """Loads or unloads `model` through Triton's model repository API (compose runs it with explicit control)."""
    request = urllib.request.Request(
        f"{triton.http_url}/v2/repository/models/{model}/{action}", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200


def _health_until(address: str, status: str, timeout: float = 30.0) -> str:
    """Polls the server's overall health until it reads `status` or `timeout` passes; returns the last read."""
    deadline = time.monotonic() + timeout
    while (now := check(address, timeout=1.0)) != status and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def test_a_prompt_only_the_classifier_flags_is_refused(topology: Any, gateway: Any) -> None:
    """Compose gives preprocess Triton's address and Triton serves the classifier: an insult that no blocklist
    term matches ends at once with CONTENT_FILTER in the classifier's category."""
    policy = load_policy()
    assert policy.classifier.enabled and policy.classifier.check_prompts
    text, ids, final = _generate(gateway, "You are a stupid idiot.", temperature=0.0, max_tokens=8)
    assert (text, ids) == ("", [])
    assert final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert final.filter_category == policy.classifier.category


def test_the_classifier_checks_prompts_and_responses(topology: Any, gateway: Any) -> None:
    """A plain answer costs the classifier its prompt check (preprocess) and at least one response check
    (postprocess), counted by Triton itself."""
    model = load_policy().classifier.model
    before = _classifier_requests(topology.triton, model)
    text, _, _ = _generate(gateway, f"What is the capital of France? ({uuid.uuid4().hex[:6]})", max_tokens=24)
    assert text
    # Triton counts a request once its execute() has returned, which may be after its response reached the
    # caller (the answer's last check, then its final message): the count is waited for, briefly.
    deadline = time.monotonic() + 5
    while _classifier_requests(topology.triton, model) - before < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _classifier_requests(topology.triton, model) - before >= 2


def test_postprocess_serves_only_while_triton_serves_the_classifier(topology: Any) -> None:
    """Postprocess is SERVING with the classifier loaded; unloaded, it turns NOT_SERVING (the policy needs
    it), and SERVING again once Triton loads it back, without a restart."""
    model = load_policy().classifier.model
    address = topology.address("postprocess")
    assert check(address) == "SERVING"
    try:
        _repository(topology.triton, model, "unload")
        assert _health_until(address, "NOT_SERVING") == "NOT_SERVING"
    finally:
        _repository(topology.triton, model, "load")
    assert _health_until(address, "SERVING") == "SERVING"
    # The later tests get the topology as they found it.
    assert _health_until(topology.gateway, "SERVING") == "SERVING"


def test_liveness_probe_name_is_served(topology: Any) -> None:
    """The health name the Kubernetes liveness probes ask for (`liveness`) is SERVING on every service."""
    statuses = {name: check(topology.address(name), "liveness") for name in MESH}
    assert set(statuses.values()) == {"SERVING"}, statuses


def test_shutdown_drains_every_service_cleanly(topology: Any) -> None:
    """Stopped in compose's order, every service exits 0 within its stop grace period (runs last)."""
    codes = topology.stop()
    for name in MESH:
        assert codes.get(name) == 0, f"{name} exited with {codes.get(name)}"
        if name in topology.stop_seconds:
            grace = duration_seconds(topology.services[name]["stop_grace_period"])
            assert topology.stop_seconds[name] < grace, f"{name} took {topology.stop_seconds[name]:.1f} s"
