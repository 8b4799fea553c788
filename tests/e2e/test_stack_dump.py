"""What a hung or crashed service was doing: every service writes all its threads' Python stacks to its log on
SIGUSR1 (and keeps serving), and on a fatal signal before it dies (`common/server.py`, `run_service`)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from llmmesh.launcher import SERVICES, Mesh
from llmmesh.v1 import generation_pb2_grpc

from .conftest import request, wait_for

pytestmark = pytest.mark.e2e


def test_sigusr1_dumps_every_services_stacks_and_it_keeps_serving(
    mesh: Mesh, gateway: generation_pb2_grpc.GenerationServiceStub
) -> None:
    for name in SERVICES:
        log = mesh.log_dir / f"{name}.log"
        before = log.read_text(errors="replace").count("most recent call first")
        mesh.procs[name].send_signal(signal.SIGUSR1)

        def dumped(log: Path = log, before: int = before) -> bool:
            text = log.read_text(errors="replace")
            # The main thread, in the service's event loop, and grpc's other threads.
            return text.count("most recent call first") > before + 1 and "in run_service" in text

        assert wait_for(dumped, 5), mesh.log_tail(name)
        assert mesh.procs[name].poll() is None, f"{name} died on SIGUSR1"
    final = None
    for response in gateway.Generate(request("What is the capital of France?", max_tokens=5), timeout=60):
        if response.HasField("final"):
            final = response.final
    assert final is not None and final.usage.completion_tokens > 0


def test_a_fatal_signal_leaves_the_stacks_in_the_log(mesh: Mesh) -> None:
    """A second preprocess (its own process, on free ports), aborted: its log says where each thread was."""
    from llmmesh.launcher import free_ports

    port, metrics = free_ports(2)
    key = "preprocess-abort"
    proc = mesh.start_service(
        "preprocess", key, {"LLMMESH_PREPROCESS_PORT": str(port), "LLMMESH_PREPROCESS_METRICS_PORT": str(metrics)}
    )
    log = mesh.log_dir / f"{key}.log"
    try:
        assert wait_for(lambda: '"serving"' in log.read_text(errors="replace"), 60), mesh.log_tail(key)
        proc.send_signal(signal.SIGABRT)
        assert proc.wait(10) == -signal.SIGABRT
        text = log.read_text(errors="replace")
        assert "Fatal Python error: Aborted" in text and "in run_service" in text, mesh.log_tail(key)
    finally:
        mesh.procs.pop(key, None)
        if proc.poll() is None:
            proc.kill()
