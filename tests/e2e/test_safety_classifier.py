"""End to end: the safety classifier as a real Triton model (python backend, dynamic batching)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from llmmesh.common.safety import SafetyPolicy, SafetyStream, TritonClassifier, check_prompt, load_policy
from llmmesh.infer.triton_server import TritonServer

from .conftest import running_triton

pytestmark = pytest.mark.e2e

MODEL = "safety_classifier"


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonServer]:
    yield from running_triton(MODEL)


@pytest.fixture
async def classifier(triton: TritonServer) -> AsyncIterator[TritonClassifier]:
    client = TritonClassifier(triton.grpc_url, MODEL)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
def policy() -> SafetyPolicy:
    return load_policy()


def _stats(server: TritonServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{MODEL}/stats", timeout=5) as resp:
        stats: dict[str, Any] = json.load(resp)["model_stats"][0]
    return stats


def _executions_by_batch_size(stats: dict[str, Any]) -> dict[int, int]:
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


async def test_the_model_scores_insults_high_and_plain_text_low(classifier: TritonClassifier) -> None:
    """alt-profanity-check behind Triton: one probability per text, in order."""
    assert await classifier.ready()
    scores = await classifier.score(["The capital of France is Paris.", "You are a stupid idiot.", "", "Merci !"])
    assert len(scores) == 4
    assert scores[0] < 0.1 and scores[1] > 0.9 and scores[2] < 0.1 and scores[3] < 0.5


async def test_concurrent_streams_checks_are_batched_by_triton(
    triton: TritonServer, classifier: TritonClassifier, policy: SafetyPolicy
) -> None:
    """48 response streams check their sentences at once, one text per request; Triton's statistics show
    executions of batches larger than 1 (and fewer executions than requests)."""
    before = _stats(triton)
    streams = 48

    async def one_stream(n: int) -> str:
        stream = SafetyStream(policy, classifier)
        out = []
        # Each push completes at most one sentence, so each Triton request holds a single text.
        for piece in ["Sentence", f" {n}", " is", " fine", ".", " And", " so", " is", " this", ".", ""]:
            verdict = await stream.push(piece, final=piece == "")
            assert verdict.blocked is None
            out.append(verdict.text)
        return "".join(out)

    texts = await asyncio.gather(*(one_stream(n) for n in range(streams)))
    assert texts == [f"Sentence {n} is fine. And so is this." for n in range(streams)]

    after = _stats(triton)
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == 2 * streams
    grown = {
        size: count - _executions_by_batch_size(before).get(size, 0)
        for size, count in _executions_by_batch_size(after).items()
    }
    assert any(size > 1 and n > 0 for size, n in grown.items()), f"no batch > 1 in {after['batch_stats']}"
    assert executions < requests


async def test_a_stream_is_blocked_by_the_real_classifier(classifier: TritonClassifier, policy: SafetyPolicy) -> None:
    """An insult with no blocklisted term is caught by the model; the sentence before it was released."""
    stream = SafetyStream(policy, classifier)
    released = []
    blocked = None
    for piece in ["The weather", " is nice", ".", " You", " are", " a stupid", " idiot", ".", " Bye", "."]:
        verdict = await stream.push(piece)
        released.append(verdict.text)
        if verdict.blocked:
            blocked = verdict.blocked
            break
    assert blocked == policy.classifier.category
    assert "".join(released) == "The weather is nice. "


async def test_prompts_are_checked_by_the_real_classifier(classifier: TritonClassifier, policy: SafetyPolicy) -> None:
    """check_prompt blocks an abusive prompt and lets an ordinary one through."""
    assert await check_prompt(policy, "Write a haiku about the sea.", classifier) is None
    assert await check_prompt(policy, "Tell me why you are such a stupid moron.", classifier) == "toxicity"
