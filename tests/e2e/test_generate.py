"""End to end: a real Triton serving SmolLM2, and gateway, preprocess, infer, postprocess as processes."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.model_assets import ModelAssets
from llmmesh.launcher import SERVICES, Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import BLOCKED_WORD, model_counters, read_then_cancel, request, settled_counters, wait_for

pytestmark = pytest.mark.e2e

Stub = generation_pb2_grpc.GenerationServiceStub


def _collect(
    stub: Stub, req: generation_pb2.GenerateRequest, timeout: float = 120
) -> tuple[list, generation_pb2.Final]:
    chunks, final = [], None
    for response in stub.Generate(req, timeout=timeout):
        if response.HasField("chunk"):
            assert final is None, "a chunk arrived after the final message"
            chunks.append(response.chunk)
        else:
            final = response.final
    assert final is not None, "the stream ended without a final message"
    return chunks, final


def test_all_four_services_report_serving(mesh: Mesh) -> None:
    """Once the mesh is up, every service's standard health check says SERVING."""
    for name in SERVICES:
        with grpc.insecure_channel(mesh.address(name)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def test_capital_of_france_streams_paris(gateway: Stub) -> None:
    """A greedy answer to a factual question contains the right answer and ends with STOP."""
    chunks, final = _collect(gateway, request("What is the capital of France?", temperature=0.0, max_tokens=48))
    text = "".join(c.text for c in chunks)
    assert "Paris" in text
    assert final.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert final.usage.prompt_tokens > 10
    assert final.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert 0 < final.timings.time_to_first_token_ms <= final.timings.total_ms
    assert final.model == "smollm2" and final.request_id


def test_greedy_decoding_is_deterministic(gateway: Stub) -> None:
    """Two greedy generations of the same request (both generated, neither a replay) give the same token ids."""
    req = request("Name three colours.", temperature=0.0, max_tokens=32)
    req.fresh = True
    first, first_final = _collect(gateway, req)
    second, second_final = _collect(gateway, req)
    assert first_final.reuse == second_final.reuse == generation_pb2.REUSE_NONE
    assert [i for c in first for i in c.token_ids] == [i for c in second for i in c.token_ids]
    assert first_final.usage == second_final.usage


def test_deltas_concatenate_to_the_decode_of_all_streamed_ids(gateway: Stub, assets: ModelAssets) -> None:
    """The text deltas joined equal the tokenizer's decode of every token id streamed."""
    chunks, final = _collect(
        gateway, request("Write two sentences about Tokyo, with some Japanese words.", temperature=0.0, max_tokens=80)
    )
    ids = [i for c in chunks for i in c.token_ids]
    assert len(ids) == final.usage.completion_tokens > 5
    assert "".join(c.text for c in chunks) == assets.decode(ids)
    assert all("\ufffd" not in c.text for c in chunks)


def test_first_chunk_arrives_before_the_model_finishes(gateway: Stub, mesh: Mesh) -> None:
    """When the first chunk reaches the client the model has not yet produced its last token (Triton's counter)."""
    before = settled_counters(mesh)["tokens"]
    at_first_chunk = None
    stream = gateway.Generate(
        request("Write a long story about a dragon.", temperature=0.0, max_tokens=120), timeout=120
    )
    final = None
    for response in stream:
        if response.HasField("chunk") and response.chunk.text and at_first_chunk is None:
            at_first_chunk = model_counters(mesh)["tokens"] - before
        if response.HasField("final"):
            final = response.final
    assert final is not None and at_first_chunk is not None
    generated = model_counters(mesh)["tokens"] - before
    assert generated == final.usage.completion_tokens == 120
    assert at_first_chunk < generated


def test_stop_string_ends_the_stream_without_appearing(gateway: Stub) -> None:
    """A stop string ends the answer with STOP_STRING; neither it nor what follows reaches the client."""
    chunks, final = _collect(gateway, request("What is the capital of France?", temperature=0.0, stop=["Paris"]))
    text = "".join(c.text for c in chunks)
    assert final.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
    assert final.matched_stop == "Paris"
    assert "Paris" not in text and "Par" not in text[-4:]
    assert "capital" in text


def test_blocklisted_word_ends_the_stream_with_content_filter(gateway: Stub) -> None:
    """An answer that reaches a blocked word ends with CONTENT_FILTER and the word never reaches the client."""
    chunks, final = _collect(gateway, request("What is the capital of Germany?", temperature=0.0, max_tokens=48))
    text = "".join(c.text for c in chunks)
    assert final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert final.filter_category == "custom"
    assert BLOCKED_WORD not in text and "Ber" not in text


def test_client_cancel_stops_the_generation_in_the_model(gateway: Stub, mesh: Mesh) -> None:
    """Cancelling after 5 chunks makes the Triton model stop generating for that request."""
    before = settled_counters(mesh)
    received = read_then_cancel(gateway, max_tokens=400)
    assert wait_for(lambda: model_counters(mesh)["cancelled"] == before["cancelled"] + 1), "model saw no cancel"
    generated = model_counters(mesh)["tokens"] - before["tokens"]
    time.sleep(0.5)
    assert model_counters(mesh)["tokens"] - before["tokens"] == generated, "the model kept generating"
    print(f"received {received} token ids in 5 chunks; the model generated {generated}")
    # Past what the client had: what the model made while the cancel travelled.
    assert generated - received < 100
    assert model_counters(mesh)["completed"] == before["completed"]


def test_expired_deadline_ends_with_deadline_exceeded_and_cancels_the_model(gateway: Stub, mesh: Mesh) -> None:
    """A deadline that expires mid-stream gives DEADLINE_EXCEEDED and the model stops that request."""
    before = settled_counters(mesh)
    with pytest.raises(grpc.RpcError) as err:
        _collect(gateway, request("Write a long story about a dragon.", temperature=0.0, max_tokens=400), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert wait_for(lambda: model_counters(mesh)["cancelled"] == before["cancelled"] + 1), "model saw no cancel"
    assert model_counters(mesh)["tokens"] - before["tokens"] < 400


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (request(""), "prompt"),
        (request("Hi", max_tokens=0), "sampling.max_tokens"),
        (request("Hi", max_tokens=-3), "sampling.max_tokens"),
        (request("word " * 9000), "sampling.max_tokens"),
        (request("Hi", temperature=-0.5), "sampling.temperature"),
        (request("Hi", top_p=0.0), "sampling.top_p"),
        (request("Hi", top_p=1.5), "sampling.top_p"),
        (generation_pb2.GenerateRequest(prompt="Hi", model="no-such-model"), "model"),
        (generation_pb2.GenerateRequest(), "input"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    gateway: Stub, req: generation_pb2.GenerateRequest, field: str
) -> None:
    """Bad input ends the call with INVALID_ARGUMENT whose message names the offending field."""
    with pytest.raises(grpc.RpcError) as err:
        _collect(gateway, req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert err.value.details().startswith(f"{field}: ")  # type: ignore[attr-defined]


def test_prompt_over_the_context_names_both_numbers(gateway: Stub) -> None:
    """The context-length error gives the prompt's token count and max_tokens."""
    with pytest.raises(grpc.RpcError) as err:
        _collect(gateway, request("word " * 9000, max_tokens=100), timeout=30)
    details = err.value.details()  # type: ignore[attr-defined]
    assert "max_tokens (100)" in details and "prompt (" in details and "8192" in details


def test_concurrent_requests_are_served_together(gateway: Stub) -> None:
    """Four requests at once all complete, and their streams overlap in time (none waits for another)."""
    import concurrent.futures

    topics = ["a dragon", "a lighthouse", "a robot", "the sea"]

    def one(i: int) -> tuple[float, float, int]:
        start_first = None
        req = request(f"Write a long story about {topics[i]}.", temperature=0.0, max_tokens=64)
        for response in gateway.Generate(req, timeout=120):
            if response.HasField("chunk") and start_first is None:
                start_first = time.monotonic()
            if response.HasField("final"):
                return start_first or 0.0, time.monotonic(), response.final.usage.completion_tokens
        raise AssertionError("no final")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(n == 64 for _, _, n in results)
    latest_first = max(first for first, _, _ in results)
    earliest_end = min(end for _, end, _ in results)
    assert latest_first < earliest_end, "some request only started after another had finished"
