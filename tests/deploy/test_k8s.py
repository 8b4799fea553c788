"""Kubernetes: every manifest validates against a pinned Kubernetes release, and the mesh is probed,
balanced, autoscaled, protected from disruptions and drained the way deploy/README.md says."""

from __future__ import annotations

from typing import Any

import pytest

from llmmesh.common.safety import load_policy

from .deployfiles import (
    COMPOSE_GPU,
    K8S,
    KUBERNETES_VERSION,
    MESH,
    container,
    container_env,
    container_port,
    k8s_documents,
    k8s_find,
    kustomize_resources,
    load_compose,
    yaml,
)

STAGES = (*MESH, "triton")
HEADLESS = ("preprocess", "infer", "postprocess", "triton")
DEPLOYMENTS = {name: k8s_find("Deployment", name) for name in STAGES}


def _pod(name: str) -> dict[str, Any]:
    return dict(DEPLOYMENTS[name]["spec"]["template"]["spec"])


def _pre_stop_seconds(name: str) -> float:
    command = container(DEPLOYMENTS[name])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


def test_manifests_validate_against_the_pinned_kubernetes_release() -> None:
    """Every resource the kustomization applies is valid (strict: no unknown fields) for Kubernetes 1.32."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
    )
    documents = k8s_documents()
    assert documents
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest() -> None:
    """No manifest in deploy/k8s is left out of `kubectl apply -k` (the adapter values are Helm input)."""
    listed = {p.name for p in kustomize_resources()}
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert all(d["metadata"].get("namespace", "llmmesh") == "llmmesh" for d in k8s_documents())


@pytest.mark.parametrize("name", MESH)
def test_mesh_probes_are_grpc_and_readiness_differs_from_liveness(name: str) -> None:
    """Readiness asks the server's overall health; liveness and startup ask the dependency-free `liveness` name."""
    c = container(DEPLOYMENTS[name])
    port = container_port(DEPLOYMENTS[name], "grpc")
    readiness, liveness, startup = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    assert readiness["grpc"] == {"port": port}
    assert liveness["grpc"] == {"port": port, "service": "liveness"}
    assert startup["grpc"] == liveness["grpc"]
    # Readiness reacts within seconds; liveness only after a long run of failures.
    ready_window = readiness["periodSeconds"] * readiness["failureThreshold"]
    live_window = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert ready_window < live_window
    assert int(container_env(DEPLOYMENTS[name])[f"LLMMESH_{name.upper()}_PORT"]) == port


def test_triton_probes_use_its_live_and_ready_endpoints() -> None:
    """Triton is live when its server runs and ready when every model is loaded; loading gets 10 minutes."""
    c = container(DEPLOYMENTS["triton"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("name", MESH)
def test_termination_grace_outlasts_the_drain(name: str) -> None:
    """The kubelet waits longer than the preStop pause plus the service's drain before it kills."""
    grace = float(container_env(DEPLOYMENTS[name])[f"LLMMESH_{name.upper()}_GRACE_SECONDS"])
    assert _pod(name)["terminationGracePeriodSeconds"] > _pre_stop_seconds(name) + grace


def test_triton_termination_grace_outlasts_its_exit_timeout() -> None:
    """Triton's own drain (--exit-timeout-secs) fits in its termination grace period."""
    args = container(DEPLOYMENTS["triton"])["args"]
    exit_timeout = next(float(a.split("=", 1)[1]) for a in args if a.startswith("--exit-timeout-secs="))
    assert _pod("triton")["terminationGracePeriodSeconds"] > _pre_stop_seconds("triton") + exit_timeout


def test_triton_requests_a_whole_gpu() -> None:
    """Triton's pod requests and is limited to one nvidia.com/gpu; nothing else asks for a GPU."""
    resources = container(DEPLOYMENTS["triton"])["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    for name in MESH:
        assert "nvidia.com/gpu" not in str(container(DEPLOYMENTS[name])["resources"])
        assert container(DEPLOYMENTS[name])["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_an_autoscaler(name: str) -> None:
    """infer and Triton scale on custom load metrics, the rest on CPU; the HPA alone owns the replica count."""
    hpa = k8s_find("HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in DEPLOYMENTS[name]["spec"]
    metrics = hpa["spec"]["metrics"]
    if name in ("infer", "triton"):
        assert [m["type"] for m in metrics] == ["Pods"]
    else:
        assert metrics == [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            }
        ]


def test_custom_metrics_come_from_the_adapter_rules() -> None:
    """The Pods metrics the HPAs ask for are the names the Prometheus Adapter rules publish."""
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    published = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    wanted = {
        m["pods"]["metric"]["name"]
        for name in ("infer", "triton")
        for m in k8s_find("HorizontalPodAutoscaler", name)["spec"]["metrics"]
    }
    assert wanted == published == {"llmmesh_infer_inflight_streams", "triton_waiting_requests"}


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_a_disruption_budget(name: str) -> None:
    """Voluntary disruptions take at most one pod of a stage at a time."""
    pdb = k8s_find("PodDisruptionBudget", name)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= DEPLOYMENTS[name]["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("name", STAGES)
def test_services_select_their_pods_and_named_ports(name: str) -> None:
    """Each Service selects its Deployment's pods and targets container ports that exist."""
    service = k8s_find("Service", name)
    labels = DEPLOYMENTS[name]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in container(DEPLOYMENTS[name])["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_stages_behind_headless_services_for_client_side_balancing() -> None:
    """Callers resolve every pod of a stage (clusterIP None) through dns:/// URLs with matching ports."""
    for name in HEADLESS:
        assert k8s_find("Service", name)["spec"]["clusterIP"] == "None", name
    assert k8s_find("Service", "gateway")["spec"].get("clusterIP") != "None"
    gateway = container_env(DEPLOYMENTS["gateway"])
    for stage in ("preprocess", "infer", "postprocess"):
        port = container_port(DEPLOYMENTS[stage], "grpc")
        assert gateway[f"LLMMESH_GATEWAY_{stage.upper()}_URL"] == f"dns:///{stage}:{port}"
    triton_port = container_port(DEPLOYMENTS["triton"], "grpc")
    assert container_env(DEPLOYMENTS["infer"])["LLMMESH_INFER_TRITON_URL"] == f"dns:///triton:{triton_port}"


def test_preprocess_and_postprocess_reach_the_safety_classifier_through_tritons_service() -> None:
    """The shipped policy enables the classifier: both stages that run it get Triton's headless Service on the
    port Triton serves gRPC on, as infer does (without it the layer is silently off)."""
    assert load_policy().classifier.enabled
    service_port = next(p for p in k8s_find("Service", "triton")["spec"]["ports"] if p["name"] == "grpc")
    assert service_port["port"] == container_port(DEPLOYMENTS["triton"], "grpc")
    assert "--grpc-port=8001" in container(DEPLOYMENTS["triton"])["args"]
    for stage in ("preprocess", "postprocess"):
        url = container_env(DEPLOYMENTS[stage])[f"LLMMESH_{stage.upper()}_TRITON_URL"]
        assert url == f"dns:///triton:{service_port['port']}", stage


def test_pods_run_unprivileged() -> None:
    """Every pod runs as a non-root user without privilege escalation."""
    for doc in k8s_documents():
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_redis_holds_the_shared_dedup_state() -> None:
    """Redis runs with a Service of its own for the stages to share dedup state through."""
    assert container(k8s_find("Deployment", "redis"))["image"].startswith("redis:")
    assert k8s_find("Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_model_repository_is_shared_and_read_only_for_triton() -> None:
    """Triton mounts the model repository claim read-only at /models and reads /models/repository, all of it
    (no explicit model control: the safety classifier placed there is loaded with the engine)."""
    pod = _pod("triton")
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "llmmesh-models", "readOnly": True}
    k8s_find("PersistentVolumeClaim", "llmmesh-models")
    mount = next(m for m in container(DEPLOYMENTS["triton"])["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    args = container(DEPLOYMENTS["triton"])["args"]
    assert [a for a in args if a.startswith("--model-repository=")] == ["--model-repository=/models/repository"]
    assert not any(a.startswith(("--model-control-mode=", "--load-model=")) for a in args)


def test_images_match_the_compose_deployment() -> None:
    """Kubernetes runs the same pinned Triton image as the GPU compose file, and our images by service name."""
    compose = load_compose(COMPOSE_GPU)["services"]
    assert container(DEPLOYMENTS["triton"])["image"] == compose["triton"]["image"]
    for name in MESH:
        assert container(DEPLOYMENTS[name])["image"].split(":")[0] == compose[name]["image"].split(":")[0]
