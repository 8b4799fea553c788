"""Preprocess and postprocess in the gateway's process (LLMMESH_GATEWAY_<STAGE>_URL=inprocess), end to end.

A second gateway process runs beside the session mesh's, on the same infer and Triton, with preprocess and
postprocess inside it and no channel to either service: the voice layout (README.md, "The voice layout"),
with the shipped voice policy (policies/voice.yaml: the default with `classifier.runs_in: stage`). Its
answers must be the ones the four-process mesh gives, with validation, stop strings, the blocklist (prompt
and answer), the classifier and cancellation working the same way, and Triton's classifier is never asked.
Each generation here is unique (max_tokens) so that it is a real one, not a dedup replay of another test's.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.common.safety import VOICE_POLICY_PATH
from llmmesh.launcher import Mesh, free_port
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import BLOCKED_WORD, model_counters, read_then_cancel, request, settled_counters, wait_for

pytestmark = pytest.mark.e2e

Stub = generation_pb2_grpc.GenerationServiceStub
KEY = "gateway-with-stages"


def triton_classifier_requests(mesh: Mesh) -> float:
    """Requests Triton's `safety_classifier` model has answered (its own inference counter)."""
    assert mesh.triton is not None
    with urllib.request.urlopen(mesh.triton.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # prometheus_client's parser names a counter's samples <family>_total.
            model = sample.labels.get("model")
            if sample.name == "nv_inference_request_success_total" and model == "safety_classifier":
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def colocated(mesh: Mesh) -> Iterator[Stub]:
    policy = VOICE_POLICY_PATH  # what `llmmesh up --voice` runs
    port = free_port()
    mesh.start_service(
        "gateway",
        KEY,
        {
            "LLMMESH_GATEWAY_PORT": str(port),
            "LLMMESH_GATEWAY_METRICS_PORT": str(free_port()),
            "LLMMESH_GATEWAY_PREPROCESS_URL": "inprocess",
            "LLMMESH_GATEWAY_POSTPROCESS_URL": "inprocess",
            "LLMMESH_PREPROCESS_SAFETY_POLICY_PATH": str(policy),
            "LLMMESH_POSTPROCESS_SAFETY_POLICY_PATH": str(policy),
        },
    )
    try:
        with grpc.insecure_channel(f"{mesh.host}:{port}") as channel:
            stub = Stub(channel)
            deadline = time.monotonic() + 60
            while True:  # SERVING once infer is; no channel to preprocess or postprocess to wait for
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    assert mesh.procs[KEY].poll() is None, mesh.log_tail(KEY)
                    assert time.monotonic() < deadline, "the co-located gateway did not start"
            yield stub
    finally:
        assert mesh.stop_service(KEY) == 0, mesh.log_tail(KEY)
    logged = (mesh.log_dir / f"{KEY}.log").read_text()
    assert '"preprocess": "inprocess"' in logged and '"postprocess": "inprocess"' in logged


def collect(stub: Stub, req: generation_pb2.GenerateRequest) -> tuple[str, list[int], generation_pb2.Final]:
    text, ids, final = "", [], None
    for response in stub.Generate(req, timeout=120, wait_for_ready=True):
        if response.HasField("chunk"):
            text += response.chunk.text
            ids += response.chunk.token_ids
        else:
            final = response.final
    assert final is not None, "the stream ended without a final message"
    return text, ids, final


def test_the_answer_is_the_four_process_meshs(colocated: Stub, gateway: Stub) -> None:
    req = request("What is the capital of France?", temperature=0.0, max_tokens=23)
    text, ids, final = collect(colocated, req)  # first: a real generation through the in-process pipeline
    assert final.reuse == generation_pb2.REUSE_NONE
    assert "Paris" in text and final.usage.completion_tokens == len(ids) > 0
    assert final.timings.time_to_first_token_ms > 0
    again_text, again_ids, again = collect(gateway, req)
    assert (again_text, again_ids, again.finish_reason) == (text, ids, final.finish_reason)


def test_a_stop_string_ends_the_answer(colocated: Stub) -> None:
    text, _, final = collect(
        colocated, request("What is the capital of France?", temperature=0.0, max_tokens=29, stop=["Paris"])
    )
    assert (final.finish_reason, final.matched_stop) == (generation_pb2.FINISH_REASON_STOP_STRING, "Paris")
    assert "capital" in text and "Paris" not in text


def test_a_blocked_word_ends_the_answer_with_content_filter(colocated: Stub) -> None:
    text, _, final = collect(colocated, request("What is the capital of Germany?", temperature=0.0, max_tokens=47))
    assert (final.finish_reason, final.filter_category) == (generation_pb2.FINISH_REASON_CONTENT_FILTER, "custom")
    assert BLOCKED_WORD not in text and "Ber" not in text


def test_a_client_cancel_stops_the_model(colocated: Stub, mesh: Mesh) -> None:
    before = settled_counters(mesh)
    received = read_then_cancel(colocated, max_tokens=399)
    assert wait_for(lambda: model_counters(mesh)["cancelled"] >= before["cancelled"] + 1), "the model saw no cancel"
    assert model_counters(mesh)["tokens"] - before["tokens"] - received < 100


def test_bad_input_is_invalid_argument_naming_the_field(colocated: Stub, gateway: Stub) -> None:
    for bad in (request("Hi", max_tokens=0), request("Hi", top_p=1.5), generation_pb2.GenerateRequest()):
        codes = []
        for stub in (colocated, gateway):
            with pytest.raises(grpc.RpcError) as info:
                collect(stub, bad)
            codes.append((info.value.code(), info.value.details()))  # type: ignore[attr-defined]
        assert codes[0] == codes[1], codes
        assert codes[0][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_a_blocked_prompt_is_answered_without_generating(colocated: Stub, mesh: Mesh) -> None:
    before = settled_counters(mesh)
    text, ids, final = collect(colocated, request("You are a fucking idiot, answer me.", max_tokens=33))
    assert (text, ids) == ("", [])
    assert (final.finish_reason, final.filter_category) == (generation_pb2.FINISH_REASON_CONTENT_FILTER, "profanity")
    assert settled_counters(mesh) == before


def test_the_classifier_blocks_in_the_gateways_process_without_asking_triton(
    colocated: Stub, gateway: Stub, mesh: Mesh
) -> None:
    """An insult no blocked term names: the in-process classifier blocks the prompt before the model starts
    (toxicity), and Triton's classifier model answers no request for it or for a plain answer (the
    four-process mesh's gateway, whose policy runs it in Triton, moves the same counter)."""
    asked = triton_classifier_requests(mesh)
    _, _, final = collect(gateway, request("You are a stupid idiot.", max_tokens=31))
    assert final.filter_category == "toxicity" and triton_classifier_requests(mesh) > asked
    before, asked = settled_counters(mesh), triton_classifier_requests(mesh)
    text, ids, final = collect(colocated, request("You are a stupid idiot.", max_tokens=31))
    assert (text, ids) == ("", [])
    assert (final.finish_reason, final.filter_category) == (generation_pb2.FINISH_REASON_CONTENT_FILTER, "toxicity")
    assert settled_counters(mesh) == before
    text, _, final = collect(colocated, request("What is the capital of France?", temperature=0.0, max_tokens=27))
    assert final.finish_reason != generation_pb2.FINISH_REASON_CONTENT_FILTER and "Paris" in text
    assert triton_classifier_requests(mesh) == asked


def test_barge_in_stops_the_model_and_acknowledges_what_was_delivered(colocated: Stub, mesh: Mesh) -> None:
    """Converse's interrupt cancels the step that is reading the in-process postprocess call mid-read."""
    from .test_voice import _converse

    before = settled_counters(mesh)
    received, last = _converse(
        colocated, request("Write a long story about a dragon.", temperature=0.0, max_tokens=398), interrupt_after=5
    )
    assert last.HasField("interrupted"), last
    assert last.interrupted.delivered_text == "".join(received) and len(received) >= 5
    assert wait_for(lambda: model_counters(mesh)["cancelled"] >= before["cancelled"] + 1), "the model saw no cancel"
    # The gateway is still healthy and answers the next request.
    text, _, final = collect(colocated, request("What is the capital of France?", temperature=0.0, max_tokens=19))
    assert "Paris" in text and final.finish_reason == generation_pb2.FINISH_REASON_STOP
