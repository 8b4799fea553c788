"""llmmesh.healthcheck: the container health probe exits 0 only when the server reports SERVING."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmmesh.healthcheck import check, main

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A real gRPC server with the standard health servicer, on a free loopback port."""
    srv = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        srv.stop(None)


def test_serving_exits_zero(server: tuple[str, health.HealthServicer]) -> None:
    """A server that reports SERVING passes, for the whole server and for a named service."""
    address, servicer = server
    servicer.set("", SERVING)
    servicer.set("llmmesh.v1.GenerationService", SERVING)
    assert check(address) == "SERVING"
    assert main([address]) == 0
    assert main([address, "llmmesh.v1.GenerationService"]) == 0


def test_not_serving_exits_one(server: tuple[str, health.HealthServicer]) -> None:
    """NOT_SERVING (warming up, a dependency lost, draining) fails the check."""
    address, servicer = server
    servicer.set("", NOT_SERVING)
    assert check(address) == "NOT_SERVING"
    assert main([address]) == 1


def test_unknown_service_exits_one(server: tuple[str, health.HealthServicer]) -> None:
    """A service name the server does not know is not healthy."""
    address, servicer = server
    servicer.set("", SERVING)
    assert check(address, "no.such.Service") == "NOT_FOUND"
    assert main([address, "no.such.Service"]) == 1


def test_nothing_listening_exits_one() -> None:
    """No server at the address fails within the timeout instead of hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    assert check(address, timeout=1.0) in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert main([address, "--timeout", "1"]) == 1


def test_runs_as_a_module(server: tuple[str, health.HealthServicer]) -> None:
    """`python -m llmmesh.healthcheck HOST:PORT`, the command the images run, reports and exits 0."""
    address, servicer = server
    servicer.set("", SERVING)
    done = subprocess.run(
        [sys.executable, "-m", "llmmesh.healthcheck", address], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
