"""The whole mesh as real processes: a real Triton serving SmolLM2 and the four services, once per session."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.infer.triton_server import TritonServer, remove_orphaned_shm
from llmmesh.launcher import SERVICES, Mesh, MeshPorts, free_ports
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

# The e2e mesh blocks one harmless word so that a real answer can be made to hit the filter.
BLOCKED_WORD = "Berlin"


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir: Path = tmp_path_factory.mktemp("mesh-logs")
    m = Mesh(
        ports=MeshPorts.free(),
        log_dir=log_dir,
        env={"LLMMESH_POSTPROCESS_EXTRA_BLOCKED_TERMS": f'["{BLOCKED_WORD}"]', "LLMMESH_GATEWAY_GRACE_SECONDS": "30"},
    )
    m.start()
    try:
        yield m
    finally:
        stop_cleanly(m)


def stop_cleanly(mesh: Mesh) -> None:
    """Stops the mesh; every service exits 0 and nothing of Triton is left behind."""
    triton_pid = mesh.triton.pid if mesh.triton else None
    codes = mesh.stop()
    assert all(codes[name] == 0 for name in SERVICES), f"unclean exits: {codes}"
    # Triton may exit 1 after its exit timeout (a known 2.51 unload hang, see TritonServer.stop);
    # what matters is that nothing of it is left behind.
    assert triton_pid is not None and not process_group_alive(triton_pid)
    assert not orphaned_shm()


@pytest.fixture(scope="session")
def gateway(mesh: Mesh) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def running_triton(*models: str) -> Iterator[TritonServer]:
    """A Triton of its own serving `models` on free ports, for a module fixture (`yield from`): stopped after,
    with nothing of it left behind."""
    server = TritonServer(*free_ports(3), models=models)
    server.start()
    pid = server.pid
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()
        assert pid is not None and not process_group_alive(pid)
        assert not orphaned_shm()


def orphaned_shm() -> list[str]:
    """Python-backend shared-memory regions that no live process maps (cleaned up, and returned)."""
    return remove_orphaned_shm()


def request(prompt: str, **sampling: object) -> generation_pb2.GenerateRequest:
    stop = sampling.pop("stop", [])
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        sampling=generation_pb2.SamplingParams(stop=stop, **sampling),  # type: ignore[arg-type]
    )


def model_counters(mesh: Mesh) -> dict[str, float]:
    """The model's own counters from Triton's metrics endpoint: tokens generated, requests by outcome,
    (llama.cpp models) prompt tokens as `prompt_cached` and `prompt_computed`, and (the instrument) when it
    last noticed a cancel, as `last_cancel`."""
    assert mesh.triton is not None
    with urllib.request.urlopen(mesh.triton.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    # Summed over the models Triton serves (smollm2 and gemma3 in a mesh with the shipped registry).
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmmesh_model_generated_tokens_total":
                out["tokens"] = out.get("tokens", 0.0) + sample.value
            elif sample.name == "llmmesh_model_requests_total":
                outcome = sample.labels["outcome"]
                out[outcome] = out.get(outcome, 0.0) + sample.value
            elif sample.name == "llmmesh_model_prompt_tokens_total":
                key = f"prompt_{sample.labels['source']}"
                out[key] = out.get(key, 0.0) + sample.value
            elif sample.name == "llmmesh_model_last_cancel_time_seconds":
                out["last_cancel"] = max(out.get("last_cancel", 0.0), sample.value)
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls `predicate` every 50 ms until it holds or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def settled_counters(mesh: Mesh, quiet: float = 0.4, timeout: float = 10.0) -> dict[str, float]:
    """The model's counters once no earlier request is still running (unchanged for `quiet` seconds)."""
    deadline = time.monotonic() + timeout
    last = model_counters(mesh)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = model_counters(mesh)
        if now == last:
            return now
        last = now
    return last


def read_then_cancel(stub: generation_pb2_grpc.GenerationServiceStub, max_tokens: int, chunks: int = 5) -> int:
    """Starts a long greedy story, reads `chunks` chunks, then cancels the call from the client side; returns
    the token ids those chunks carried (a client that reads slowly gets several tokens per chunk: the gateway
    joins what waited for it)."""
    stream = stub.Generate(
        request("Write a long story about a dragon.", temperature=0.0, max_tokens=max_tokens), timeout=120
    )
    received = ids = 0
    for response in stream:
        received += response.HasField("chunk")
        ids += len(response.chunk.token_ids)
        if received == chunks:
            stream.cancel()
            break
    return ids
