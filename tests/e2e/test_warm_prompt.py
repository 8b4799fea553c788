"""Converse's interim turns end to end: a real mesh (the four services as processes) in front of a real Triton
serving the benchmark instrument, slowed to 800 ms before its first token so that a warm-up is still in the
model when the next message comes, and looking for a cancel before every token. The model's own counters
(Triton's metrics) tell what it ran and what was cancelled; the gateway's tell how each warm-up ended.

How much a warm-up saves on a real model (SmolLM2 and llama.cpp's prompt cache) is measured by
`loadtest/warm_prompt.py`, not here.
"""

from __future__ import annotations

import queue
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.launcher import Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import model_counters, settled_counters, wait_for

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtest.harness import running_mesh  # noqa: E402 - loadtest/ is importable from the repository root only

pytestmark = pytest.mark.e2e

Stub = generation_pb2_grpc.GenerationServiceStub
G = generation_pb2


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with (
        tempfile.TemporaryDirectory(prefix="llmmesh-warm-") as tmp,
        # The instrument looks for a cancel before each token: a cancelled warm-up never gets its token.
        running_mesh(ttft_ms=800, itl_ms=5, log_dir=Path(tmp), cancel_check_every=1) as m,
    ):
        yield m


@pytest.fixture(scope="module")
def stub(mesh: Mesh) -> Iterator[Stub]:
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def _turn(text: str, max_tokens: int = 6) -> G.GenerateRequest:
    return G.GenerateRequest(prompt=text, sampling=G.SamplingParams(max_tokens=max_tokens, temperature=0.0))


def _warms(mesh: Mesh) -> dict[str, float]:
    with urllib.request.urlopen(mesh.ports.metrics_url("gateway"), timeout=5) as resp:
        text = resp.read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llmmesh_prompt_warms_total"
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


class _Conversation:
    """A Converse call fed from a queue: put messages, then None to close the client's side."""

    def __init__(self, stub: Stub) -> None:
        self.outbox: queue.Queue[G.ConverseRequest | None] = queue.Queue()
        self.call = stub.Converse(iter(self.outbox.get, None), timeout=60)

    def send(self, **kind: G.GenerateRequest | G.Interrupt) -> None:
        self.outbox.put(G.ConverseRequest(**kind))  # type: ignore[arg-type]

    def close(self) -> list[G.ConverseResponse]:
        self.outbox.put(None)
        return list(self.call)


def test_an_interim_turn_is_prefilled_and_the_answer_is_the_turns_own(mesh: Mesh, stub: Stub) -> None:
    """interim then request: the model ran the warm-up (one token, dropped) and then the answer; the client got
    exactly what the request alone gets, and nothing for the interim."""
    alone = [r for r in stub.Generate(_turn("What is the capital of France?"), timeout=60)]
    before, warms = settled_counters(mesh), _warms(mesh)
    talk = _Conversation(stub)
    talk.send(interim=_turn("What is the capital"))
    talk.send(generate=_turn("What is the capital of France?"))
    responses = talk.close()
    after = settled_counters(mesh)
    assert [r.chunk.text for r in responses if r.HasField("chunk")] == [r.chunk.text for r in alone[:-1]]
    assert responses[-1].HasField("final") and responses[-1].final.usage.completion_tokens == 6
    assert after["completed"] - before.get("completed", 0) == 2
    assert after["tokens"] - before["tokens"] == 6 + 1  # the warm-up generated one token, never sent
    assert _delta(_warms(mesh), warms) == {"done": 1.0}


def test_a_changed_transcript_cancels_its_warm_up_and_so_does_a_user_who_stops(mesh: Mesh, stub: Stub) -> None:
    """A new interim that does not extend the last cancels its warm-up in the model; a stream that closes
    before its request cancels the one in flight and ends with `interrupted`, nothing delivered."""
    before, warms, taken = settled_counters(mesh), _warms(mesh), _taken(mesh)
    talk = _Conversation(stub)
    talk.send(interim=_turn("Book a table for two"))
    assert wait_for(lambda: _taken(mesh) - taken >= 1, 10)
    talk.send(interim=_turn("Cancel that, what time is it"))
    # The second warm-up is in the model (it looks for a cancel when its token is due, 800 ms after it came).
    assert wait_for(lambda: _taken(mesh) - taken >= 2, 10)
    responses = talk.close()
    assert len(responses) == 1 and responses[0].HasField("interrupted")
    assert responses[0].interrupted.delivered_text == "" and responses[0].interrupted.delivered_chunks == 0
    # Each noticed when its token fell due.
    assert wait_for(lambda: model_counters(mesh).get("cancelled", 0) - before.get("cancelled", 0) >= 2, 10)
    after = settled_counters(mesh)
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 2
    assert after.get("completed", 0) == before.get("completed", 0)
    assert _delta(_warms(mesh), warms) == {"cancelled": 2.0}


def test_a_request_that_does_not_extend_the_interim_cancels_its_warm_up(mesh: Mesh, stub: Stub) -> None:
    """The final transcript differs from the interim: the warm-up is cancelled at once, the answer is its own."""
    before, taken = settled_counters(mesh), _taken(mesh)
    talk = _Conversation(stub)
    talk.send(interim=_turn("Play some jazz"))
    assert wait_for(lambda: _taken(mesh) - taken >= 1, 10)
    talk.send(generate=_turn("Play some rock music instead"))
    responses = talk.close()
    assert wait_for(lambda: model_counters(mesh).get("cancelled", 0) - before.get("cancelled", 0) >= 1, 10)
    after = settled_counters(mesh)
    assert responses[-1].HasField("final") and responses[-1].final.finish_reason == G.FINISH_REASON_LENGTH
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 1
    assert after.get("completed", 0) - before.get("completed", 0) == 1


def test_an_invalid_interim_turn_fails_the_stream_naming_its_field(stub: Stub) -> None:
    talk = _Conversation(stub)
    talk.send(interim=G.GenerateRequest(prompt="Hi", request_id="has space"))
    with pytest.raises(grpc.RpcError) as caught:
        talk.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert caught.value.details().startswith("interim.request_id: ")  # type: ignore[attr-defined]
    talk = _Conversation(stub)
    bad = _turn("Hi")
    bad.sampling.temperature = -1.0
    talk.send(interim=bad)
    talk.send(generate=_turn("Hi there"))
    with pytest.raises(grpc.RpcError) as caught:
        talk.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert caught.value.details().startswith("interim.sampling.temperature: ")  # type: ignore[attr-defined]


def _taken(mesh: Mesh) -> float:
    """Requests the instrument has taken, running ones included (Triton counts a decoupled model's request
    as a success once `execute` has returned, before its first response)."""
    assert mesh.triton is not None
    with urllib.request.urlopen(mesh.triton.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    prefix = 'nv_inference_request_success{model="instrument",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
