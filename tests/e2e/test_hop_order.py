"""The other hop order (LLMMESH_GATEWAY_HOP_ORDER=gateway), end to end: the gateway reads each answer's token
ids from infer and relays them to postprocess, instead of postprocess reading infer itself (the default,
which every other e2e test exercises).

A second gateway process runs beside the session mesh's with that setting, on the same preprocess,
postprocess, infer and Triton. Its answers must be the default order's, with stop strings, the blocklist,
usage, reuse and cancellation working the same way. Each generation is unique (max_tokens) so that it is a
real one, not a dedup replay of another test's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from llmmesh.launcher import Mesh, free_port
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import BLOCKED_WORD, model_counters, read_then_cancel, request, settled_counters, wait_for
from .test_stages_in_gateway import collect

pytestmark = pytest.mark.e2e

Stub = generation_pb2_grpc.GenerationServiceStub
KEY = "gateway-hop-order"


@pytest.fixture(scope="module")
def relayed(mesh: Mesh) -> Iterator[Stub]:
    port = free_port()
    mesh.start_service(
        "gateway",
        KEY,
        {
            "LLMMESH_GATEWAY_PORT": str(port),
            "LLMMESH_GATEWAY_METRICS_PORT": str(free_port()),
            "LLMMESH_GATEWAY_HOP_ORDER": "gateway",
        },
    )
    try:
        with grpc.insecure_channel(f"{mesh.host}:{port}") as channel:
            deadline = time.monotonic() + 60
            while True:
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    assert mesh.procs[KEY].poll() is None, mesh.log_tail(KEY)
                    assert time.monotonic() < deadline, "the gateway did not start"
            yield Stub(channel)
    finally:
        assert mesh.stop_service(KEY) == 0, mesh.log_tail(KEY)


def test_the_answer_is_the_default_orders(relayed: Stub, gateway: Stub, mesh: Mesh) -> None:
    before = settled_counters(mesh)
    req = request("What is the capital of France?", temperature=0.0, max_tokens=27)
    text, ids, final = collect(relayed, req)  # first: a real generation, relayed by the gateway
    assert final.reuse == generation_pb2.REUSE_NONE
    assert "Paris" in text and final.usage.completion_tokens == len(ids) > 0
    assert final.usage.prompt_tokens > 0 and final.timings.time_to_first_token_ms > 0
    assert settled_counters(mesh)["tokens"] - before["tokens"] == len(ids)
    again_text, again_ids, again = collect(gateway, req)  # the default order replays the stored result
    assert again.reuse == generation_pb2.REUSE_CACHE_HIT
    assert (again_text, again_ids, again.finish_reason) == (text, ids, final.finish_reason)


def test_a_stop_string_ends_the_answer_and_the_generation(relayed: Stub) -> None:
    text, _, final = collect(
        relayed, request("What is the capital of France?", temperature=0.0, max_tokens=31, stop=["Paris"])
    )
    assert (final.finish_reason, final.matched_stop) == (generation_pb2.FINISH_REASON_STOP_STRING, "Paris")
    assert "capital" in text and "Paris" not in text


def test_a_blocked_word_ends_the_answer_with_content_filter(relayed: Stub) -> None:
    text, _, final = collect(relayed, request("What is the capital of Germany?", temperature=0.0, max_tokens=49))
    assert (final.finish_reason, final.filter_category) == (generation_pb2.FINISH_REASON_CONTENT_FILTER, "custom")
    assert BLOCKED_WORD not in text and "Ber" not in text


def test_a_client_cancel_stops_the_model(relayed: Stub, mesh: Mesh) -> None:
    before = settled_counters(mesh)
    received = read_then_cancel(relayed, max_tokens=397)
    assert wait_for(lambda: model_counters(mesh)["cancelled"] >= before["cancelled"] + 1), "the model saw no cancel"
    assert model_counters(mesh)["tokens"] - before["tokens"] - received < 100
