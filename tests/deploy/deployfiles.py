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
from collections.abc import Collection, Iterator, Mapping
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
# The CPU overlay of the Kubernetes manifests (beside the base: kustomize refuses an overlay inside it).
K8S_CPU = DEPLOY / "k8s-cpu"
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
    | {"HF_HUB_OFFLINE", "XDG_CACHE_HOME"}
)
# Image variables naming folders of the image itself (the model cache holding Gemma's assembled GGUF): a
# service run outside the image keeps its own.
IMAGE_PATH_ENV = frozenset({"PATH", "XDG_CACHE_HOME"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_besides(taken: Collection[int]) -> int:
    """A free loopback port that is none of `taken` (ports picked earlier and not bound yet)."""
    port = free_port()
    while port in taken:
        port = free_port()
    return port


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


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    """A compose service's health check test as the argv it runs: exec form (`CMD`) as written, `CMD-SHELL`
    split as the shell would split it (the tests here use no shell features)."""
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"unexpected health check form {test!r}"
    return shlex.split(test[1]) if test[0] == "CMD-SHELL" else [str(a) for a in test[1:]]


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


# ---- model registries ----------------------------------------------------------------------------


def registry_contents(path: Path, *, aliases: bool = True) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """A registry file's models (every field its entries set, prices included) and routes, comparable between
    files: the tokenizers are resolved (each must exist here) but where they were found is left out."""
    from dataclasses import replace

    from llmmesh.common.registry import load_registry

    registry = load_registry(path)
    models = tuple(replace(m, gguf_path=None, aliases=m.aliases if aliases else ()) for m in registry)
    return models, registry.routes


# ---- Kubernetes ----------------------------------------------------------------------------------


def kustomize_resources() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / r for r in kustomization["resources"]]


def k8s_documents() -> list[dict[str, Any]]:
    """Every resource the kustomization applies, in order."""
    return [doc for path in kustomize_resources() for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_find(kind: str, name: str, documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [
        d
        for d in (k8s_documents() if documents is None else documents)
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def k8s_key(doc: dict[str, Any]) -> tuple[str, str]:
    return str(doc["kind"]), str(doc["metadata"]["name"])


_CLUSTER_SCOPED = frozenset({"Namespace"})


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"not a JSON pointer: {path!r}"
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json_patch(doc: Any, operations: list[dict[str, Any]], where: str) -> None:
    """RFC 6902 add, replace and remove, in place; a path that does not exist fails as it does in kustomize."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" and kind == "add" else int(last)
            assert 0 <= index <= len(node) - (kind != "add"), f"{where}: {op['path']} is not in the list"
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            elif kind == "remove":
                del node[index]
            else:
                raise NotImplementedError(f"{where}: op {kind!r}")
            continue
        assert kind == "add" or last in node, f"{where}: {op['path']} does not exist"
        if kind in ("add", "replace"):
            node[last] = op["value"]
        elif kind == "remove":
            del node[last]
        else:
            raise NotImplementedError(f"{where}: op {kind!r}")


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = str(doc["apiVersion"]).rpartition("/")
    actual = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group, "version": version}
    return all(actual[key] == value for key, value in target.items())


def kustomize_build(root: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize root` applies, in accumulation order, for the features deploy/ uses: resources
    (files, or folders with a kustomization), `namespace`, and `patches` that are JSON patches with a target
    or strategic-merge deletions (`$patch: delete`). Anything else raises, so a new feature is noticed."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "patches"}
    if unknown:
        raise NotImplementedError(f"{root}: kustomization fields {sorted(unknown)}")
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (root / resource).resolve()
        if path.is_dir():
            documents += kustomize_build(path)
        else:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        where = f"{root.name}/{patch['path']}"
        content = yaml.safe_load((root / patch["path"]).read_text())
        if isinstance(content, list):
            targets = [d for d in documents if _matches(d, patch["target"])]
            assert len(targets) == 1, f"{where}: its target {patch['target']} matches {len(targets)} resources"
            _json_patch(targets[0], content, where)
        elif content.get("$patch") == "delete" and "target" not in patch:
            key = k8s_key(content)
            assert key in {k8s_key(d) for d in documents}, f"{where}: deletes {key}, which is not there"
            documents = [d for d in documents if k8s_key(d) != key]
        else:
            raise NotImplementedError(f"{where}: only JSON patches and `$patch: delete` are read here")
    if "namespace" in kustomization:
        for doc in documents:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return documents


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
