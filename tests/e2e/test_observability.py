"""One trace from client to Triton and back, and each service's metrics, with every process real."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.launcher import SERVICES, Mesh, MeshPorts
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .otlp_receiver import OtlpReceiver, Span

pytestmark = pytest.mark.e2e

SECRET = "Quillfeather"  # a word that must appear in no span and no log line
PROMPT = f"Describe the zebra named {SECRET} in one sentence."


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, OtlpReceiver, Path]]:
    receiver = OtlpReceiver()
    receiver.start()
    log_dir = tmp_path_factory.mktemp("traced-logs")
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=log_dir,
        otlp_endpoint=receiver.grpc_endpoint,
        otlp_protocol="grpc",
        triton_trace_url=receiver.http_traces_url,
    )
    mesh.start()
    try:
        yield mesh, receiver, log_dir
    finally:
        mesh.stop()
        receiver.stop()


@pytest.fixture(scope="module")
def one_request(traced: tuple[Mesh, OtlpReceiver, Path]) -> OneRequest:
    """Sends one request under a client span: its trace id, the client span id, the final message, its spans.

    Triton 2.51 now and then does not continue the trace it is sent: that request's model spans arrive as a
    trace of their own (probe runs here: 8 of 31 requests in three runs, none of 75 in eight others; more
    often under CPU load; README, known issues). So when the model's compute span has not linked up to the
    gateway within 12 s (Triton exports every 5 s), the same check runs on a fresh request, five tries at
    most (three in a row failed once in the worst run); the tests then assert on that one complete trace.
    """
    mesh, receiver, _ = traced
    finals: list[generation_pb2.Final] = []
    for attempt in range(5):
        trace_id, client_span_id, final = _send(mesh, PROMPT if attempt == 0 else f"{PROMPT} Try {attempt}.")
        finals.append(final)
        spans = _wait_for_chain(receiver, trace_id, timeout=12)
        if _model_compute(spans):
            break
    return OneRequest(trace_id, client_span_id, final, spans, finals)


@dataclass
class OneRequest:
    trace_id: str
    client_span_id: str
    final: generation_pb2.Final
    spans: list[Span]
    finals: list[generation_pb2.Final]  # every request sent (more than one when Triton lost a trace)


def _send(mesh: Mesh, prompt: str) -> tuple[str, str, generation_pb2.Final]:
    client = TracerProvider().get_tracer("test-client")
    with client.start_as_current_span("client") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        ctx = span.get_span_context()
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        req = generation_pb2.GenerateRequest(
            prompt=prompt, sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=24)
        )
        responses = stub.Generate(req, metadata=tuple(carrier.items()), timeout=60)
        final = next(r.final for r in responses if r.HasField("final"))
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), final


def _wait_for_chain(receiver: OtlpReceiver, trace_id: str, timeout: float) -> list[Span]:
    """The trace's spans once every service reported and the model's compute span links up to the gateway."""
    wanted = {"llmmesh-gateway", "llmmesh-preprocess", "llmmesh-infer", "llmmesh-postprocess", "triton"}
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in receiver.snapshot() if s.trace_id == trace_id]
        index = _by_id(spans)
        if wanted <= {s.service for s in spans} and any(
            any(a.service == "llmmesh-gateway" for a in _ancestors(c, index)) for c in _model_compute(spans)
        ):
            return spans
        if time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def _model_compute(spans: list[Span]) -> list[Span]:
    """The LLM's compute spans (the safety classifier's Triton requests have compute spans too)."""
    index = _by_id(spans)
    return [s for s in spans if s.name == "compute" and s.parent_id in index and index[s.parent_id].name == "smollm2"]


def _by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def _ancestors(span: Span, index: dict[str, Span]) -> list[Span]:
    chain = []
    while span.parent_id in index:
        span = index[span.parent_id]
        chain.append(span)
    return chain


def _one(spans: list[Span], service: str, name_part: str) -> Span:
    found = [s for s in spans if s.service == service and name_part in s.name]
    assert found, f"no span of {service} named like {name_part!r}: {[(s.service, s.name) for s in spans]}"
    return found[0]


def test_one_trace_spans_all_four_services_and_triton(
    one_request: OneRequest,
) -> None:
    """Spans of gateway, preprocess, infer, postprocess and Triton all carry the client's trace id."""
    spans = one_request.spans
    assert {"llmmesh-gateway", "llmmesh-preprocess", "llmmesh-infer", "llmmesh-postprocess", "triton"} <= {
        s.service for s in spans
    }, sorted({(s.service, s.name) for s in spans})


def test_parent_chain_runs_from_client_to_triton_compute(
    one_request: OneRequest,
) -> None:
    """compute ⊂ model ⊂ InferRequest (Triton) ⊂ infer ⊂ gateway ⊂ client; stage spans sit under the gateway span."""
    client_span_id, spans = one_request.client_span_id, one_request.spans
    index = _by_id(spans)
    gateway = _one(spans, "llmmesh-gateway", "GenerationService/Generate")
    assert gateway.parent_id == client_span_id
    computes = _model_compute(spans)
    assert computes, f"Triton never reported the model's spans: {sorted((s.service, s.name) for s in spans)}"
    compute = computes[0]
    chain = _ancestors(compute, index)
    names = [(s.service, s.name) for s in chain]
    infer_request = next(s for s in chain if s.service == "triton" and s.name == "InferRequest")
    model = compute_parent = index[compute.parent_id]
    assert compute_parent.service == "triton" and model in chain and model is not infer_request, names
    assert chain.index(model) < chain.index(infer_request)
    infer_server = next(s for s in chain if s.service == "llmmesh-infer" and "InferService/Generate" in s.name)
    assert chain.index(infer_request) < chain.index(infer_server)
    assert gateway in chain and chain.index(infer_server) < chain.index(gateway), names
    for service, name in (
        ("llmmesh-preprocess", "template_tokenize"),
        ("llmmesh-postprocess", "detokenize_and_filter"),
    ):
        assert gateway in _ancestors(_one(spans, service, name), index), f"{name} not under the gateway span"


def test_triton_model_span_names_the_request_id(one_request: OneRequest) -> None:
    """Triton's model span carries the request's id (the key to find it when Triton started a trace of its own)."""
    (model,) = [s for s in one_request.spans if s.service == "triton" and s.name == "smollm2"]
    assert one_request.final.request_id and model.attributes["triton.request_id"] == one_request.final.request_id


def test_gateway_span_carries_genai_attributes(one_request: OneRequest) -> None:
    """The gateway span has the GenAI semantic-convention attributes of the request and a first-token event."""
    final, spans = one_request.final, one_request.spans
    gateway = _one(spans, "llmmesh-gateway", "GenerationService/Generate")
    attrs = gateway.attributes
    assert attrs["gen_ai.request.model"] == "smollm2"
    assert attrs["gen_ai.request.max_tokens"] == 24
    assert attrs["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    assert attrs["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    assert "first_token" in gateway.events


def test_no_span_and_no_log_line_contains_the_prompt(
    one_request: OneRequest, traced: tuple[Mesh, OtlpReceiver, Path]
) -> None:
    """The prompt's text appears in no span attribute, event and no service log."""
    spans = one_request.spans
    for span in spans:
        assert SECRET not in repr(span.attributes) and SECRET not in repr(span.events), span
    _, _, log_dir = traced
    for name in SERVICES:
        assert SECRET not in (log_dir / f"{name}.log").read_text()
    completed = [line for line in (log_dir / "gateway.log").read_text().splitlines() if "request_completed" in line]
    assert completed and '"trace_id"' in completed[-1] and '"completion_tokens"' in completed[-1]


def test_health_checks_and_readiness_polls_make_no_spans(
    one_request: OneRequest, traced: tuple[Mesh, OtlpReceiver, Path]
) -> None:
    """The gateway polls its stages' health and infer polls Triton's readiness every few seconds: no spans."""
    mesh, receiver, _ = traced
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    time.sleep(1)  # the services export every 200 ms
    names = {(s.service, s.name) for s in receiver.snapshot()}
    assert one_request.spans and not {
        n for n in names if "grpc.health" in n[1] or n[1].endswith(("/ServerReady", "/ModelReady"))
    }, sorted(names)


def test_every_service_runs_protobuf_on_its_upb_backend(traced: tuple[Mesh, OtlpReceiver, Path]) -> None:
    """Each service logs the protobuf backend it serves with: upb (C), not the slow pure-Python fallback."""
    _, _, log_dir = traced
    for name in SERVICES:
        lines = [json.loads(line) for line in (log_dir / f"{name}.log").read_text().splitlines() if '"serving"' in line]
        assert [line.get("protobuf") for line in lines if line.get("event") == "serving"] == ["upb"], name


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoints_count_the_request(one_request: OneRequest, traced: tuple[Mesh, OtlpReceiver, Path]) -> None:
    """After the request(s) each service's /metrics counts each once, with token counts equal to the final usage."""
    mesh, _, _ = traced
    finals = one_request.finals
    sent = len(finals)
    reasons = Counter(
        generation_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower() for f in finals
    )
    gw = _metrics(mesh.ports.metrics_url("gateway"))
    model = (("model", "smollm2"),)
    for reason, count in reasons.items():
        assert gw[("llmmesh_requests_total", (("finish_reason", reason), ("model", "smollm2")))] == count
    assert gw[("llmmesh_prompt_tokens_total", model)] == sum(f.usage.prompt_tokens for f in finals)
    assert gw[("llmmesh_completion_tokens_total", model)] == sum(f.usage.completion_tokens for f in finals)
    for hist in (
        "time_to_first_token",
        "time_to_first_speakable_chunk",
        "inter_token_latency",
        "queue_time",
        "request_duration",
    ):
        assert gw[(f"llmmesh_{hist}_seconds_count", model)] == sent, hist
    assert (
        gw[("llmmesh_rpc_requests_total", (("code", "OK"), ("method", "/llmmesh.v1.GenerationService/Generate")))]
        == sent
    )
    assert gw[("llmmesh_inflight_streams", (("method", "/llmmesh.v1.GenerationService/Generate"),))] == 0
    for service, method in (
        ("preprocess", "/llmmesh.stages.v1.PreprocessService/Prepare"),
        ("infer", "/llmmesh.stages.v1.InferService/Generate"),
        ("postprocess", "/llmmesh.stages.v1.PostprocessService/Process"),
    ):
        stage = _metrics(mesh.ports.metrics_url(service))
        assert stage[("llmmesh_rpc_requests_total", (("code", "OK"), ("method", method)))] == sent, service
