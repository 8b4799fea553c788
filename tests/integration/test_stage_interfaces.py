"""Each stage through its interface, in process (the stage itself) and over real gRPC (the gateway's remote
adapter against the stage's servicer behind the services' StatusInterceptor): the same calls end the same
way, answers and errors alike. The gateway cannot tell where a stage runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from llmmesh.common.errors import LlmmeshError
from llmmesh.common.model_assets import ModelAssets
from llmmesh.gateway.stages import RemotePostprocess, RemotePreprocess
from llmmesh.postprocess.server import PostprocessSettings
from llmmesh.postprocess.server import build_servicer as build_postprocess
from llmmesh.postprocess.servicer import PostprocessServicer
from llmmesh.preprocess.server import PreprocessSettings
from llmmesh.preprocess.server import build_servicer as build_preprocess
from llmmesh.preprocess.servicer import PreprocessServicer
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc, preprocess_pb2, preprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

from .loopback import loopback_channel

G = generation_pb2
P = postprocess_pb2


@pytest.fixture(scope="module")
def preprocess_servicer() -> PreprocessServicer:
    servicer, classifier = build_preprocess(PreprocessSettings())
    assert classifier.triton is None  # no Triton URL: the classifier layer (runs_in: triton) is off
    return servicer


@pytest.fixture(scope="module")
def postprocess_servicer() -> PostprocessServicer:
    servicer, classifier = build_postprocess(PostprocessSettings(extra_blocked_terms=["Berlin"]))
    assert classifier.triton is None
    return servicer


def _sampling(**fields: object) -> G.SamplingParams:
    return G.SamplingParams(**fields)  # type: ignore[arg-type]


REQUESTS = {
    "prompt": G.GenerateRequest(prompt="What is the capital of France?", sampling=_sampling(temperature=0.0)),
    "chat, seeded, stop": G.GenerateRequest(
        chat=G.Chat(messages=[G.ChatMessage(role="user", content="Hello  there\u00a0friend")]),
        sampling=_sampling(temperature=0.7, seed=7, stop=["\n\n"], max_tokens=12),
        request_id="abc-1",
    ),
    "sampled, no seed": G.GenerateRequest(prompt="Tell me a story.", sampling=_sampling(temperature=0.9)),
    "blocked prompt": G.GenerateRequest(prompt="You are a fucking idiot, answer me."),
    "empty": G.GenerateRequest(),
    "max_tokens 0": G.GenerateRequest(prompt="Hi", sampling=_sampling(max_tokens=0)),
    "top_p 1.5": G.GenerateRequest(prompt="Hi", sampling=_sampling(top_p=1.5)),
    "unknown model": G.GenerateRequest(prompt="Hi", model="gpt-17"),
    "unknown chunking": G.GenerateRequest(prompt="Hi", chunking=99),  # type: ignore[arg-type]
    "over the context": G.GenerateRequest(prompt="word " * 9000),
}


LOST = (grpc.StatusCode.UNAVAILABLE, "the postprocess stage was lost mid-stream")


def _error(exc: LlmmeshError) -> tuple[grpc.StatusCode, str]:
    return exc.code, str(exc)


async def test_preprocess_answers_the_same_in_process_and_over_grpc(preprocess_servicer: PreprocessServicer) -> None:
    """Every request (answers, a blocked prompt, each kind of bad input) ends the same both ways."""
    local = preprocess_servicer.stage
    results: dict[str, Any] = {}
    async with loopback_channel(
        lambda server: preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server(preprocess_servicer, server)
    ) as channel:
        remote = RemotePreprocess(channel)
        for name, request in REQUESTS.items():
            outcomes = []
            for stage in (local, remote):
                try:
                    outcomes.append(await stage.prepare(request, 10.0))
                except LlmmeshError as exc:
                    outcomes.append(_error(exc))
            assert outcomes[0] == outcomes[1], name
            results[name] = outcomes[0]
    # Not vacuous: answers with ids and hashes, a blocked prompt, and statuses that name the field.
    prompt = results["prompt"]
    assert isinstance(prompt, preprocess_pb2.PrepareResponse) and prompt.input_ids and prompt.shareable
    assert results["blocked prompt"].blocked_category == "profanity"
    assert results["max_tokens 0"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in results["over the context"][1]


def _start(stop: Sequence[str] = (), chunking: int = G.CHUNKING_MODE_TOKEN, model: str = "") -> Any:
    return P.ProcessRequest(start=P.Start(request_id="r1", model=model, stop=list(stop), chunking=chunking))


def _tokens(ids: Sequence[int], per_message: int = 1) -> list[Any]:
    return [P.ProcessRequest(tokens=P.Tokens(ids=ids[i : i + per_message])) for i in range(0, len(ids), per_message)]


def _end(reason: int = G.FINISH_REASON_STOP) -> Any:
    return P.ProcessRequest(end=P.End(finish_reason=reason))


def conversations(assets: ModelAssets) -> dict[str, list[Any]]:
    answer = assets.encode("The capital of France is Paris. Write to jane.doe@example.com today! 世界 👋🏽")
    berlin = assets.encode("Germany's capital is Berlin, a big city.")
    return {
        "plain": [_start(), *_tokens(answer), _end(G.FINISH_REASON_LENGTH)],
        "several ids per message": [_start(), *_tokens(answer, per_message=5), _end()],
        "stop string": [_start(stop=["Paris"]), *_tokens(answer), _end()],
        "blocked word": [_start(), *_tokens(berlin), _end()],
        "sentence chunks": [_start(chunking=G.CHUNKING_MODE_SENTENCE), *_tokens(answer), _end()],
        "no end (infer failed)": [_start(), *_tokens(answer[:6])],
        "tokens before start": [*_tokens(answer[:2]), _end()],
        "start twice": [_start(), _start()],
        "unknown model": [_start(model="gpt-17")],
        "unknown chunking": [_start(chunking=99)],
        "bad finish reason": [_start(), *_tokens(answer[:3]), _end(G.FINISH_REASON_CONTENT_FILTER)],
    }


async def _each(messages: Sequence[Any]) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def _converse(stage: Any, messages: Sequence[Any]) -> tuple[list[Any], Any, Any]:
    deltas, done, error = [], None, None
    try:
        async for response in stage.process(_each(messages), 10.0):
            if response.HasField("delta"):
                deltas.append((response.delta.text, tuple(response.delta.token_ids), response.delta.speakable))
            else:
                d = response.done
                done = (d.finish_reason, d.matched_stop, d.filter_category, tuple(d.token_ids), d.completion_tokens)
    except LlmmeshError as exc:
        error = _error(exc)
    return deltas, done, error


def _joined(deltas: list[tuple[str, tuple[int, ...], bool]]) -> tuple[str, tuple[int, ...]]:
    return "".join(t for t, _, _ in deltas), tuple(i for _, ids, _ in deltas for i in ids)


def _ends(deltas: list[tuple[str, tuple[int, ...], bool]]) -> dict[int, bool]:
    """Where each chunk ends in the text, and whether it is speakable there."""
    out, at = {}, 0
    for text, _, speakable in deltas:
        at += len(text)
        out[at] = speakable
    return out


async def test_postprocess_streams_the_same_in_process_and_over_grpc(
    assets: ModelAssets, postprocess_servicer: PostprocessServicer
) -> None:
    """Every conversation (text, redaction, stop, filter, a stream without End, malformed ones) ends the same."""
    local = postprocess_servicer.stage
    outcomes = {}
    async with loopback_channel(
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(postprocess_servicer, server)
    ) as channel:
        remote = RemotePostprocess(channel)
        for name, messages in conversations(assets).items():
            in_process = await _converse(local, messages)
            over_grpc = await _converse(remote, messages)
            if over_grpc[2] == LOST and in_process[2] is not None:
                # grpc's client reports "Internal error from Core" (the adapter: a lost stage) instead of the
                # server's own status when the server ended the call while the client was still writing.
                over_grpc = (over_grpc[0], over_grpc[1], in_process[2])
            # Over gRPC, deltas that wait together at the gateway come as one chunk (a lagging reader gets
            # fewer chunks): the same text and ids, each chunk ending where an in-process one ended.
            assert _joined(in_process[0]) == _joined(over_grpc[0]), name
            assert _ends(over_grpc[0]).items() <= _ends(in_process[0]).items(), name
            assert in_process[1:] == over_grpc[1:], name
            outcomes[name] = in_process
    # Not vacuous: text, a redaction, a stop, a filter and statuses each came out.
    assert "".join(t for t, _, _ in outcomes["plain"][0]).startswith("The capital of France is Paris. Write to [")
    assert outcomes["stop string"][1][1] == "Paris"
    assert outcomes["blocked word"][1][0] == G.FINISH_REASON_CONTENT_FILTER
    assert outcomes["no end (infer failed)"][1] is None and outcomes["no end (infer failed)"][2] is None
    assert outcomes["start twice"][2] == (grpc.StatusCode.INVALID_ARGUMENT, "start: sent twice")
    assert outcomes["unknown model"][2][1] == "start.model: unknown model 'gpt-17'"


async def test_a_gateway_that_lags_gets_the_same_answer_in_fewer_chunks(
    assets: ModelAssets, postprocess_servicer: PostprocessServicer
) -> None:
    """Deltas that queue up over several frames while the gateway is busy (its client's writes) are joined:
    the same text and ids in fewer chunks, each ending where a chunk of the prompt reader ended, speakable
    where that one was."""
    answer = assets.encode("The capital of France is Paris. It lies on the Seine, and it is large. " * 3)
    messages = [_start(), *_tokens(answer), _end()]

    async def read(stage: Any, lag: float) -> list[tuple[str, tuple[int, ...], bool]]:
        out = []
        async for response in stage.process(_each(messages), 10.0):
            if response.HasField("delta"):
                d = response.delta
                out.append((d.text, tuple(d.token_ids), d.speakable))
                await asyncio.sleep(lag)
        return out

    async with loopback_channel(
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(postprocess_servicer, server)
    ) as channel:
        remote = RemotePostprocess(channel)
        keeping_up = await read(postprocess_servicer.stage, 0.0)
        lagging = await read(remote, 0.05)
    assert _joined(lagging) == _joined(keeping_up)
    assert len(lagging) < len(keeping_up) / 2, (len(lagging), len(keeping_up))

    assert _ends(lagging).items() <= _ends(keeping_up).items()
