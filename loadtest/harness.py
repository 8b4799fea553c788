"""Starts what a benchmark runs against: Triton serving the benchmark instrument, and the mesh in front of it.

The instrument's timing lives in its config.pbtxt; to run it at other settings, the model folder is
copied into a temporary model repository with `ttft_ms` and `itl_ms` rewritten. The mesh is the real
one (`llmmesh.launcher.Mesh`: Triton and the four service processes) with infer routing the default
model name `smollm2` to `instrument`; preprocess and postprocess keep SmolLM2's vocabulary, which is
what the instrument streams. The safety classifier (a second Triton model) is loaded only on request:
without it the mesh's classifier layer is off, and the blocklist and PII layers run as configured.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from llmmesh.common.registry import registry_file
from llmmesh.common.safety import DEFAULT_POLICY_PATH
from llmmesh.infer.triton_server import TritonServer, repository_root
from llmmesh.launcher import Mesh, MeshPorts

from . import procstats

__all__ = ["INSTRUMENT", "instrument_repository", "mesh_pids", "policy_without_pii", "running_mesh", "running_triton"]

INSTRUMENT = "instrument"
CLASSIFIER = "safety_classifier"


def instrument_repository(
    dest: Path, ttft_ms: float, itl_ms: float, others: tuple[str, ...] = (), cancel_check_every: int | None = None
) -> Path:
    """A model repository at `dest`: the instrument with the given timing (and how often it looks for a cancel,
    in tokens), and `others` as they are."""
    shutil.copytree(repository_root() / INSTRUMENT, dest / INSTRUMENT)
    for name in others:
        shutil.copytree(repository_root() / name, dest / name)
    config = dest / INSTRUMENT / "config.pbtxt"
    text = config.read_text()
    settings: list[tuple[str, float]] = [("ttft_ms", ttft_ms), ("itl_ms", itl_ms)]
    if cancel_check_every is not None:
        settings.append(("cancel_check_every", cancel_check_every))
    for key, value in settings:
        text, n = re.subn(rf'(key: "{key}" value: {{ string_value: ")[^"]*(")', rf"\g<1>{value:g}\g<2>", text)
        if n != 1:
            raise ValueError(f"{config}: parameter {key} not found")
    config.write_text(text)
    return dest


def policy_without_pii(dest: Path) -> Path:
    """The default safety policy with PII redaction off (its hold-back costs one token of latency)."""
    policy = yaml.safe_load(DEFAULT_POLICY_PATH.read_text(encoding="utf-8"))
    policy["pii"]["enabled"] = False
    policy["version"] = f"{policy['version']}-loadtest-no-pii"
    dest.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return dest


@contextlib.contextmanager
def running_triton(
    ttft_ms: float, itl_ms: float, log_dir: Path, ports: MeshPorts | None = None
) -> Iterator[TritonServer]:
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
def running_mesh(
    ttft_ms: float,
    itl_ms: float,
    log_dir: Path,
    env: dict[str, str] | None = None,
    pii: bool = True,
    classifier: bool = False,
    in_gateway: tuple[str, ...] = (),
    cancel_check_every: int | None = None,
) -> Iterator[Mesh]:
    """Triton (instrument) and the four services as processes; stopped in order (gateway first) on exit."""
    with tempfile.TemporaryDirectory(prefix="llmmesh-instrument-") as tmp:
        models = (INSTRUMENT, CLASSIFIER) if classifier else (INSTRUMENT,)
        # Dedup off unless asked for: the workloads repeat a few greedy prompts, and cache hits would measure
        # the result cache instead of what a generation costs in the mesh (dedup_bench.py turns it on).
        extra = {"LLMMESH_INFER_DEDUP": "false"}
        registry = registry_file(Path(tmp), triton_model=INSTRUMENT)
        if not pii:
            policy = policy_without_pii(Path(tmp) / "policy.yaml")
            extra["LLMMESH_PREPROCESS_SAFETY_POLICY_PATH"] = str(policy)
            extra["LLMMESH_POSTPROCESS_SAFETY_POLICY_PATH"] = str(policy)
        repository = instrument_repository(Path(tmp) / "models", ttft_ms, itl_ms, models[1:], cancel_check_every)
        with started_on_free_ports(
            lambda ports: Mesh(
                ports=ports,
                log_dir=log_dir,
                env={**extra, **(env or {})},
                triton_models=models,
                model_repository=repository,
                model_registry=registry,
                in_gateway=in_gateway,
            )
        ) as mesh:
            yield mesh


@contextlib.contextmanager
def started_on_free_ports(make: Callable[[MeshPorts], Mesh], timeout: float = 180.0) -> Iterator[Mesh]:
    """`make(ports)`'s mesh, started on free ports and stopped when the block ends. Free ports are picked
    by binding and releasing them: on a shared machine another process may take one before a service binds
    it, so a failed start is tried again on fresh ports (three tries)."""
    for attempt in range(3):
        mesh = make(MeshPorts.free())
        try:
            mesh.start(timeout=timeout)  # stops whatever it started if it fails
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield mesh
    finally:
        mesh.stop()


def mesh_pids(mesh: Mesh) -> dict[str, int]:
    """Every process whose cost is reported: the four services, tritonserver and its model stubs."""
    assert mesh.triton is not None
    pids = {name: proc.pid for name, proc in mesh.procs.items()}
    pids.update(triton_pids(mesh.triton))
    return pids


def triton_pids(triton: TritonServer) -> dict[str, int]:
    assert triton.pid is not None
    pids = {"triton": triton.pid}
    for child in procstats.children(triton.pid):
        # A python-backend stub's command line names its model.py: .../<model>/1/model.py
        model = procstats.stub_model(child)
        pids["triton_stub" if model in (None, INSTRUMENT) else f"triton_stub_{model}"] = child
    return pids
