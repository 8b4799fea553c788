"""The CPU model (triton_models/smollm2) on a real Triton: seeds, its thread budget, no server of its own.

The module starts its own tritonserver serving only `smollm2`, pinned to one CPU of this machine at
start (tritonserver and its python stub inherit the affinity), and drives it with infer's own request
builder.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Iterator

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.common.model_assets import ModelAssets
from llmmesh.infer.backend import Generation, build_request
from llmmesh.infer.triton_server import TritonServer, remove_orphaned_shm
from llmmesh.launcher import free_ports

from .sockets import listening_tcp, listening_unix, process_tree

pytestmark = pytest.mark.e2e

EOS = 2


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one to pin Triton to, and more that os.cpu_count() would report")
    server = TritonServer(*free_ports(3), models=("smollm2",))
    # This thread only: Popen's child inherits the affinity, the rest of pytest keeps every CPU.
    os.sched_setaffinity(0, {min(cpus)})
    try:
        server.start()
    finally:
        os.sched_setaffinity(0, cpus)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        assert not remove_orphaned_shm()


@pytest.fixture(scope="module")
def prompt(assets: ModelAssets) -> list[int]:
    return assets.encode_chat([{"role": "user", "content": "Tell me a story."}])


def _generate(triton: TritonServer, prompt: list[int], seed: int | None, max_tokens: int = 12) -> list[int]:
    """Samples at temperature 1 (no top-k, no top-p): without a fixed seed, two runs differ."""
    gen = Generation("cpu-model-test", "smollm2", prompt, max_tokens, EOS, EOS, 1.0, 1.0, 0, seed)
    ids: list[int] = []
    with grpc.insecure_channel(triton.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for response in stub.ModelStreamInfer(iter([build_request(gen, "smollm2")]), timeout=60):
            assert not response.error_message, response.error_message
            result: service_pb2.ModelInferResponse = response.infer_response
            for i, out in enumerate(result.outputs):
                if out.name == "output_ids":
                    ids += array("i", result.raw_output_contents[i]).tolist()
            if result.parameters["triton_final_response"].bool_param:
                break
    return ids


@pytest.mark.parametrize("seed", [0xFFFFFFFF, 0x1_FFFF_FFFF, 2**64 - 1], ids=["2^32-1", "2^33-1", "2^64-1"])
def test_seeds_that_were_llama_cpps_random_seed_are_deterministic(
    triton: TritonServer, prompt: list[int], seed: int
) -> None:
    """A seed whose low 32 bits are llama.cpp's "pick a random seed" value samples the same tokens every time."""
    first = _generate(triton, prompt, seed)
    assert len(first) == 12
    assert _generate(triton, prompt, seed) == first


def test_seeds_map_onto_llama_cpps_deterministic_range(triton: TritonServer, prompt: list[int]) -> None:
    """A seed below 2^32 - 1 is used as it is; larger seeds wrap modulo 2^32 - 1 (42 + (2^32 - 1) samples as 42)."""
    assert _generate(triton, prompt, 42 + 0xFFFFFFFF) == _generate(triton, prompt, 42)


def test_engine_threads_follow_the_cpus_triton_may_run_on(triton: TritonServer) -> None:
    """Pinned to one CPU of several, the llama.cpp engine starts one thread, not os.cpu_count()."""
    assert triton.log_path is not None
    log = triton.log_path.read_text(errors="replace")
    counts = {int(n) for n in re.findall(r"llama threadpool init, n_threads = (\d+)", log)}
    assert counts == {1}, f"threadpool sizes in the log: {counts}"


def test_engine_opens_no_server_of_its_own(triton: TritonServer) -> None:
    """Triton's three ports are all that the server and its model stub listen on: llama.cpp's HTTP server has
    no TCP port, and no socket path (nor abstract name) that another process could connect to."""
    assert triton.pid is not None
    tree = process_tree(triton.pid)
    assert {port for _, port in listening_tcp(tree)} == {triton.grpc_port, triton.http_port, triton.metrics_port}
    reachable = [p for p in listening_unix(tree) if p.startswith("@") or os.path.exists(p)]
    assert not reachable
