"""Runs the whole mesh on one machine: Triton and the four services, each its own process on loopback.

`llmmesh up` and the end-to-end tests both use `Mesh`. Processes are started in dependency order and
stopped in reverse (gateway first, so no new work reaches the stages, Triton last), each by its PID.
Nothing outlives the launcher however it dies: each service drains and exits once its parent is gone
(LLMMESH_PARENT_PID), and Triton's watchdog stops Triton's process group (see `llmmesh.infer.triton_server`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.registry import load_registry
from llmmesh.common.tls import client_credentials
from llmmesh.common.triton_auth import new_header, triton_args
from llmmesh.infer.triton_server import StartCancelled, TritonServer, repository_root

__all__ = ["SERVICES", "Mesh", "MeshPorts", "StartCancelled", "free_port", "free_ports"]

SERVICES = ("preprocess", "infer", "postprocess", "gateway")
# The gateway's API key settings (without their LLMMESH_GATEWAY_ prefix): either one set = keys required.
_KEY_SETTINGS = ("API_KEYS", "API_KEYS_FILE")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: each socket is held until all are bound (a port freed by one pick
    could otherwise be handed out again by the next)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass(frozen=True)
class MeshPorts:
    gateway: int = 50051
    preprocess: int = 50052
    infer: int = 50053
    postprocess: int = 50054
    triton_grpc: int = 8001
    triton_http: int = 8000
    triton_metrics: int = 8002
    # Prometheus endpoints of the four services.
    gateway_metrics: int = 9464
    preprocess_metrics: int = 9465
    infer_metrics: int = 9466
    postprocess_metrics: int = 9467
    # The gateway's OpenAI-compatible HTTP front door.
    gateway_http: int = 8080

    @classmethod
    def from_gateway(cls, gateway: int) -> MeshPorts:
        """The stages on the next three ports; Triton on its usual 8000-8002."""
        return cls(gateway, gateway + 1, gateway + 2, gateway + 3)

    @classmethod
    def free(cls) -> MeshPorts:
        return cls(*free_ports(len(dataclasses.fields(cls))))

    def metrics_url(self, service: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{getattr(self, f'{service}_metrics')}/metrics"


def _serving(address: str, credentials: grpc.ChannelCredentials | None = None) -> bool:
    with grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Mesh:
    ports: MeshPorts = field(default_factory=MeshPorts)
    log_dir: Path = field(default_factory=lambda: Path(".llmmesh/logs"))
    # Extra environment for the services (LLMMESH_<SERVICE>_... settings).
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    # The Triton models to load; None = every Triton model of the model registry, and the safety
    # classifier. Without "safety_classifier" the classifier layer is off.
    triton_models: tuple[str, ...] | None = None
    # Tracing: the services' OTLP endpoint and protocol, and Triton's OTLP/HTTP traces URL; empty = off.
    otlp_endpoint: str = ""
    otlp_protocol: str = "http/protobuf"
    triton_trace_url: str = ""
    # Triton's model repository; None = this checkout's triton_models/.
    model_repository: Path | None = None
    # The model registry every service reads (LLMMESH_<SERVICE>_MODEL_REGISTRY); None = the shipped one. To
    # serve the default model from another Triton model: `llmmesh.common.registry.registry_file`.
    model_registry: Path | None = None
    # TLS: a directory written by `python -m llmmesh.common.devcerts` (ca.pem, <service>.pem/.key,
    # public-ca.pem). Every service serves TLS, the stages require client certificates (mutual TLS), the
    # gateway reaches them with its own certificate. None = plaintext.
    tls_dir: Path | None = None
    # Stages (preprocess, postprocess) that run inside the gateway's process (LLMMESH_GATEWAY_<STAGE>_URL=
    # inprocess) instead of as processes of their own.
    in_gateway: tuple[str, ...] = ()
    triton: TritonServer | None = field(default=None, init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    # This mesh's secret for Triton's restricted protocols (see `triton_header`).
    _triton_header: str = field(default_factory=new_header, init=False, repr=False)

    @property
    def triton_header(self) -> str:
        """The header ('<key>=<value>') that Triton's restricted protocols require of this mesh's callers
        (llmmesh.common.triton_auth), or '' when Triton is open. Triton is restricted when the gateway
        requires API keys: a mesh with keys must have no door that opens without one."""
        env = {**os.environ, **self.env}
        keyed = any(env.get(f"LLMMESH_GATEWAY_{name}", "").strip() not in ("", "[]") for name in _KEY_SETTINGS)
        return self._triton_header if keyed else ""

    @property
    def served_triton_models(self) -> tuple[str, ...]:
        """What Triton loads: `triton_models`, or the registry's Triton models and the safety classifier."""
        if self.triton_models is not None:
            return self.triton_models
        registry = load_registry(self.model_registry, tokenizers=False)
        models = dict.fromkeys(e.triton_model for e in registry if e.backend == "triton")
        return (*models, "safety_classifier")

    @property
    def services(self) -> tuple[str, ...]:
        """The service processes this mesh runs, in start order."""
        return tuple(s for s in SERVICES if s not in self.in_gateway)

    def address(self, service: str) -> str:
        return f"{self.host}:{getattr(self.ports, service)}"

    @property
    def http_url(self) -> str:
        """The gateway's OpenAI-compatible HTTP front door (https with `tls_dir`)."""
        scheme = "https" if self.tls_dir is not None else "http"
        return f"{scheme}://{self.host}:{self.ports.gateway_http}"

    def _stage_url(self, stage: str) -> str:
        return "inprocess" if stage in self.in_gateway else self.address(stage)

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        p = self.ports
        env.update(
            {
                "LLMMESH_PREPROCESS_HOST": self.host,
                "LLMMESH_PREPROCESS_PORT": str(p.preprocess),
                "LLMMESH_INFER_HOST": self.host,
                "LLMMESH_INFER_PORT": str(p.infer),
                "LLMMESH_INFER_TRITON_URL": f"{self.host}:{p.triton_grpc}",
                "LLMMESH_POSTPROCESS_HOST": self.host,
                "LLMMESH_POSTPROCESS_PORT": str(p.postprocess),
                # Postprocess reads plain answers from infer itself (the gateway's default hop order).
                "LLMMESH_POSTPROCESS_INFER_URL": self.address("infer"),
                "LLMMESH_GATEWAY_HOST": self.host,
                "LLMMESH_GATEWAY_PORT": str(p.gateway),
                "LLMMESH_GATEWAY_HTTP_PORT": str(p.gateway_http),
                "LLMMESH_GATEWAY_PREPROCESS_URL": self._stage_url("preprocess"),
                "LLMMESH_GATEWAY_INFER_URL": self.address("infer"),
                "LLMMESH_GATEWAY_POSTPROCESS_URL": self._stage_url("postprocess"),
                "HF_HUB_OFFLINE": "1",
                # The service drains and exits if this process dies (see common/server.py).
                "LLMMESH_PARENT_PID": str(os.getpid()),
            }
        )
        if self.model_registry is not None:
            for name in SERVICES:
                env[f"LLMMESH_{name.upper()}_MODEL_REGISTRY"] = str(self.model_registry)
        if "safety_classifier" in self.served_triton_models:
            for name in ("preprocess", "postprocess"):
                env[f"LLMMESH_{name.upper()}_TRITON_URL"] = f"{self.host}:{p.triton_grpc}"
        for name in SERVICES:
            prefix = f"LLMMESH_{name.upper()}_"
            env[f"{prefix}METRICS_PORT"] = str(getattr(p, f"{name}_metrics"))
            if self.otlp_endpoint:
                env[f"{prefix}OTLP_ENDPOINT"] = self.otlp_endpoint
                env[f"{prefix}OTLP_PROTOCOL"] = self.otlp_protocol
        if self.tls_dir is not None:
            for name in SERVICES:
                prefix = f"LLMMESH_{name.upper()}_"
                env[f"{prefix}TLS_CERT_FILE"] = str(self.tls_dir / f"{name}.pem")
                env[f"{prefix}TLS_KEY_FILE"] = str(self.tls_dir / f"{name}.key")
                env[f"{prefix}TLS_CA_FILE"] = str(self.tls_dir / "ca.pem")
            env["LLMMESH_GATEWAY_PUBLIC_CA_FILE"] = str(self.tls_dir / "public-ca.pem")
        if header := self.triton_header:
            for name in ("preprocess", "infer", "postprocess"):
                env[f"LLMMESH_{name.upper()}_TRITON_HEADER"] = header
        env.update(self.env)
        return env

    def probe_credentials(self) -> grpc.ChannelCredentials | None:
        """What health checks present with `tls_dir`: the internal CA and the gateway's certificate."""
        if self.tls_dir is None:
            return None
        d = self.tls_dir
        return client_credentials(str(d / "ca.pem"), str(d / "gateway.pem"), str(d / "gateway.key"))

    def start_service(
        self, name: str, key: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Starts service `name`, kept in `procs[key]` (default: its name), with `env` over the mesh's.

        A second gateway (`key` other than "gateway") gets a free port for its HTTP front door unless `env`
        names one: the mesh's own is taken by the first."""
        key = key or name
        env = dict(env or {})
        if name == "gateway" and key != name:
            env.setdefault("LLMMESH_GATEWAY_HTTP_PORT", str(free_port()))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{key}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"llmmesh.{name}"],
                env={**self._service_env(), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[key] = proc
        return proc

    def start_replica(self, name: str, port: int, timeout: float = 60.0, env: Mapping[str, str] | None = None) -> str:
        """One more process of service `name` on `port` (metrics on a free port), with `env` over the mesh's;
        returns its key in `procs`, once it is SERVING.

        For fault tests: point the gateway at both (e.g. `LLMMESH_GATEWAY_PREPROCESS_URL=ipv4:HOST:P1,HOST:P2`).
        A second gateway shares the mesh's stages, or keeps some in its own process (`env`; loadtest.layout_ab).
        """
        key = f"{name}-{port}"
        prefix = f"LLMMESH_{name.upper()}_"
        self.start_service(
            name, key, {f"{prefix}PORT": str(port), f"{prefix}METRICS_PORT": str(free_port()), **(env or {})}
        )
        deadline = time.monotonic() + timeout
        while not _serving(f"{self.host}:{port}", self.probe_credentials()):
            proc = self.procs[key]
            if proc.poll() is not None:
                raise RuntimeError(f"{key} exited with {proc.returncode}:\n{self.log_tail(key)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key} not SERVING after {timeout:.0f} s")
            time.sleep(0.2)
        return key

    def restart_triton(self, timeout: float = 120.0) -> None:
        """Stops Triton (or reaps what a crash left: stubs, shared memory), then starts it on the same ports."""
        assert self.triton is not None
        self.triton.stop()
        self.triton.start()
        self.triton.wait_ready(timeout)

    def start(self, timeout: float = 180.0, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Starts everything and returns once Triton is ready and every service reports SERVING.

        Checks `cancelled()` while it waits (a signal handler's flag): once it holds, stops what it started
        and raises `StartCancelled`. On any error it stops everything too.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.triton = TritonServer(
            grpc_port=self.ports.triton_grpc,
            http_port=self.ports.triton_http,
            metrics_port=self.ports.triton_metrics,
            models=self.served_triton_models,
            host=self.host,
            log_path=self.log_dir / "triton.log",
            trace_url=self.triton_trace_url,
            model_repository=self.model_repository or repository_root(),
            extra_args=tuple(triton_args(self.triton_header)),
        )
        try:
            if cancelled():
                raise StartCancelled("cancelled before the start")
            self.triton.start()
            for name in self.services:
                self.start_service(name)
            self.triton.wait_ready(timeout, cancelled)
            self.wait_serving(self.services, timeout, cancelled)
        except BaseException:
            self.stop()
            raise

    def wait_serving(
        self,
        services: tuple[str, ...] | None = None,
        timeout: float = 60.0,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.services if services is None else services)
        credentials = self.probe_credentials()
        while pending:
            for name in list(pending):
                if cancelled():
                    raise StartCancelled(f"cancelled while waiting for {', '.join(pending)}")
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
                if _serving(self.address(name), credentials):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout:.0f} s: {', '.join(pending)}")
            if pending:
                time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_service(self, name: str, timeout: float = 20.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> dict[str, int | None]:
        """Stops the gateway first, then the stages, then Triton; returns each exit code."""
        codes = {name: self.stop_service(name) for name in reversed(SERVICES)}
        codes.update({key: self.stop_service(key) for key in list(self.procs)})  # replicas
        if self.triton is not None:
            codes["triton"] = self.triton.stop()
            self.triton = None
        return codes

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
