"""The lifecycle every service shares: build a grpc.aio server, serve on uvloop, drain on SIGTERM.

A service's `server.py` calls `build_server` with its servicers; its `__main__` calls `run_service`.
Health (`grpc.health.v1`) starts NOT_SERVING; the service flips it to SERVING once warmed up, and
`drain` turns it NOT_SERVING at once, refuses new calls and lets in-flight streams finish within the
grace period.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import grpc.aio
import uvloop
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmmesh.common.errors import StatusInterceptor
from llmmesh.common.logging import configure_logging, get_logger
from llmmesh.common.settings import ServiceSettings
from llmmesh.common.telemetry import client_interceptors, server_interceptors, setup_telemetry
from llmmesh.common.tls import channel_credentials, server_credentials

__all__ = ["Companion", "Service", "build_server", "channel", "grpc_options", "run_service"]

log = get_logger(__name__)


def grpc_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel(target: str, settings: ServiceSettings) -> grpc.aio.Channel:
    """One long-lived channel per downstream stage, reused by every request.

    Reconnect backoff is capped at 1 s (gRPC's default grows to 120 s) so a restarted stage is used again
    within a second instead of minutes.
    """
    options = [
        *grpc_options(settings),
        # Spread calls over every address a name resolves to (headless Kubernetes services, scaled replicas).
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    credentials = channel_credentials(settings)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=client_interceptors())
    return grpc.aio.insecure_channel(target, options=options, interceptors=client_interceptors())


class Companion(Protocol):
    async def start(self) -> None: ...

    async def drain(self, grace: float) -> None: ...


@dataclass
class Service:
    """A built (not yet started) server and the knobs its lifecycle needs."""

    name: str
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    # Run after the server stopped: close channels and clients.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Background tasks (health watchers) cancelled at shutdown.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Other servers of this process (the gateway's HTTP front door): started after the gRPC server, drained
    # with it.
    companions: list[Companion] = field(default_factory=list)
    # Readiness, as the health service reports it ("" and the service names).
    serving: bool = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.server.start()
        # "liveness" answers SERVING whenever the process serves at all (Kubernetes liveness probes);
        # "" and the service names follow readiness (dependencies included).
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        log.info("listening", port=self.port)
        for companion in self.companions:
            await companion.start()

    async def drain(self, grace: float) -> None:
        """Stops taking calls and lets the in-flight ones finish for up to `grace` seconds."""
        log.info("draining", grace_seconds=grace)
        self.serving = False
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *(c.drain(grace) for c in self.companions))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for close in self.closers:
            await close()
        log.info("stopped")


def build_server(
    name: str,
    settings: ServiceSettings,
    service_names: Sequence[str],
    add_servicers: Callable[[grpc.aio.Server], None],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    require_client_auth: bool = True,
    client_ca_file: str = "",
) -> Service:
    """A server with the status interceptor, health, reflection and size limits, bound to its port.

    `interceptors` run inside the status interceptor (their aborts are counted by status code). The port
    speaks TLS when the settings name a certificate; `require_client_auth` and `client_ca_file` are passed
    to `llmmesh.common.tls.server_credentials` (internal services: mutual TLS whenever a CA is set).
    """
    # Tracing first, so the status interceptor's outcome (and its log line) belongs to the RPC's span.
    options = [
        *grpc_options(settings),
        # Connections are recycled every 5 minutes (streams in flight get a grace period), so clients
        # re-resolve names and new replicas get their share.
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 600_000),
        # Accept the clients' 30 s keepalive pings on idle connections (the default minimum is 5 minutes,
        # past which the server answers GOAWAY "too_many_pings" and streams on that connection fail).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # A port is this process's alone: with grpc's default SO_REUSEPORT a second server (another mesh, a
        # stage given a port in use) would bind it too and the kernel would split connections between them.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=[*server_interceptors(), StatusInterceptor(), *interceptors], options=options)
    add_servicers(server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = tuple(service_names)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(settings, require_client_auth, client_ca_file)
    address = f"{settings.host}:{settings.port}"
    try:
        port = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError:  # grpc's "Failed to bind", e.g. the port is in use
        port = 0
    if port == 0:
        raise OSError(f"{name}: cannot bind {settings.host}:{settings.port} (in use?)")
    return Service(name=name, server=server, port=port, health=servicer, service_names=names)


async def _exit_with_parent(stop: asyncio.Event) -> None:
    """Started by a launcher (LLMMESH_PARENT_PID): drain when it dies, so no service outlives `llmmesh up`.

    (A prctl(PR_SET_PDEATHSIG) in the child would need Python code between fork and exec, which is unsafe
    in a parent whose gRPC threads are running.)
    """
    parent = os.environ.get("LLMMESH_PARENT_PID")
    if not parent:
        return
    while os.getppid() == int(parent):  # noqa: ASYNC110 - nothing to wait on: the parent's death sends no event
        await asyncio.sleep(1.0)
    log.warning("launcher_gone")
    stop.set()


async def _serve(name: str, settings: ServiceSettings, create: Callable[[], Awaitable[Service]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_exit_with_parent(stop))
    telemetry = setup_telemetry(name, settings)
    try:
        service = await create()
        await service.start()
        # Protobuf's C (upb) backend parses and builds every per-token message; the pure-Python fallback
        # (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, or a wheel without it) is many times slower.
        backend = api_implementation.Type()
        log.info(
            "serving", address=f"{settings.host}:{service.port}", metrics_port=settings.metrics_port, protobuf=backend
        )
        if backend != "upb":
            log.warning("slow_protobuf_backend", protobuf=backend, expected="upb")
        await stop.wait()
        await service.drain(settings.grace_seconds)
    finally:
        watch.cancel()
        telemetry.shutdown()


def run_service(name: str, settings: ServiceSettings, create: Callable[[], Awaitable[Service]]) -> None:
    """Entry point body: logging, then the server on a uvloop event loop until SIGTERM or SIGINT.

    A crash in native code (SIGSEGV, SIGABRT...) writes every thread's Python stack to stderr (the service's
    log) before the process dies, and SIGUSR1 writes them without stopping anything: what a hung service is
    doing (`kill -USR1 <pid>`)."""
    configure_logging(name, settings.log_level)
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    uvloop.run(_serve(name, settings, create))
