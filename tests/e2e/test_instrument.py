"""The benchmark instrument on a real Triton: the fixed sequence, the contract's controls, timing, load, cancel.

The instrument (triton_models/instrument) stands in for a GPU engine in load tests. These tests start
their own tritonserver serving only it (config: 20 ms to first token, 10 ms between tokens) and drive
it with infer's own request builder. Timing is asserted only from below: the machine may be slow, never
faster than the schedule.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.infer.backend import Generation, build_request
from llmmesh.infer.triton_server import TritonServer, remove_orphaned_shm, repository_root
from llmmesh.launcher import free_ports

pytestmark = pytest.mark.e2e

SEQUENCE: list[int] = json.loads((repository_root() / "instrument" / "1" / "sequence.json").read_text())["token_ids"]
EOS = 2


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    server = TritonServer(*free_ports(3), models=("instrument",))
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        assert not remove_orphaned_shm()


@pytest.fixture
async def stub(triton: TritonServer) -> AsyncIterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.aio.insecure_channel(triton.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    await channel.close()


def _request(
    max_tokens: int,
    end_id: int = EOS,
    ttft_ms: float | None = None,
    itl_ms: float | None = None,
    streaming: bool = True,
) -> service_pb2.ModelInferRequest:
    gen = Generation("instrument-test", "smollm2", [1, 2, 3, 4], max_tokens, end_id, end_id, 0.0, 1.0, 0, None)
    req = build_request(gen, "instrument")
    if not streaming:
        for i, tensor in enumerate(req.inputs):
            if tensor.name == "streaming":
                req.raw_input_contents[i] = b"\x00"
    if ttft_ms is not None:
        req.parameters["instrument_ttft_ms"].double_param = ttft_ms
    if itl_ms is not None:
        req.parameters["instrument_itl_ms"].double_param = itl_ms
    return req


@dataclass
class Stream:
    responses: list[list[int]] = field(default_factory=list)  # output_ids of each non-empty response
    times: list[float] = field(default_factory=list)  # when each non-empty response arrived
    final: bool = False
    start: float = 0.0

    @property
    def ids(self) -> list[int]:
        return [i for r in self.responses for i in r]


async def _stream(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, req: service_pb2.ModelInferRequest, cancel_after: int = 0
) -> Stream:
    out = Stream(start=time.perf_counter())
    call = stub.ModelStreamInfer(iter([req]), timeout=120)
    async for response in call:
        assert not response.error_message, response.error_message
        result = response.infer_response
        outputs = {o.name: array("i", result.raw_output_contents[i]).tolist() for i, o in enumerate(result.outputs)}
        if outputs.get("output_ids"):
            out.responses.append(outputs["output_ids"])
            out.times.append(time.perf_counter())
            assert outputs["sequence_length"] == [len(outputs["output_ids"])]
        if result.parameters["triton_final_response"].bool_param:
            out.final = True
            break
        if cancel_after and len(out.responses) >= cancel_after:
            call.cancel()
            break
    return out


def _counters(triton: TritonServer) -> dict[str, float]:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != "instrument":
                continue
            if sample.name == "llmmesh_model_generated_tokens_total":
                out["tokens"] = sample.value
            elif sample.name == "llmmesh_model_requests_total":
                out[sample.labels["outcome"]] = sample.value
    return out


async def test_streams_the_fixed_sequence_one_token_per_response(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """A streaming request gets the sequence's first request_output_len ids, one per response, the last final."""
    out = await _stream(stub, _request(48, itl_ms=1))
    assert out.final
    assert out.ids == SEQUENCE[:48]
    assert all(len(r) == 1 for r in out.responses)


@pytest.mark.parametrize("max_tokens", [1, 7, 300])
async def test_honours_request_output_len(stub: service_pb2_grpc.GRPCInferenceServiceStub, max_tokens: int) -> None:
    """Exactly request_output_len tokens come back."""
    out = await _stream(stub, _request(max_tokens, ttft_ms=1, itl_ms=0.2))
    assert out.final and out.ids == SEQUENCE[:max_tokens]


async def test_ends_at_the_end_of_its_sequence(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """Asked for more than its sequence holds, it ends after the sequence, as an engine that generated end_id."""
    out = await _stream(stub, _request(len(SEQUENCE) + 50, ttft_ms=1, itl_ms=0.05))
    assert out.final and out.ids == SEQUENCE


async def test_stops_before_the_requests_end_id(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """A request whose end_id occurs in the sequence stops before its first occurrence; end_id is not sent."""
    end_id = SEQUENCE[10]
    out = await _stream(stub, _request(100, end_id=end_id, ttft_ms=1, itl_ms=0.2))
    assert out.final
    assert out.ids == SEQUENCE[: SEQUENCE.index(end_id)]
    assert end_id not in out.ids


async def test_not_streaming_sends_one_final_response(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """With streaming false every token comes in one final response."""
    out = await _stream(stub, _request(20, ttft_ms=1, itl_ms=0.2, streaming=False))
    assert out.final and len(out.responses) == 1 and out.ids == SEQUENCE[:20]


async def test_time_to_first_token_and_inter_token_latency_follow_the_config(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """Configured 20 ms to first token and 10 ms between tokens: never faster (lower bounds only)."""
    out = await _stream(stub, _request(21))
    ttft = out.times[0] - out.start
    itl = (out.times[-1] - out.times[0]) / 20
    assert ttft >= 0.019
    assert itl >= 0.0095


async def test_per_request_timing_override(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """Request parameters instrument_ttft_ms / instrument_itl_ms override the config for that request."""
    out = await _stream(stub, _request(11, ttft_ms=120, itl_ms=30))
    assert out.times[0] - out.start >= 0.115
    assert (out.times[-1] - out.times[0]) / 10 >= 0.028


async def test_serves_many_concurrent_requests(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """Two hundred overlapping requests are all served, each with its exact sequence."""
    outs = await asyncio.gather(*(_stream(stub, _request(32)) for _ in range(200)))
    assert all(o.final and o.ids == SEQUENCE[:32] for o in outs)
    # They were streamed side by side, not one after another: most streams were open at the same moment.
    edges = sorted([(o.times[0], 1) for o in outs] + [(o.times[-1], -1) for o in outs])
    open_now, most_open = 0, 0
    for _, step in edges:
        open_now += step
        most_open = max(most_open, open_now)
    assert most_open > 100


async def test_stops_generating_when_the_client_cancels(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, triton: TritonServer
) -> None:
    """A client that cancels after 5 tokens ends the request at the model (its own counters say so)."""
    before = _counters(triton)
    out = await _stream(stub, _request(500), cancel_after=5)
    assert out.ids == SEQUENCE[:5] and not out.final
    deadline = time.monotonic() + 10
    after = _counters(triton)
    while after.get("cancelled", 0) <= before.get("cancelled", 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        after = _counters(triton)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    # Noticed within a few steps: nowhere near the 500 tokens asked for.
    assert after["tokens"] - before.get("tokens", 0) < 50


def _backend(triton: TritonServer, shared_calls: int) -> Any:
    from llmmesh.infer.backend import TritonBackend

    return TritonBackend(triton.grpc_url, {"smollm2": "instrument"}, shared_calls=shared_calls)


def _gen(request_id: str, max_tokens: int) -> Generation:
    return Generation(request_id, "smollm2", [1, 2, 3, 4], max_tokens, EOS, EOS, 0.0, 1.0, 0, None)


async def _answer(backend: Any, gen: Generation) -> list[int]:
    return [i for ids in [ids async for ids in backend.generate(gen)] for i in ids]


async def test_shared_calls_carry_many_requests_each_with_its_own_answer(triton: TritonServer) -> None:
    """Infer's pool of shared ModelStreamInfer calls: 40 concurrent requests over 2 calls, each its exact answer."""
    backend = _backend(triton, shared_calls=2)
    try:
        assert await backend.ready()
        assert backend._stoppable == {"instrument": True}  # the config declares TensorRT-LLM's stop input
        answers = await asyncio.gather(*(_answer(backend, _gen(f"shared-{i}", 10 + i)) for i in range(40)))
        assert answers == [SEQUENCE[: 10 + i] for i in range(40)]
        calls = [c for c in backend._shared if c is not None]
        assert len(calls) == 2 and all(c.alive and not c.routes for c in calls)
    finally:
        await backend.close()


async def test_a_stop_request_cancels_one_request_on_a_shared_call(triton: TritonServer) -> None:
    """Closing one generation sends TensorRT-LLM's stop request: the model cancels that request alone, and
    the others on the same call complete."""
    backend = _backend(triton, shared_calls=1)
    try:
        assert await backend.ready()
        before = _counters(triton)
        others = asyncio.gather(*(_answer(backend, _gen(f"kept-{i}", 60)) for i in range(3)))
        leaving = backend.generate(_gen("leaving", 900))
        got = [await anext(leaving) for _ in range(3)]
        await leaving.aclose()
        assert [i for ids in got for i in ids] == SEQUENCE[:3]
        assert await others == [SEQUENCE[:60]] * 3
        deadline = time.monotonic() + 5
        while _counters(triton).get("cancelled", 0) < before.get("cancelled", 0) + 1 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling Triton's metrics
            await asyncio.sleep(0.05)
        after = _counters(triton)
        assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
        assert after["completed"] == before.get("completed", 0) + 3
        # Both final responses of the stopped request (its own, its stop's) were taken off the call.
        while backend._shared[0].routes and time.monotonic() < deadline:  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.05)
        assert backend._shared[0].routes == {}
    finally:
        await backend.close()


async def test_an_id_reused_while_its_stop_is_pending_gets_its_own_answer(triton: TritonServer) -> None:
    """A request given up and sent again at once under the same id (a retry, a fallback) cannot share the call
    where the old one's final responses are still due: it goes on a call of its own, and gets all its tokens."""
    backend = _backend(triton, shared_calls=1)
    try:
        assert await backend.ready()
        first = backend.generate(_gen("same-id", 900))
        await anext(first)
        await first.aclose()
        assert backend._shared[0].routes == {"same-id": 2}
        assert await _answer(backend, _gen("same-id", 25)) == SEQUENCE[:25]
    finally:
        await backend.close()
