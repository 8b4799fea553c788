"""The Kubernetes CPU overlay (deploy/k8s-cpu): the base manifests with Triton on the triton-cpu image that
docker-compose.cpu.yml builds, loading both CPU models and the classifier without a GPU or a model claim,
and the CPU model registry in the ConfigMap that the gateway and the three stages mount."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llmmesh.common.registry import load_registry

from .deployfiles import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    DEPLOY,
    K8S_CPU,
    KUBERNETES_VERSION,
    MESH,
    container,
    container_env,
    dockerfile_stages,
    flag_values,
    k8s_documents,
    k8s_find,
    k8s_key,
    kustomize_build,
    load_compose,
    registry_contents,
    yaml,
)

OVERLAY = kustomize_build(K8S_CPU)
BASE = k8s_documents()
TRITON = k8s_find("Deployment", "triton", OVERLAY)
# What the overlay changes; everything else is the base as it is.
CHANGED = {("Deployment", "triton"), ("HorizontalPodAutoscaler", "triton"), ("ConfigMap", "llmmesh-models")}
DELETED = {("PersistentVolumeClaim", "llmmesh-models")}
CPU_MODELS = ["smollm2", "gemma3", "safety_classifier"]


def test_overlay_files_parse_and_patch_what_the_base_has() -> None:
    """Every file of the overlay is YAML, and each patch names one resource of the base (the build in
    deployfiles fails on a target or a JSON-patch path that does not exist)."""
    kustomization = yaml.safe_load((K8S_CPU / "kustomization.yaml").read_text())
    listed = {p["path"] for p in kustomization["patches"]}
    assert listed == {p.name for p in K8S_CPU.glob("*.yaml")} - {"kustomization.yaml"}
    assert kustomization["resources"] == ["../k8s"]
    for path in K8S_CPU.glob("*.yaml"):
        assert yaml.safe_load(path.read_text()), path.name
    base = {k8s_key(d) for d in BASE}
    assert base >= CHANGED | DELETED
    assert {k8s_key(d) for d in OVERLAY} == base - DELETED


def test_overlay_builds_as_kustomize_does() -> None:
    """`kubectl kustomize deploy/k8s-cpu` (what `kubectl apply -k` applies) gives the same resources as the
    build these tests read."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay is built by deployfiles.kustomize_build only")
    out = subprocess.run([kubectl, "kustomize", str(K8S_CPU)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = {k8s_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    assert built == {k8s_key(d): d for d in OVERLAY}


def test_overlay_validates_against_the_pinned_kubernetes_release() -> None:
    """Every resource the overlay applies is valid (strict) for Kubernetes 1.32."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
    )
    for doc in OVERLAY:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_only_triton_and_the_registry_differ_from_the_base() -> None:
    """The four services, their probes, autoscalers and budgets, Redis and the namespace are the base's."""
    base = {k8s_key(d): d for d in BASE}
    for doc in OVERLAY:
        if k8s_key(doc) not in CHANGED:
            assert doc == base[k8s_key(doc)], k8s_key(doc)


def test_cpu_triton_runs_the_compose_image_and_loads_both_models() -> None:
    """Triton runs the triton-cpu image docker-compose.cpu.yml builds, with the model flags of that image's
    own command and of compose: SmolLM2, Gemma 3 270M and the safety classifier from the image's /models."""
    compose = load_compose(COMPOSE_GPU, COMPOSE_CPU)["services"]["triton"]
    image = dockerfile_stages()["triton-cpu"]
    c = container(TRITON)
    assert c["image"].split(":")[0] == compose["image"].split(":")[0] == "llmmesh/triton-cpu"
    assert compose["build"]["target"] == "triton-cpu" and image.entrypoint is None and image.cmd is not None
    args = c["args"]
    assert args[0] == "tritonserver"
    assert flag_values(args, "--load-model") == CPU_MODELS
    for flag in ("--model-repository", "--backend-directory", "--model-control-mode", "--load-model"):
        assert flag_values(args, flag) == flag_values(image.cmd, flag) == flag_values(compose["command"], flag), flag
    # The ports, trace export and drain of the base's Triton (Service, probes and scrape config rely on them).
    base_args = container(k8s_find("Deployment", "triton"))["args"]
    for flag in ("--grpc-port", "--http-port", "--metrics-port", "--exit-timeout-secs", "--trace-config"):
        assert flag_values(args, flag) == flag_values(base_args, flag), flag


def test_cpu_triton_needs_no_gpu_and_no_model_claim() -> None:
    """No GPU request, limit or toleration anywhere; Triton runs as the image's user and mounts only its
    shared memory, since the image carries its models; every volume a pod mounts exists."""
    assert "nvidia.com/gpu" not in yaml.safe_dump(OVERLAY)
    pod = TRITON["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert container(TRITON)["resources"]["requests"]["cpu"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)
    assert dockerfile_stages()["triton-cpu"].user == "10001:10001"
    assert [m["mountPath"] for m in container(TRITON)["volumeMounts"]] == ["/dev/shm"]
    names = {k8s_key(d) for d in OVERLAY}
    for doc in OVERLAY:
        if doc["kind"] != "Deployment":
            continue
        for volume in doc["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names


def test_cpu_triton_scales_on_cpu() -> None:
    """The TensorRT-LLM queue metric the base scales Triton on does not exist on CPU: its HPA uses CPU."""
    hpa = k8s_find("HorizontalPodAutoscaler", "triton", OVERLAY)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def _mounted_registry(name: str) -> str:
    """The ConfigMap text a service's pod mounts at the path its MODEL_REGISTRY setting names."""
    deployment = k8s_find("Deployment", name, OVERLAY)
    path = container_env(deployment)[f"LLMMESH_{name.upper()}_MODEL_REGISTRY"]
    (mount,) = [m for m in container(deployment)["volumeMounts"] if path.startswith(f"{m['mountPath']}/")]
    assert mount.get("readOnly") is True
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = k8s_find("ConfigMap", volume["configMap"]["name"], OVERLAY)
    return str(config_map["data"][path.removeprefix(f"{mount['mountPath']}/")])


def test_every_reader_mounts_the_cpu_registry(tmp_path: Path) -> None:
    """The gateway and the three stages read one ConfigMap, which holds deploy/models.cpu.yaml's models
    (names, aliases, Triton models, tokenizers, prices) and routes; every Triton model it routes to is loaded."""
    (text,) = {_mounted_registry(name) for name in MESH}
    file = tmp_path / "models.yaml"
    file.write_text(text)
    assert registry_contents(file) == registry_contents(DEPLOY / "models.cpu.yaml")
    routed = set(load_registry(file, tokenizers=False).triton_models().values())
    assert routed == {"smollm2", "gemma3"} and routed <= set(flag_values(container(TRITON)["args"], "--load-model"))
    assert {r.name for r in load_registry(file, tokenizers=False).routes} == {"auto", "reliable", "careful", "ab"}
