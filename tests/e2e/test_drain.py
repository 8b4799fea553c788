"""Graceful shutdown: SIGTERM to a service with a stream in flight lets that stream finish, then exit 0."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.launcher import Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import request, settled_counters

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("service", ["gateway", "infer", "postprocess"])
def test_sigterm_mid_stream_finishes_the_stream_then_exits_zero(mesh: Mesh, service: str) -> None:
    """The in-flight stream completes in full, health turns NOT_SERVING, the process exits 0, and it restarts."""
    proc = mesh.procs[service]
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        # fresh: a live generation at infer each time, never a replay of the previous parameter's result.
        req = request("Write a long story about a dragon.", temperature=0.0, max_tokens=80)
        req.fresh = True
        before = settled_counters(mesh)
        stream = stub.Generate(req, timeout=120)
        chunks, final = 0, None
        for response in stream:
            if response.HasField("chunk"):
                chunks += 1
                if chunks == 3:
                    proc.send_signal(signal.SIGTERM)
                    with grpc.insecure_channel(mesh.address(service)) as ch:
                        try:
                            status = (
                                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                            )
                        except grpc.RpcError:
                            status = None  # already refusing calls: also not serving
                    assert status != health_pb2.HealthCheckResponse.SERVING
            else:
                final = response.final
    assert final is not None, "the stream in flight did not complete"
    assert final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 80
    assert final.reuse == generation_pb2.REUSE_NONE
    after = settled_counters(mesh)
    assert after.get("completed", 0) - before.get("completed", 0) == 1  # generated while the service drained
    assert proc.wait(timeout=30) == 0
    mesh.procs.pop(service)
    mesh.start_service(service)
    mesh.wait_serving((service,), timeout=60)
    # The gateway's health follows its stages with a 1 s poll: let it see the restart before the next test.
    time.sleep(2.5)
    mesh.wait_serving(("gateway",), timeout=60)
