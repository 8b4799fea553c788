"""The safety classifier's Triton calls and the stages that make them, over real gRPC on loopback ports.

Each ModelInfer carries the request's remaining time as its deadline (capped by the client's own timeout):
from TritonClassifier, from postprocess's response stream and from preprocess's prompt check, each a real
server built by its `create_server`. Postprocess's health follows whether its policy's classifier can be
used: NOT_SERVING while the policy enables it and the model is not ready or nothing answers at the Triton
address, SERVING once it is ready again or the reloaded policy no longer needs it. Triton is the stand-in
of triton_standin.py; tests/e2e/test_classifier_health.py checks the health against a real Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.errors import DeadlineExceeded
from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import TritonClassifier
from llmmesh.launcher import free_port
from llmmesh.postprocess.server import PostprocessSettings
from llmmesh.postprocess.server import create_server as create_postprocess
from llmmesh.preprocess.server import PreprocessSettings
from llmmesh.preprocess.server import create_server as create_preprocess
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc, preprocess_pb2, preprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

from .loopback import serving
from .triton_standin import StandInTriton, standin_triton

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def triton() -> AsyncIterator[StandInTriton]:
    async with standin_triton() as server:
        yield server


async def _status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(reply.status)


async def _until(channel: grpc.aio.Channel, status: int, timeout: float = 5.0) -> int:
    """Watches health until it reads `status` or `timeout` passes; returns the last status seen."""
    last = -1
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                last = int(reply.status)
                if last == status:
                    break
    return last


def _within(low: float, high: float) -> Callable[[float | None], bool]:
    """A deadline seen by the server in (low, high]; it reads a few ms over what the client set (the timeout
    travels in whole units of the grpc-timeout header and is measured against the wall clock)."""
    return lambda d: d is not None and low < d <= high + 0.05


# TritonClassifier


async def test_each_call_carries_the_callers_remaining_time(triton: StandInTriton) -> None:
    """score(timeout=0.5) reaches Triton with a deadline of at most 0.5 s, not the client's 5 s."""
    classifier = TritonClassifier(triton.url, timeout=5.0)
    try:
        assert await classifier.score(["one", "two"], timeout=0.5) == [0.5, 0.5]
    finally:
        await classifier.close()
    assert len(triton.deadlines) == 1 and _within(0.0, 0.5)(triton.deadlines[0]), triton.deadlines


async def test_the_clients_timeout_caps_a_longer_or_absent_deadline(triton: StandInTriton) -> None:
    """Without a deadline of the caller's, or with a longer one, a call gets the client's own timeout."""
    classifier = TritonClassifier(triton.url, timeout=2.0)
    try:
        await classifier.score(["one"])
        await classifier.score(["one"], timeout=60.0)
    finally:
        await classifier.close()
    assert len(triton.deadlines) == 2 and all(map(_within(1.0, 2.0), triton.deadlines)), triton.deadlines


async def test_a_spent_deadline_fails_without_a_call(triton: StandInTriton) -> None:
    """No time left: DeadlineExceeded at once, and Triton is not asked."""
    classifier = TritonClassifier(triton.url)
    try:
        with pytest.raises(DeadlineExceeded):
            await classifier.score(["one"], timeout=0.0)
        with pytest.raises(DeadlineExceeded):
            await classifier.score(["one"], timeout=-1.0)
    finally:
        await classifier.close()
    assert triton.deadlines == []


async def test_a_model_that_never_answers_fails_at_the_callers_deadline(triton: StandInTriton) -> None:
    """A hung model ends the call with DeadlineExceeded when the caller's time is up, long before the
    client's own 5 s."""
    triton.hang = True
    classifier = TritonClassifier(triton.url, timeout=5.0)
    started = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded):
            await classifier.score(["one"], timeout=0.3)
    finally:
        await classifier.close()
    assert time.monotonic() - started < 2.5


# The stages that call it


def _conversation(assets: ModelAssets) -> list[postprocess_pb2.ProcessRequest]:
    P = postprocess_pb2
    return [
        P.ProcessRequest(start=P.Start(request_id="r1", chunking=generation_pb2.CHUNKING_MODE_TOKEN)),
        P.ProcessRequest(tokens=P.Tokens(ids=assets.encode("Hello there. Bye now."))),
        P.ProcessRequest(end=P.End(finish_reason=generation_pb2.FINISH_REASON_STOP)),
    ]


async def test_postprocess_gives_the_classifier_the_streams_remaining_time(
    triton: StandInTriton, assets: ModelAssets
) -> None:
    """A Process call with 3 s left has its sentences scored with a deadline of at most 3 s; one without a
    deadline gets the classifier client's own 5 s."""
    service = await create_postprocess(PostprocessSettings(triton_url=triton.url, health_interval_seconds=0.1))
    async with serving(service) as channel:
        assert await _until(channel, SERVING) == SERVING
        stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)
        replies = [r async for r in stub.Process(iter(_conversation(assets)), timeout=3.0)]
        assert replies[-1].done.finish_reason == generation_pb2.FINISH_REASON_STOP
        with_deadline = list(triton.deadlines)
        triton.deadlines.clear()
        replies = [r async for r in stub.Process(iter(_conversation(assets)))]
        assert replies[-1].done.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert with_deadline and all(map(_within(0.0, 3.0), with_deadline)), with_deadline
    assert triton.deadlines and all(map(_within(3.0, 5.0), triton.deadlines)), triton.deadlines


async def test_preprocess_gives_the_prompt_check_the_requests_remaining_time(triton: StandInTriton) -> None:
    """A Prepare call with 3 s left checks its prompt with a deadline of at most 3 s."""
    service = await create_preprocess(PreprocessSettings(triton_url=triton.url))
    async with serving(service) as channel:
        request = preprocess_pb2.PrepareRequest(request=generation_pb2.GenerateRequest(prompt="Hello there."))
        reply = await preprocess_pb2_grpc.PreprocessServiceStub(channel).Prepare(request, timeout=3.0)
        assert reply.input_ids and not reply.blocked_category
    assert len(triton.deadlines) == 1 and _within(0.0, 3.0)(triton.deadlines[0]), triton.deadlines


# Postprocess's health


async def test_postprocess_is_not_serving_while_the_model_is_not_ready(triton: StandInTriton) -> None:
    """Model not ready: NOT_SERVING from the start; ready: SERVING; not ready again: NOT_SERVING."""
    triton.ready = False
    service = await create_postprocess(PostprocessSettings(triton_url=triton.url, health_interval_seconds=0.1))
    async with serving(service) as channel:
        assert await _status(channel) == NOT_SERVING
        await asyncio.sleep(0.3)
        assert await _status(channel) == NOT_SERVING
        triton.ready = True
        assert await _until(channel, SERVING) == SERVING
        triton.ready = False
        assert await _until(channel, NOT_SERVING) == NOT_SERVING


async def test_postprocess_is_not_serving_when_nothing_answers_at_the_triton_address() -> None:
    """The classifier pointed at a port where nothing listens: NOT_SERVING, and it stays so."""
    service = await create_postprocess(
        PostprocessSettings(triton_url=f"127.0.0.1:{free_port()}", health_interval_seconds=0.1)
    )
    async with serving(service) as channel:
        await asyncio.sleep(0.5)
        assert await _status(channel) == NOT_SERVING


async def test_postprocess_health_follows_the_reloaded_policy(tmp_path: Path) -> None:
    """With nothing at the Triton address, a policy without the classifier serves; reloaded with the
    classifier enabled, postprocess turns NOT_SERVING; without it again, SERVING."""
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: "no-classifier"\nclassifier: {enabled: false}\n', encoding="utf-8")
    service = await create_postprocess(
        PostprocessSettings(
            triton_url=f"127.0.0.1:{free_port()}", safety_policy_path=str(policy), health_interval_seconds=0.1
        )
    )
    async with serving(service) as channel:
        assert await _until(channel, SERVING) == SERVING
        policy.write_text('version: "classifier"\nclassifier: {enabled: true}\n', encoding="utf-8")
        assert await _until(channel, NOT_SERVING) == NOT_SERVING
        policy.write_text('version: "no-classifier-again"\nclassifier: {enabled: false}\n', encoding="utf-8")
        assert await _until(channel, SERVING) == SERVING


async def test_postprocess_without_a_triton_address_serves_with_the_classifier_layer_off() -> None:
    """No Triton address configured (the classifier layer off by the deployment's choice): SERVING."""
    service = await create_postprocess(PostprocessSettings())
    async with serving(service) as channel:
        assert await _status(channel) == SERVING


# A policy that scores in the stage's own process (classifier.runs_in: stage)

INSULT = "You are a stupid idiot."


def _policy(path: Path, version: str, runs_in: str) -> Path:
    path.write_text(f'version: "{version}"\nclassifier: {{enabled: true, runs_in: {runs_in}}}\n', encoding="utf-8")
    return path


def _insult(assets: ModelAssets) -> list[postprocess_pb2.ProcessRequest]:
    P = postprocess_pb2
    return [
        P.ProcessRequest(start=P.Start(request_id="r1", chunking=generation_pb2.CHUNKING_MODE_TOKEN)),
        P.ProcessRequest(tokens=P.Tokens(ids=assets.encode(INSULT))),
        P.ProcessRequest(end=P.End(finish_reason=generation_pb2.FINISH_REASON_STOP)),
    ]


async def test_postprocess_scores_in_its_own_process_when_the_policy_says_so(
    triton: StandInTriton, assets: ModelAssets, tmp_path: Path
) -> None:
    """`runs_in: triton`: the stand-in's 0.5 lets the insult through; the file reloaded with `runs_in: stage`:
    the real alt-profanity-check in postprocess's process blocks it (loaded on the first stream that needs
    it) and Triton is not asked."""
    policy = _policy(tmp_path / "policy.yaml", "triton", "triton")
    service = await create_postprocess(
        PostprocessSettings(triton_url=triton.url, safety_policy_path=str(policy), health_interval_seconds=0.1)
    )
    async with serving(service) as channel:
        assert await _until(channel, SERVING) == SERVING
        stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)
        replies = [r async for r in stub.Process(iter(_insult(assets)), timeout=10.0)]
        assert replies[-1].done.finish_reason == generation_pb2.FINISH_REASON_STOP
        assert "".join(r.delta.text for r in replies if r.HasField("delta")) == INSULT
        assert len(triton.deadlines) == 1
        _policy(policy, "stage", "stage")
        await asyncio.sleep(1.2)  # the store looks at its file at most once a second
        replies = [r async for r in stub.Process(iter(_insult(assets)), timeout=10.0)]
    assert replies[-1].done.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert replies[-1].done.filter_category == "toxicity"
    assert not any(r.HasField("delta") for r in replies)
    assert len(triton.deadlines) == 1, "the in-process policy called Triton"


async def test_preprocess_checks_prompts_in_its_own_process_without_triton(tmp_path: Path) -> None:
    """`runs_in: stage` and no Triton address at all: an insulting prompt is blocked, a plain one passes."""
    policy = _policy(tmp_path / "policy.yaml", "stage", "stage")
    service = await create_preprocess(PreprocessSettings(safety_policy_path=str(policy)))
    async with serving(service) as channel:
        stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)
        blocked = await stub.Prepare(
            preprocess_pb2.PrepareRequest(request=generation_pb2.GenerateRequest(prompt=INSULT)), timeout=5.0
        )
        plain = await stub.Prepare(
            preprocess_pb2.PrepareRequest(request=generation_pb2.GenerateRequest(prompt="Hello there.")), timeout=5.0
        )
    assert blocked.blocked_category == "toxicity"
    assert plain.input_ids and not plain.blocked_category


async def test_postprocess_scoring_in_its_own_process_serves_whatever_triton_does(tmp_path: Path) -> None:
    """Nothing at the Triton address: `runs_in: stage` serves (the classifier is in the process); reloaded
    with `runs_in: triton`, NOT_SERVING."""
    policy = _policy(tmp_path / "policy.yaml", "stage", "stage")
    service = await create_postprocess(
        PostprocessSettings(
            triton_url=f"127.0.0.1:{free_port()}", safety_policy_path=str(policy), health_interval_seconds=0.1
        )
    )
    async with serving(service) as channel:
        assert await _until(channel, SERVING) == SERVING
        _policy(policy, "triton", "triton")
        assert await _until(channel, NOT_SERVING) == NOT_SERVING
