"""docker-compose: both variants validate, start health-gated, stop without cutting a drain short, and
wire Triton, the services and the observability stack to each other."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llmmesh.common.safety import load_policy

from .deployfiles import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    COMPOSE_UI,
    DEPLOY,
    MESH,
    TRITON_MODELS,
    compose_config,
    compose_tool,
    duration_seconds,
    flag_values,
    healthcheck_argv,
    load_compose,
    volume_target,
    yaml,
)

needs_compose = pytest.mark.skipif(
    compose_tool() is None, reason="docker-compose not installed (apt-get install docker-compose)"
)

GPU = load_compose(COMPOSE_GPU)
CPU = load_compose(COMPOSE_GPU, COMPOSE_CPU)
VARIANTS = pytest.mark.parametrize("compose", [GPU, CPU], ids=["gpu", "cpu"])
TRACE_FLAGS = {
    "mode=opentelemetry",
    "rate=1",
    "level=TIMESTAMPS",
    "opentelemetry,url=http://otel-collector:4318/v1/traces",
}


def _env(compose: dict[str, Any], service: str) -> dict[str, str]:
    return dict(compose["services"][service].get("environment", {}))


def _healthcheck_test(compose: dict[str, Any], service: str) -> list[str]:
    return healthcheck_argv(compose["services"][service])


@needs_compose
@pytest.mark.parametrize(
    "files",
    [(COMPOSE_GPU,), (COMPOSE_GPU, COMPOSE_CPU), (COMPOSE_GPU, COMPOSE_CPU, COMPOSE_UI)],
    ids=["gpu", "cpu", "cpu+ui"],
)
def test_compose_files_validate(files: tuple) -> None:
    """docker-compose accepts every variant, overrides included."""
    result = compose_config(*files)
    assert result.returncode == 0, result.stderr


@needs_compose
@pytest.mark.parametrize("files", [(COMPOSE_GPU,), (COMPOSE_GPU, COMPOSE_CPU)], ids=["gpu", "cpu"])
def test_the_tests_read_the_files_as_compose_does(files: tuple) -> None:
    """The merge these tests (and the topology test) rely on gives what docker-compose itself gives."""
    ours = load_compose(*files)
    theirs = yaml.safe_load(compose_config(*files).stdout)
    assert set(ours["services"]) == set(theirs["services"])
    for name, service in theirs["services"].items():
        mine = ours["services"][name]
        assert _env(ours, name) == {k: str(v) for k, v in (service.get("environment") or {}).items()}, name
        for key in ("image", "command", "runtime", "user"):
            assert mine.get(key) == service.get(key), f"{name}.{key}"
        assert sorted(map(volume_target, mine.get("volumes", []))) == sorted(
            map(volume_target, service.get("volumes", []))
        ), name


def test_the_stack_has_what_the_issue_names() -> None:
    """Triton, the four services, the collector, Jaeger, Prometheus and Redis all run."""
    assert set(GPU["services"]) == {*MESH, "triton", "otel-collector", "jaeger", "prometheus", "redis"}


def test_gpu_triton_is_ngc_trtllm_image_pinned_with_the_template() -> None:
    """The GPU Triton is NGC's trtllm image at a pinned yy.mm tag, the one the TensorRT-LLM template names."""
    triton = GPU["services"]["triton"]
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-trtllm-python-py3", triton["image"])
    assert match, triton["image"]
    template = (TRITON_MODELS / "tensorrt_llm" / "config.pbtxt.template").read_text()
    assert f"tritonserver:{match.group(1)}-trtllm-python-py3" in template
    assert triton["runtime"] == "nvidia" and triton["environment"]["NVIDIA_VISIBLE_DEVICES"]
    assert flag_values(triton["command"], "--model-repository") == ["/models/repository"]
    # The whole repository is loaded, so the `safety_classifier` the operator puts there is served too.
    assert not flag_values(triton["command"], "--model-control-mode") + flag_values(triton["command"], "--load-model")


def test_cpu_override_replaces_the_triton_image_and_command() -> None:
    """The CPU variant runs our triton-cpu image on Docker's default runtime, loading only the two CPU models
    (SmolLM2 and Gemma 3 270M) and the safety classifier."""
    triton = CPU["services"]["triton"]
    assert triton["image"].startswith("llmmesh/triton-cpu:")
    assert triton["build"]["target"] == "triton-cpu"
    assert triton["runtime"] == "runc" and triton["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert triton["command"][0] == "tritonserver"
    assert flag_values(triton["command"], "--model-control-mode") == ["explicit"]
    assert flag_values(triton["command"], "--load-model") == ["smollm2", "gemma3", "safety_classifier"]
    assert flag_values(triton["command"], "--allow-gpu-metrics") == ["false"]
    models = [v for v in triton["volumes"] if volume_target(v) == "/models"]
    assert models == ["../triton_models:/models:ro"], "the CPU models must replace the GPU model directory"
    assert (DEPLOY / "../triton_models/smollm2/config.pbtxt").is_file()
    assert (DEPLOY / "../triton_models/gemma3/config.pbtxt").is_file()
    # Nothing else changes between the variants but the model registry its readers mount.
    for name in (*MESH, "otel-collector", "jaeger", "prometheus", "redis"):
        gpu, cpu = dict(GPU["services"][name]), dict(CPU["services"][name])
        gpu.pop("environment", None), cpu.pop("environment", None)
        if name in ("preprocess", "infer", "postprocess", "gateway"):
            assert gpu.pop("volumes") == ["./models.yaml:/etc/llmmesh/models.yaml:ro"], name
            assert cpu.pop("volumes") == ["./models.cpu.yaml:/etc/llmmesh/models.yaml:ro"], name
        assert gpu == cpu, name
        assert _env(GPU, name) == _env(CPU, name), name


@VARIANTS
def test_every_mesh_service_is_health_checked_over_the_grpc_health_protocol(compose: dict[str, Any]) -> None:
    """Each service's health check runs the gRPC health probe against the port that service listens on."""
    for name in MESH:
        env = _env(compose, name)
        prefix = f"LLMMESH_{name.upper()}_"
        assert env[prefix + "HOST"] == "0.0.0.0"
        test = _healthcheck_test(compose, name)
        assert test == ["python", "-m", "llmmesh.healthcheck", f"127.0.0.1:{env[prefix + 'PORT']}"], name


@VARIANTS
def test_no_exec_form_health_check_has_an_argument_with_spaces(compose: dict[str, Any]) -> None:
    """podman's Docker-compatible API (4.3) joins an exec-form test and splits it again at spaces, so an
    argument with a space breaks there (tests/containers); such a test is written CMD-SHELL."""
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[0] == "CMD":
            assert not any(" " in str(arg) for arg in test[1:]), f"{name}: {test!r}"


@VARIANTS
def test_triton_prometheus_and_redis_are_health_checked(compose: dict[str, Any]) -> None:
    """What the mesh waits for has a health check of its own: Triton's readiness endpoint among them."""
    assert "/v2/health/ready" in " ".join(_healthcheck_test(compose, "triton"))
    for name in ("prometheus", "redis"):
        assert _healthcheck_test(compose, name)


@VARIANTS
def test_start_order_is_health_gated(compose: dict[str, Any]) -> None:
    """Every dependency waits for service_healthy on a service that has a health check."""
    services = compose["services"]
    assert set(services["gateway"]["depends_on"]) == {"preprocess", "infer", "postprocess"}
    assert set(services["infer"]["depends_on"]) == {"triton", "redis"}
    # Both call Triton's safety classifier; postprocess is not SERVING before Triton serves it.
    assert set(services["preprocess"]["depends_on"]) == set(services["postprocess"]["depends_on"]) == {"triton"}
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {dep}: {how}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no health check"


@VARIANTS
def test_stop_grace_periods_outlast_each_drain(compose: dict[str, Any]) -> None:
    """Compose waits longer than a service's drain (GRACE_SECONDS) or Triton's exit timeout before it kills."""
    for name in MESH:
        grace = float(_env(compose, name)[f"LLMMESH_{name.upper()}_GRACE_SECONDS"])
        period = duration_seconds(compose["services"][name]["stop_grace_period"])
        assert period > grace, f"{name}: stop_grace_period {period} s <= drain {grace} s"
    triton = compose["services"]["triton"]
    (exit_timeout,) = flag_values(triton["command"], "--exit-timeout-secs")
    assert duration_seconds(triton["stop_grace_period"]) > float(exit_timeout)


@VARIANTS
def test_only_the_gateway_publishes_a_port(compose: dict[str, Any]) -> None:
    """The gateway's gRPC port and its OpenAI-compatible HTTP port are the only ways in from the network."""
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert published == {"gateway": ["50051:50051", "8080:8080"]}
    assert _env(compose, "gateway")["LLMMESH_GATEWAY_PORT"] == "50051"
    assert _env(compose, "gateway")["LLMMESH_GATEWAY_HTTP_PORT"] == "8080"


def test_ui_override_publishes_on_loopback_only() -> None:
    """The optional UI ports (Jaeger, Prometheus) are bound to 127.0.0.1, never to the network."""
    ui = load_compose(COMPOSE_GPU, COMPOSE_CPU, COMPOSE_UI)
    for name, service in ui["services"].items():
        for port in service.get("ports", []):
            assert name == "gateway" or port.startswith("127.0.0.1:"), f"{name}: {port}"


@VARIANTS
def test_stages_are_addressed_by_service_name_and_port(compose: dict[str, Any]) -> None:
    """The gateway's stage URLs and infer's Triton URL name compose services on the ports they listen on."""
    gateway = _env(compose, "gateway")
    for stage in ("preprocess", "infer", "postprocess"):
        port = _env(compose, stage)[f"LLMMESH_{stage.upper()}_PORT"]
        assert gateway[f"LLMMESH_GATEWAY_{stage.upper()}_URL"] == f"{stage}:{port}"
    triton = f"triton:{flag_values(compose['services']['triton']['command'], '--grpc-port')[0]}"
    assert _env(compose, "infer")["LLMMESH_INFER_TRITON_URL"] == triton


@VARIANTS
def test_preprocess_and_postprocess_reach_the_safety_classifier_in_triton(compose: dict[str, Any]) -> None:
    """The shipped policy enables the classifier, so both stages that run it are given Triton's gRPC address
    (without it the layer is silently off)."""
    assert load_policy().classifier.enabled
    grpc_port = flag_values(compose["services"]["triton"]["command"], "--grpc-port")[0]
    for stage in ("preprocess", "postprocess"):
        assert _env(compose, stage)[f"LLMMESH_{stage.upper()}_TRITON_URL"] == f"triton:{grpc_port}", stage


def test_cpu_triton_serves_the_classifier_the_shipped_policy_names() -> None:
    """The CPU Triton loads the policy's classifier model from the repository it mounts (postprocess is
    NOT_SERVING without it)."""
    model = load_policy().classifier.model
    triton = CPU["services"]["triton"]
    assert model in flag_values(triton["command"], "--load-model")
    (repository,) = flag_values(triton["command"], "--model-repository")
    (mounted,) = [str(v).split(":")[0] for v in triton["volumes"] if volume_target(v) == repository]
    config = (DEPLOY / mounted / model / "config.pbtxt").read_text()
    assert re.search(rf'^name: "{model}"$', config, re.MULTILINE)
    assert (DEPLOY / mounted / model / "1" / "model.py").is_file()


@VARIANTS
def test_traces_go_to_the_collector_from_every_service_and_triton(compose: dict[str, Any]) -> None:
    """Services export OTLP/HTTP to the collector; Triton exports OTLP/HTTP JSON to it, rate 1, timestamps."""
    for name in MESH:
        env = _env(compose, name)
        prefix = f"LLMMESH_{name.upper()}_"
        assert env[prefix + "OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert env[prefix + "OTLP_PROTOCOL"] == "http/protobuf"
        assert 0 < float(env[prefix + "TRACE_SAMPLE_RATIO"]) <= 1
    trace = set(flag_values(compose["services"]["triton"]["command"], "--trace-config"))
    assert trace >= TRACE_FLAGS


def test_collector_receives_otlp_grpc_and_http_and_forwards_to_jaeger() -> None:
    """The collector listens for OTLP on 4317 and 4318 on all interfaces and exports traces to Jaeger's OTLP."""
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(config[kind]), f"undefined {kind} in the traces pipeline"
    (exporter,) = pipeline["exporters"]
    assert exporter.split("/")[0] == "otlp" and config["exporters"][exporter]["endpoint"] == "jaeger:4317"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))
    volumes = GPU["services"]["otel-collector"]["volumes"]
    assert "./otel-collector.yaml:/etc/otelcol/config.yaml:ro" in volumes
    assert "--config=/etc/otelcol/config.yaml" in GPU["services"]["otel-collector"]["command"]


@VARIANTS
def test_prometheus_scrapes_every_service_and_triton(compose: dict[str, Any]) -> None:
    """Prometheus finds each service on the metrics port it serves and Triton on its metrics port."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets |= {(n, int(sd["port"])) for n in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= {(t.split(":")[0], int(t.split(":")[1])) for t in static["targets"]}
    for name in MESH:
        assert (name, int(_env(compose, name)[f"LLMMESH_{name.upper()}_METRICS_PORT"])) in targets
    metrics_port = int(flag_values(compose["services"]["triton"]["command"], "--metrics-port")[0])
    assert ("triton", metrics_port) in targets
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["services"]["prometheus"]["volumes"]


def test_third_party_images_are_pinned() -> None:
    """Every image names an exact version: no implicit or moving `latest`."""
    for name, service in CPU["services"].items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        if image.startswith("llmmesh/"):
            continue  # built here
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image}"
