"""One trace from client to Triton and back, and each service's metrics, with every process real."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
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
def one_request(traced: tuple[Mesh, OtlpReceiver, Path]) -> tuple[str, str, generation_pb2.Final, list[Span]]:
    """Sends one request under a client span; returns its trace id, the client span id, the final message, spans."""
    mesh, receiver, _ = traced
    client = TracerProvider().get_tracer("test-client")
    with client.start_as_current_span("client") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        ctx = span.get_span_context()
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        req = generation_pb2.GenerateRequest(
            prompt=PROMPT, sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=24)
        )
        responses = stub.Generate(req, metadata=tuple(carrier.items()), timeout=60)
        final = next(r.final for r in responses if r.HasField("final"))
    trace_id = format(ctx.trace_id, "032x")
    wanted = {"llmmesh-gateway", "llmmesh-preprocess", "llmmesh-infer", "llmmesh-postprocess", "triton"}
    deadline = time.monotonic() + 20
    spans: list[Span] = []
    while time.monotonic() < deadline:
        spans = [s for s in receiver.snapshot() if s.trace_id == trace_id]
        index = _by_id(spans)
        generation = [s for s in spans if s.name == "compute" and index.get(s.parent_id, s).name == "smollm2"]
        # Complete once the model's compute span links all the way up to the gateway's span.
        if wanted <= {s.service for s in spans} and any(
            any(a.service == "llmmesh-gateway" for a in _ancestors(c, index)) for c in generation
        ):
            break
        time.sleep(0.2)
    return trace_id, format(ctx.span_id, "016x"), final, spans


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
    one_request: tuple[str, str, generation_pb2.Final, list[Span]],
) -> None:
    """Spans of gateway, preprocess, infer, postprocess and Triton all carry the client's trace id."""
    _, _, _, spans = one_request
    assert {"llmmesh-gateway", "llmmesh-preprocess", "llmmesh-infer", "llmmesh-postprocess", "triton"} <= {
        s.service for s in spans
    }, sorted({(s.service, s.name) for s in spans})


def test_parent_chain_runs_from_client_to_triton_compute(
    one_request: tuple[str, str, generation_pb2.Final, list[Span]],
) -> None:
    """compute ⊂ model ⊂ InferRequest (Triton) ⊂ infer ⊂ gateway ⊂ client; stage spans sit under the gateway span."""
    _, client_span_id, _, spans = one_request
    index = _by_id(spans)
    gateway = _one(spans, "llmmesh-gateway", "GenerationService/Generate")
    assert gateway.parent_id == client_span_id
    # The model's compute span (the safety classifier's Triton requests have compute spans too).
    compute = next(s for s in spans if s.name == "compute" and index[s.parent_id].name == "smollm2")
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


def test_gateway_span_carries_genai_attributes(one_request: tuple[str, str, generation_pb2.Final, list[Span]]) -> None:
    """The gateway span has the GenAI semantic-convention attributes of the request and a first-token event."""
    _, _, final, spans = one_request
    gateway = _one(spans, "llmmesh-gateway", "GenerationService/Generate")
    attrs = gateway.attributes
    assert attrs["gen_ai.request.model"] == "smollm2"
    assert attrs["gen_ai.request.max_tokens"] == 24
    assert attrs["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    assert attrs["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    assert "first_token" in gateway.events


def test_no_span_and_no_log_line_contains_the_prompt(
    one_request: tuple[str, str, generation_pb2.Final, list[Span]], traced: tuple[Mesh, OtlpReceiver, Path]
) -> None:
    """The prompt's text appears in no span attribute, event and no service log."""
    _, _, _, spans = one_request
    for span in spans:
        assert SECRET not in repr(span.attributes) and SECRET not in repr(span.events), span
    _, _, log_dir = traced
    for name in SERVICES:
        assert SECRET not in (log_dir / f"{name}.log").read_text()
    completed = [line for line in (log_dir / "gateway.log").read_text().splitlines() if "request_completed" in line]
    assert completed and '"trace_id"' in completed[-1] and '"completion_tokens"' in completed[-1]


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoints_count_the_request(
    one_request: tuple[str, str, generation_pb2.Final, list[Span]], traced: tuple[Mesh, OtlpReceiver, Path]
) -> None:
    """After one request each service's /metrics counts it once, with token counts equal to the final usage."""
    mesh, _, _ = traced
    _, _, final, _ = one_request
    reason = generation_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    gw = _metrics(mesh.ports.metrics_url("gateway"))
    model = (("model", "smollm2"),)
    assert gw[("llmmesh_requests_total", (("finish_reason", reason), ("model", "smollm2")))] == 1
    assert gw[("llmmesh_prompt_tokens_total", model)] == final.usage.prompt_tokens
    assert gw[("llmmesh_completion_tokens_total", model)] == final.usage.completion_tokens
    for hist in (
        "time_to_first_token",
        "time_to_first_speakable_chunk",
        "inter_token_latency",
        "queue_time",
        "request_duration",
    ):
        assert gw[(f"llmmesh_{hist}_seconds_count", model)] == 1, hist
    assert (
        gw[("llmmesh_rpc_requests_total", (("code", "OK"), ("method", "/llmmesh.v1.GenerationService/Generate")))] == 1
    )
    assert gw[("llmmesh_inflight_streams", (("method", "/llmmesh.v1.GenerationService/Generate"),))] == 0
    for service, method in (
        ("preprocess", "/llmmesh.stages.v1.PreprocessService/Prepare"),
        ("infer", "/llmmesh.stages.v1.InferService/Generate"),
        ("postprocess", "/llmmesh.stages.v1.PostprocessService/Process"),
    ):
        stage = _metrics(mesh.ports.metrics_url(service))
        assert stage[("llmmesh_rpc_requests_total", (("code", "OK"), ("method", method)))] == 1, service
