"""End to end: postprocess, as its own process, reports NOT_SERVING while a real Triton does not serve the
classifier its policy needs (the model unloaded, Triton stopped) and SERVING once it does again. The check
lives in postprocess itself, so compose and Kubernetes deployments get it as `llmmesh up` does."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.infer.triton_server import TritonServer
from llmmesh.launcher import Mesh, MeshPorts

from .conftest import running_triton

pytestmark = pytest.mark.e2e

MODEL = "safety_classifier"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    yield from running_triton(MODEL)


def _status(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return None
    return int(reply.status)


def _until(address: str, status: int, timeout: float = 20.0) -> int | None:
    """Polls health until it reads `status` or `timeout` passes; returns the last status read."""
    deadline = time.monotonic() + timeout
    while (now := _status(address)) != status and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def _repository(triton: TritonServer, action: str) -> None:
    """Loads or unloads the classifier through Triton's model repository API (explicit model control)."""
    url = f"{triton.http_url}/v2/repository/models/{MODEL}/{action}"
    request = urllib.request.Request(url, data=json.dumps({}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200


def test_postprocess_health_follows_the_real_classifier(triton: TritonServer, tmp_path: Path) -> None:
    """Model loaded: SERVING. Unloaded: NOT_SERVING, then SERVING once loaded again. Triton stopped:
    NOT_SERVING, then SERVING once it is back, without restarting postprocess."""
    ports = dataclasses.replace(
        MeshPorts.free(),
        triton_grpc=triton.grpc_port,
        triton_http=triton.http_port,
        triton_metrics=triton.metrics_port,
    )
    # The mesh's environment gives postprocess this Triton's address (it lists the classifier's model).
    mesh = Mesh(ports=ports, log_dir=tmp_path, triton_models=(MODEL,))
    address = mesh.address("postprocess")
    mesh.start_service("postprocess", env={"LLMMESH_POSTPROCESS_HEALTH_INTERVAL_SECONDS": "0.2"})
    try:
        mesh.wait_serving(("postprocess",), timeout=60)

        _repository(triton, "unload")
        assert _until(address, NOT_SERVING) == NOT_SERVING
        _repository(triton, "load")
        assert _until(address, SERVING) == SERVING

        triton.stop()
        assert _until(address, NOT_SERVING) == NOT_SERVING
        triton.start()
        triton.wait_ready(timeout=120)
        assert _until(address, SERVING) == SERVING
    finally:
        assert mesh.stop_service("postprocess") == 0, mesh.log_tail("postprocess")
