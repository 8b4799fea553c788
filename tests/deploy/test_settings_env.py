"""Configuration is environment variables only: every variable a deployment sets for a service is one its
settings class reads, every setting without a default is set, and the values pass the settings' own
validation. The gateway and the three stages read the same model registry, its Triton models are the ones
Triton loads, and the CPU registry is the one shipped in the package."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmmesh.common.registry import DEFAULT_REGISTRY_PATH, ModelRegistry, load_registry

from .deployfiles import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    DEPLOY,
    MESH,
    NON_SETTINGS_ENV,
    TRITON_MODELS,
    container,
    container_env,
    dockerfile_stages,
    env_prefix,
    flag_values,
    k8s_find,
    load_compose,
    registry_contents,
    settings_class,
    volume_target,
)

GPU = load_compose(COMPOSE_GPU)
CPU = load_compose(COMPOSE_GPU, COMPOSE_CPU)


def _deployments() -> Iterator[tuple[str, str, dict[str, str]]]:
    """(where, service, environment) for each place that configures a service."""
    stages = dockerfile_stages()
    for name in MESH:
        yield "compose-gpu", name, dict(GPU["services"][name]["environment"])
        yield "compose-cpu", name, dict(CPU["services"][name]["environment"])
        yield "k8s", name, container_env(k8s_find("Deployment", name))
        yield "image", name, stages[name].env


CASES = list(_deployments())


@pytest.mark.parametrize(("where", "service", "env"), CASES, ids=[f"{w}-{s}" for w, s, _ in CASES])
def test_every_variable_is_a_setting_of_that_service(where: str, service: str, env: dict[str, str]) -> None:
    """A misspelled or misplaced LLMMESH_ variable would be ignored silently: none exists."""
    fields = settings_class(service).model_fields
    prefix = env_prefix(service)
    for key in env:
        if key in NON_SETTINGS_ENV:
            continue
        assert key.startswith(prefix), f"{where}: {key} is not a {service} setting"
        assert key.removeprefix(prefix).lower() in fields, f"{where}: {service} has no setting for {key}"


@pytest.mark.parametrize(("where", "service", "env"), CASES, ids=[f"{w}-{s}" for w, s, _ in CASES])
def test_settings_load_from_that_environment(
    where: str, service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's settings class accepts the environment as given, and every required setting is in it."""
    cls = settings_class(service)
    prefix = env_prefix(service)
    required = {f"{prefix}{name.upper()}" for name, f in cls.model_fields.items() if f.is_required()}
    assert required <= set(env), f"{where}: required settings not set: {sorted(required - set(env))}"
    for key in [k for k in os.environ if k.startswith("LLMMESH_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(prefix):
            monkeypatch.setenv(key, value)
    settings = cls()
    if f"{prefix}HOST" in env:
        assert settings.host == "0.0.0.0"


# The services that read the model registry: the gateway for its routes, prices and ListModels.
REGISTRY_READERS = ("preprocess", "infer", "postprocess", "gateway")


def _registry_path(where: str) -> str:
    """The registry path every reader of a deployment is given: one path for all three."""
    envs = {s: e for w, s, e in CASES if w == where}
    (path,) = {envs[s][f"{env_prefix(s)}MODEL_REGISTRY"] for s in REGISTRY_READERS}
    return path


def _compose_registry(compose: dict[str, Any], path: str) -> Path:
    """The file compose mounts at `path` into every reader (one file for all three)."""
    sources = set()
    for name in REGISTRY_READERS:
        volumes = [str(v) for v in compose["services"][name].get("volumes", []) if volume_target(v) == path]
        assert len(volumes) == 1, f"{name}: nothing mounted at {path}"
        source, _, mode = volumes[0].split(":")
        assert mode == "ro"
        sources.add(source)
    (source,) = sources
    return DEPLOY / source


def _k8s_registry(path: str, tmp_path: Path) -> Path:
    """The ConfigMap key every reader's pod mounts at `path`, written to a file."""
    texts = set()
    for name in REGISTRY_READERS:
        pod = k8s_find("Deployment", name)["spec"]["template"]["spec"]
        mounts = [
            m for m in container(k8s_find("Deployment", name))["volumeMounts"] if path.startswith(f"{m['mountPath']}/")
        ]
        assert len(mounts) == 1 and mounts[0].get("readOnly"), f"{name}: nothing mounted read-only at {path}"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        config_map = k8s_find("ConfigMap", volume["configMap"]["name"])
        texts.add(config_map["data"][path.removeprefix(f"{mounts[0]['mountPath']}/")])
    (text,) = texts
    file = tmp_path / "models.yaml"
    file.write_text(text)
    return file


def _registry(where: str, tmp_path: Path) -> ModelRegistry:
    path = _registry_path(where)
    if where == "k8s":
        return load_registry(_k8s_registry(path, tmp_path))
    return load_registry(_compose_registry(GPU if where == "compose-gpu" else CPU, path))


@pytest.mark.parametrize("where", ["compose-gpu", "compose-cpu", "k8s"])
def test_every_service_reads_one_valid_registry(where: str, tmp_path: Path) -> None:
    """The gateway, preprocess, infer and postprocess get the same registry file, which loads (tokenizers
    included), and clients' `default` is a name of its default model everywhere."""
    registry = _registry(where, tmp_path)
    assert registry.resolve("default") == registry.default


def _models(registry: ModelRegistry) -> list[tuple[object, ...]]:
    return [(m.name, m.aliases, m.default, m.triton_model, m.tokenizer, m.template, m.context_length) for m in registry]


def test_gpu_routes_to_the_tensorrt_llm_model_the_fill_script_writes(tmp_path: Path) -> None:
    """On GPU (compose and Kubernetes, the same models) infer routes to `tensorrt_llm`, the fill script's
    default model name."""
    usage = subprocess.run(
        [sys.executable, str(DEPLOY / "fill_trtllm_config.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "tensorrt_llm" in usage
    compose, k8s = _registry("compose-gpu", tmp_path), _registry("k8s", tmp_path)
    assert _models(compose) == _models(k8s)
    assert set(compose.triton_models().values()) == {"tensorrt_llm"}


def test_cpu_routes_only_to_models_triton_loads(tmp_path: Path) -> None:
    """The CPU Triton loads every model the registry routes to (infer is SERVING with one of them ready, but a
    model Triton does not serve would fail every request for it)."""
    loaded = flag_values(CPU["services"]["triton"]["command"], "--load-model")
    routed = set(_registry("compose-cpu", tmp_path).triton_models().values())
    assert routed <= set(loaded)
    for model in routed:
        assert (TRITON_MODELS / model / "config.pbtxt").is_file()
    assert routed == {"smollm2", "gemma3"}


def test_cpu_registry_is_the_shipped_one_but_for_aliases() -> None:
    """deploy/models.cpu.yaml serves the models and routes of the registry shipped in the package (same Triton
    models, tokenizers, templates, context lengths, prices; same routes), so the two cannot drift; only the
    aliases may differ (`default`, which clients share with the GPU deployment)."""
    cpu, shipped = DEPLOY / "models.cpu.yaml", DEFAULT_REGISTRY_PATH
    assert registry_contents(cpu, aliases=False) == registry_contents(shipped, aliases=False)
    cpu_registry, shipped_registry = load_registry(cpu, tokenizers=False), load_registry(shipped, tokenizers=False)
    assert cpu_registry.default.name == shipped_registry.default.name
    assert cpu_registry.resolve("default") == cpu_registry.default
    # The shipped aliases still name the same models (a client of `gemma3` is served on both).
    for alias, model in shipped_registry.aliases().items():
        assert cpu_registry.resolve(alias).name == model
