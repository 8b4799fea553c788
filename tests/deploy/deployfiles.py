"""Reading deploy/ as the tools read it: compose files merged like Compose merges them, Kubernetes documents
in the order kustomize applies them, Dockerfile stages with what each inherits, and the settings classes
the services read their environment with.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (pip install pyyaml) reads the compose and Kubernetes files")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_GPU = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
COMPOSE_UI = DEPLOY / "docker-compose.ui.yml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
TRITON_MODELS = ROOT / "triton_models"
# The Kubernetes release the manifests are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.32.0"
# Our four services, in the order the gateway depends on them.
MESH = ("preprocess", "infer", "postprocess", "gateway")
# Environment a mesh container may carry besides its own LLMMESH_<SERVICE>_ settings (Python's and pip's
# own switches, set by the image).
NON_SETTINGS_ENV = frozenset(
    {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}
    | {"HF_HUB_OFFLINE"}
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_class(service: str) -> Any:
    """The pydantic-settings class a service reads its environment with."""
    if service == "gateway":
        from llmmesh.gateway.server import GatewaySettings

        return GatewaySettings
    if service == "preprocess":
        from llmmesh.preprocess.server import PreprocessSettings

        return PreprocessSettings
    if service == "infer":
        from llmmesh.infer.server import InferSettings

        return InferSettings
    if service == "postprocess":
        from llmmesh.postprocess.server import PostprocessSettings

        return PostprocessSettings
    raise KeyError(service)


def env_prefix(service: str) -> str:
    return f"LLMMESH_{service.upper()}_"


# ---- compose -------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and $$ in every string of a loaded file."""
    if isinstance(value, str):

        def replace(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            return environ.get(m.group("name")) or (m.group("default") or "")

        return _VARIABLE.sub(replace, value)
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    return value


def _environment(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):
        return dict(item.split("=", 1) for item in value)
    return {k: "" if v is None else str(v) for k, v in value.items()}


def volume_target(volume: Any) -> str:
    return str(volume["target"]) if isinstance(volume, dict) else str(volume).split(":")[1]


def _merge_service(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Compose's override rules for the keys our files use: mappings merge, volumes merge by container
    path, commands and scalars are replaced, other lists are joined."""
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        if key == "environment":
            merged[key] = {**_environment(old), **_environment(value)}
        elif key == "volumes":
            by_target = {volume_target(v): v for v in old or []}
            by_target.update({volume_target(v): v for v in value})
            merged[key] = list(by_target.values())
        elif key in ("command", "entrypoint") or old is None:
            merged[key] = value
        elif isinstance(old, dict) and isinstance(value, dict):
            merged[key] = {**old, **value}
        elif isinstance(old, list) and isinstance(value, list):
            merged[key] = old + [v for v in value if v not in old]
        else:
            merged[key] = value
    return merged


def load_compose(*files: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The files merged in order, as `docker compose -f A -f B config` would give them (relative paths
    left relative to deploy/). `environ` stands in for the shell's variables (default: none set)."""
    merged: dict[str, Any] = {"services": {}}
    for path in files:
        doc = interpolate(yaml.safe_load(path.read_text()), environ or {})
        for name, service in doc.get("services", {}).items():
            if "environment" in service:
                service["environment"] = _environment(service["environment"])
            old = merged["services"].get(name)
            merged["services"][name] = service if old is None else _merge_service(old, service)
    return merged


def compose_tool() -> list[str] | None:
    """Debian's docker-compose 1.29 (validates offline), else the Compose v2 plugin, else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(*files: Path) -> subprocess.CompletedProcess[str]:
    """`<compose> -f ... config` run in deploy/, with none of the files' variables set in its environment."""
    tool = compose_tool()
    assert tool is not None
    args = [*tool, *(a for f in files for a in ("-f", str(f))), "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMMESH_")}
    return subprocess.run(args, cwd=DEPLOY, capture_output=True, text=True, env=env, timeout=120)


def duration_seconds(text: str | int | float) -> float:
    """Compose durations ("30s", "1m30s", "1h") in seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def flag_values(command: list[str], flag: str) -> list[str]:
    """Every value of `--flag=value` in a command line."""
    return [a.split("=", 1)[1] for a in command if a.startswith(f"{flag}=")]


# ---- Kubernetes ----------------------------------------------------------------------------------


def kustomize_resources() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / r for r in kustomization["resources"]]


def k8s_documents() -> list[dict[str, Any]]:
    """Every resource the kustomization applies, in order."""
    return [doc for path in kustomize_resources() for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", [])}


def container_port(deployment: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in container(deployment)["ports"] if p["name"] == name)


# ---- Dockerfile ----------------------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage, with what it inherits from the stage it starts FROM."""

    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    healthcheck: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _exec_form(text: str) -> list[str]:
    return list(json.loads(text)) if text.startswith("[") else ["/bin/sh", "-c", text]


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "FROM":
            words = rest.split()
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else base
            parent = stages.get(base)
            current = Stage(name=name, base=base)
            if parent is not None:
                current.env = dict(parent.env)
                current.user, current.healthcheck = parent.user, parent.healthcheck
                current.entrypoint, current.cmd = parent.entrypoint, parent.cmd
            stages[name] = current
            continue
        if current is None:
            continue
        current.instructions.append((keyword, rest))
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                current.env[key] = value
        elif keyword == "USER":
            current.user = rest
        elif keyword == "HEALTHCHECK":
            current.healthcheck = rest
        elif keyword == "ENTRYPOINT":
            current.entrypoint = _exec_form(rest)
            current.cmd = None
        elif keyword == "CMD":
            current.cmd = _exec_form(rest)
    return stages
