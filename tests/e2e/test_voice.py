"""Voice features end to end: speakable chunks and barge-in, against the real model."""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Iterator

import pytest

from llmmesh.launcher import Mesh
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import model_counters, request, settled_counters, wait_for

pytestmark = pytest.mark.e2e

Stub = generation_pb2_grpc.GenerationServiceStub
# A chunk may end after clause or sentence punctuation (and closing quotes), or before a conjunction.
_CLAUSE_END = re.compile(r"[,;:.!?…—–。！？，、；：][\"'”’)\]]*$")
_CONJUNCTION_NEXT = re.compile(r"^\s(and|but|or|so|because|although|though|while|whereas|yet|then)\s", re.I)


def test_clause_chunks_end_at_boundaries_and_arrive_before_the_model_finishes(gateway: Stub, mesh: Mesh) -> None:
    """CLAUSE mode: every chunk but the last ends at punctuation or before a conjunction; the first comes early."""
    before = settled_counters(mesh)["tokens"]
    req = request("Describe Paris in a few sentences.", temperature=0.0, max_tokens=120)
    req.chunking = generation_pb2.CHUNKING_MODE_CLAUSE
    chunks: list[generation_pb2.Chunk] = []
    generated_at_first = None
    final = None
    for response in gateway.Generate(req, timeout=120):
        if response.HasField("chunk"):
            if not chunks:
                generated_at_first = model_counters(mesh)["tokens"] - before
            chunks.append(response.chunk)
        else:
            final = response.final
    assert final is not None and len(chunks) >= 3
    texts = [c.text for c in chunks]
    for i, text in enumerate(texts[:-1]):
        assert _CLAUSE_END.search(text.rstrip()) or _CONJUNCTION_NEXT.match(texts[i + 1]), (i, texts)
    assert all(c.speakable for c in chunks)
    assert generated_at_first is not None and generated_at_first < final.usage.completion_tokens
    assert 0 < final.timings.time_to_first_token_ms <= final.timings.time_to_first_speakable_chunk_ms


_ENDS_SENTENCE = re.compile(r"[.!?…。！？][\"'”’)\]]*\s*$")


def test_with_the_classifier_on_the_first_clause_is_sent_before_its_sentence_is_generated(
    gateway: Stub, mesh: Mesh
) -> None:
    """The shipped policy releases clauses for CLAUSE chunking: the first chunk is a clause (not a sentence),
    scored by the real classifier and sent while the model has not yet generated the end of its sentence.

    The model's token counter is the clock, read over HTTP once the first chunk is in: that read lags, by
    ~10 tokens once on a loaded CI machine, so the prompt is one whose greedy answer opens with a short clause
    in a long sentence ("The sky is blue," then 40 and more tokens before the first full stop)."""
    before = settled_counters(mesh)["tokens"]
    req = request("Explain why the sky is blue, in one long sentence.", temperature=0.0, max_tokens=120)
    req.chunking = generation_pb2.CHUNKING_MODE_CLAUSE
    chunks: list[generation_pb2.Chunk] = []
    generated_at_first = None
    for response in gateway.Generate(req, timeout=120):
        if response.HasField("chunk"):
            if not chunks:
                generated_at_first = model_counters(mesh)["tokens"] - before
            chunks.append(response.chunk)
    texts = [c.text for c in chunks]
    # The chunk that ends the first sentence (the last chunk if the answer stopped inside it).
    first_sentence = next((i for i, t in enumerate(texts) if _ENDS_SENTENCE.search(t)), len(texts) - 1)
    assert first_sentence > 0, texts  # the first sentence came in more than one chunk
    tokens_to_sentence_end = sum(len(c.token_ids) for c in chunks[: first_sentence + 1])
    assert generated_at_first is not None and generated_at_first < tokens_to_sentence_end, (
        generated_at_first,
        tokens_to_sentence_end,
        texts,
    )


_LONG_TURN = (
    "I am planning a trip to France next spring with my family, two adults and two children aged eight and"
    " eleven, and we would like to spend a week in Paris and a few days somewhere by the sea, travelling by"
    " train, staying in small hotels, eating well without spending too much, and seeing the museums the"
    " children will enjoy most, so which city by the sea would you pick for us?"
)


def test_an_interim_turn_leaves_only_its_last_words_for_the_model_to_compute(gateway: Stub, mesh: Mesh) -> None:
    """Converse's interim on the real model: llama.cpp prefills the interim transcript; the request that extends
    it takes that prefix from the prompt cache and computes only its last words (the model's own counters)."""
    final = request(_LONG_TURN, temperature=0.0, max_tokens=1)
    interim = request(_LONG_TURN.rsplit(" ", 4)[0], temperature=0.0, max_tokens=1)
    outbox: queue.Queue[generation_pb2.ConverseRequest | None] = queue.Queue()
    before = settled_counters(mesh)
    call = gateway.Converse(iter(outbox.get, None), timeout=120)
    outbox.put(generation_pb2.ConverseRequest(interim=interim))
    assert wait_for(lambda: model_counters(mesh).get("completed", 0) > before.get("completed", 0), 60)
    warmed = settled_counters(mesh)
    outbox.put(generation_pb2.ConverseRequest(generate=final))
    outbox.put(None)
    responses = list(call)
    after = settled_counters(mesh)
    assert responses[-1].HasField("final") and responses[-1].final.usage.completion_tokens == 1
    prefilled = warmed["prompt_computed"] - before["prompt_computed"]
    computed = after["prompt_computed"] - warmed["prompt_computed"]
    cached = after["prompt_cached"] - warmed["prompt_cached"]
    prompt = responses[-1].final.usage.prompt_tokens
    assert prefilled > 60 and cached >= prefilled - 10, (prefilled, cached, computed, prompt)
    assert computed <= 20 and cached + computed == prompt, (prefilled, cached, computed, prompt)


def _converse(
    stub: Stub, req: generation_pb2.GenerateRequest, interrupt_after: int
) -> tuple[list[str], generation_pb2.ConverseResponse]:
    outbox: queue.Queue[generation_pb2.ConverseRequest | None] = queue.Queue()
    outbox.put(generation_pb2.ConverseRequest(generate=req))

    def requests() -> Iterator[generation_pb2.ConverseRequest]:
        while (message := outbox.get()) is not None:
            yield message

    received: list[str] = []
    last = None
    for response in stub.Converse(requests(), timeout=120):
        last = response
        if response.HasField("chunk"):
            received.append(response.chunk.text)
            if len(received) == interrupt_after:
                outbox.put(generation_pb2.ConverseRequest(interrupt=generation_pb2.Interrupt()))
        elif response.HasField("interrupted") or response.HasField("final"):
            break
    outbox.put(None)
    assert last is not None
    return received, last


def test_barge_in_stops_the_model_and_acknowledges_what_was_delivered(gateway: Stub, mesh: Mesh) -> None:
    """An interrupt after the 5th chunk cancels the Triton generation; the ack's text equals what was received."""
    before = settled_counters(mesh)
    req = request("Write a long story about a dragon.", temperature=0.0, max_tokens=400)
    received, last = _converse(gateway, req, interrupt_after=5)
    assert last.HasField("interrupted"), last
    ack = last.interrupted
    assert ack.delivered_text == "".join(received)
    assert ack.delivered_chunks == len(received) >= 5
    deadline = time.monotonic() + 5
    while model_counters(mesh)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model_counters(mesh)["cancelled"] == before["cancelled"] + 1, "the model saw no cancel"
    assert model_counters(mesh)["tokens"] - before["tokens"] < 400


def test_converse_without_interrupt_ends_with_the_final_message(gateway: Stub) -> None:
    """A voice turn that is not interrupted streams chunks and ends with the usual final message."""
    req = request("What is the capital of France?", temperature=0.0, max_tokens=40)
    req.chunking = generation_pb2.CHUNKING_MODE_SENTENCE
    received, last = _converse(gateway, req, interrupt_after=10_000)
    assert last.HasField("final") and "Paris" in "".join(received)
