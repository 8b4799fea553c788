"""Postprocess for a model that streams text (an OpenAI-compatible endpoint): Text messages go through the same
stop strings, safety and chunks, with no vocabulary and no ids."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import BlockedTerm, SafetyStream, load_policy
from llmmesh.postprocess.chunker import ChunkingMode
from llmmesh.postprocess.domain import Finish, TextPipeline
from llmmesh.postprocess.server import StreamSafety
from llmmesh.postprocess.stage import PostprocessStage
from llmmesh.stages.v1 import postprocess_pb2
from llmmesh.v1 import generation_pb2

PIECES = ["The", " capital", " of", " France", " is", " Paris", ".", " It", " is", " big", "."]


def _pipeline(
    stops: list[str] | None = None, blocked: list[str] | None = None, chunking: ChunkingMode = ChunkingMode.TOKEN
) -> TextPipeline:
    policy = load_policy(extra_terms=[BlockedTerm(t, "geo") for t in blocked or []])
    return TextPipeline(None, stops or [], StreamSafety(SafetyStream(policy)), chunking)


def _stage(**kwargs: object) -> PostprocessStage:
    return PostprocessStage(lambda start, deadline: _pipeline(list(start.stop), **kwargs))  # type: ignore[arg-type]


async def _requests(messages: list[postprocess_pb2.ProcessRequest]) -> AsyncIterator[postprocess_pb2.ProcessRequest]:
    for m in messages:
        yield m


def _text_stream(pieces: list[str], stop: list[str] | None = None, **end: int) -> list[postprocess_pb2.ProcessRequest]:
    start = postprocess_pb2.ProcessRequest(start=postprocess_pb2.Start(request_id="r", model="remote", stop=stop or []))
    texts = [postprocess_pb2.ProcessRequest(text=postprocess_pb2.Text(text=p)) for p in pieces]
    done = postprocess_pb2.ProcessRequest(end=postprocess_pb2.End(**end))  # type: ignore[arg-type]
    return [start, *texts, done]


async def _process(
    stage: PostprocessStage, messages: list[postprocess_pb2.ProcessRequest]
) -> tuple[str, postprocess_pb2.Done]:
    text, done = "", None
    async for response in stage.process(_requests(messages)):
        if response.HasField("delta"):
            assert not response.delta.token_ids
            text += response.delta.text
        else:
            done = response.done
    assert done is not None
    return text, done


async def test_text_stream_comes_out_whole_with_the_endpoints_count() -> None:
    """Text messages come out as deltas without ids; Done carries the finish and End's completion_tokens."""
    messages = _text_stream(PIECES, finish_reason=generation_pb2.FINISH_REASON_LENGTH, completion_tokens=42)
    text, done = await _process(_stage(), messages)
    assert text == "".join(PIECES)
    assert done.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert done.completion_tokens == 42 and not done.token_ids


async def test_stop_string_ends_a_text_stream_counting_the_messages_through_it() -> None:
    """A stop string across messages cuts the text; the count is the messages up to the one that completed it."""
    messages = _text_stream(PIECES, stop=["Paris."], finish_reason=generation_pb2.FINISH_REASON_STOP)
    text, done = await _process(_stage(), messages)
    assert text == "The capital of France is "
    assert done.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING and done.matched_stop == "Paris."
    assert done.completion_tokens == PIECES.index(".") + 1


async def test_blocked_term_filters_a_text_stream() -> None:
    """The safety layer applies to text streams: a blocked term ends it with CONTENT_FILTER and never comes out."""
    pipeline = _pipeline(blocked=["paris"])
    out = None
    for piece in PIECES:
        out = await pipeline.feed_text(piece)
        if out.finish is not None:
            break
    assert out is not None and out.finish is Finish.CONTENT_FILTER and out.category == "geo"


async def test_sentence_chunks_are_cut_in_a_text_stream() -> None:
    """Sentence chunking works on text pieces as on detokenized ids: chunks end at sentence boundaries."""
    pipeline = _pipeline(chunking=ChunkingMode.SENTENCE)
    chunks: list[str] = []
    for piece in PIECES:
        chunks += [p.text for p in (await pipeline.feed_text(piece)).pieces]
    out = await pipeline.finish(Finish.STOP, 11)
    chunks += [p.text for p in out.pieces]
    assert "".join(chunks) == "".join(PIECES)
    assert chunks[0] == "The capital of France is Paris."
    assert out.completion_tokens == 11


async def test_tokens_are_refused_on_a_text_stream() -> None:
    """A stream carries text or tokens, never both: ids sent for a text model are INVALID_ARGUMENT."""
    with pytest.raises(InvalidArgument, match="streams text"):
        await _pipeline().feed([1, 2])


async def test_text_is_refused_on_a_token_stream(assets: ModelAssets) -> None:
    """Text sent for a model with a vocabulary is INVALID_ARGUMENT."""
    pipeline = TextPipeline(assets.token_bytes, [], StreamSafety(SafetyStream(load_policy())))
    with pytest.raises(InvalidArgument, match="token ids"):
        await pipeline.feed_text("hi")


async def test_postprocess_serves_an_openai_model_without_a_vocabulary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A registry with an openai model loads (no tokenizer for it) and its streams take text, not ids."""
    from llmmesh.postprocess.server import PostprocessSettings, build_servicer

    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        "  - {name: remote, default: true, backend: openai, openai: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "  - {name: smollm2, triton_model: smollm2}\n",
        encoding="utf-8",
    )
    servicer, _ = build_servicer(PostprocessSettings(model_registry=str(registry)))
    text, done = await _process(
        servicer.stage,
        _text_stream(["Hi", " there."], finish_reason=generation_pb2.FINISH_REASON_STOP, completion_tokens=3),
    )
    assert (text, done.completion_tokens) == ("Hi there.", 3)
