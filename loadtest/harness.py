"""Starts what a benchmark runs against: Triton serving the benchmark instrument, and the mesh in front of it.

The instrument's timing lives in its config.pbtxt; to run it at other settings, the model folder is
copied into a temporary model repository with `ttft_ms` and `itl_ms` rewritten. The mesh is the real
one (`llmmesh.launcher.Mesh`, four service processes) with infer routing the default model name
`smollm2` to `instrument`; preprocess and postprocess keep SmolLM2's vocabulary, which is what the
instrument streams.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmmesh.infer.triton_server import TritonServer, repository_root
from llmmesh.launcher import SERVICES, Mesh, MeshPorts

from . import procstats

__all__ = ["INSTRUMENT", "instrument_repository", "mesh_pids", "running_mesh", "running_triton"]

INSTRUMENT = "instrument"


def instrument_repository(dest: Path, ttft_ms: float, itl_ms: float) -> Path:
    """A model repository at `dest` holding the instrument with the given timing; returns `dest`."""
    shutil.copytree(repository_root() / INSTRUMENT, dest / INSTRUMENT)
    config = dest / INSTRUMENT / "config.pbtxt"
    text = config.read_text()
    for key, value in (("ttft_ms", ttft_ms), ("itl_ms", itl_ms)):
        text, n = re.subn(
            rf'(key: "{key}" value: {{ string_value: ")[^"]*(")', rf"\g<1>{value:g}\g<2>", text
        )
        if n != 1:
            raise ValueError(f"{config}: parameter {key} not found")
    config.write_text(text)
    return dest


@contextlib.contextmanager
def running_triton(ttft_ms: float, itl_ms: float, log_dir: Path, ports: MeshPorts | None = None) -> Iterator[TritonServer]:
    """Triton alone, serving the instrument at the given timing, on free loopback ports."""
    ports = ports or MeshPorts.free()
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmmesh-instrument-") as tmp:
        server = TritonServer(
            grpc_port=ports.triton_grpc,
            http_port=ports.triton_http,
            metrics_port=ports.triton_metrics,
            models=(INSTRUMENT,),
            model_repository=instrument_repository(Path(tmp), ttft_ms, itl_ms),
            log_path=log_dir / "triton.log",
        )
        server.start()
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def running_mesh(ttft_ms: float, itl_ms: float, log_dir: Path, env: dict[str, str] | None = None) -> Iterator[Mesh]:
    """Triton (instrument) and the four services as processes; stopped in order on exit."""
    ports = MeshPorts.free()
    mesh = Mesh(
        ports=ports,
        log_dir=log_dir,
        env={"LLMMESH_INFER_MODELS": json.dumps({"smollm2": INSTRUMENT}), **(env or {})},
        triton_models=(INSTRUMENT,),
    )
    with running_triton(ttft_ms, itl_ms, log_dir, ports) as triton:
        # `mesh.stop()` then stops the services, gateway first, and Triton last (stopping it twice is harmless).
        mesh.triton = triton
        try:
            for name in SERVICES:
                mesh.start_service(name)
            mesh.wait_serving(SERVICES, timeout=120)
            yield mesh
        finally:
            mesh.stop()


def mesh_pids(mesh: Mesh) -> dict[str, int]:
    """Every process whose cost is reported: the four services, tritonserver and the instrument's stub."""
    assert mesh.triton is not None
    pids = {name: proc.pid for name, proc in mesh.procs.items()}
    pids.update(triton_pids(mesh.triton))
    return pids


def triton_pids(triton: TritonServer) -> dict[str, int]:
    assert triton.pid is not None
    pids = {"triton": triton.pid}
    for i, child in enumerate(procstats.children(triton.pid)):
        pids["triton_stub" if i == 0 else f"triton_stub_{i}"] = child
    return pids
