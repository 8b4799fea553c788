"""Configuration is environment variables only: every variable a deployment sets for a service is one its
settings class reads, every setting without a default is set, and the values pass the settings' own
validation. The routing table, the default model and the models Triton loads agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .deployfiles import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    DEPLOY,
    MESH,
    NON_SETTINGS_ENV,
    TRITON_MODELS,
    container_env,
    dockerfile_stages,
    env_prefix,
    flag_values,
    k8s_find,
    load_compose,
    settings_class,
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


def _routing(env: dict[str, str]) -> dict[str, str]:
    return dict(json.loads(env["LLMMESH_INFER_MODELS"]))


def _default_models(services: dict[str, dict[str, str]]) -> tuple[str, str]:
    return (
        services["preprocess"]["LLMMESH_PREPROCESS_DEFAULT_MODEL"],
        services["postprocess"]["LLMMESH_POSTPROCESS_DEFAULT_MODEL"],
    )


@pytest.mark.parametrize("where", ["compose-gpu", "compose-cpu", "k8s"])
def test_the_default_model_is_routed(where: str) -> None:
    """The model name preprocess gives requests is one infer routes, and postprocess decodes the same model."""
    envs = {s: e for w, s, e in CASES if w == where}
    pre, post = _default_models(envs)
    assert pre == post
    assert pre in _routing(envs["infer"])


def test_gpu_routes_to_the_tensorrt_llm_model_the_fill_script_writes() -> None:
    """On GPU (compose and Kubernetes) infer routes to `tensorrt_llm`, the fill script's default model name."""
    usage = subprocess.run(
        [sys.executable, str(DEPLOY / "fill_trtllm_config.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "tensorrt_llm" in usage
    for env in (GPU["services"]["infer"]["environment"], container_env(k8s_find("Deployment", "infer"))):
        assert set(_routing(env).values()) == {"tensorrt_llm"}


def test_cpu_routes_only_to_models_triton_loads() -> None:
    """infer is SERVING only when every routed model is ready: the CPU Triton loads each of them."""
    loaded = flag_values(CPU["services"]["triton"]["command"], "--load-model")
    routed = set(_routing(CPU["services"]["infer"]["environment"]).values())
    assert routed <= set(loaded)
    for model in routed:
        assert (TRITON_MODELS / model / "config.pbtxt").is_file()
