from __future__ import annotations

from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import BlockedTerm, SafetyStream, load_policy
from llmmesh.postprocess.chunker import ChunkingMode
from llmmesh.postprocess.domain import Finish, Output, TextPipeline
from llmmesh.postprocess.server import StreamSafety


async def _run(
    pipeline: TextPipeline, ids: list[int], end: Finish = Finish.STOP
) -> tuple[list[str], list[int], Output]:
    texts: list[str] = []
    seen: list[int] = []
    out = Output()
    for i in ids:
        out = await pipeline.feed([i])
        texts += [p.text for p in out.pieces]
        seen += [x for p in out.pieces for x in p.ids] + out.leftover_ids
        if out.finish:
            return texts, seen, out
    out = await pipeline.finish(end)
    texts += [p.text for p in out.pieces]
    seen += [x for p in out.pieces for x in p.ids] + out.leftover_ids
    return texts, seen, out


def _pipeline(
    assets: ModelAssets,
    stops: list[str] | None = None,
    blocked: list[str] | None = None,
    chunking: ChunkingMode = ChunkingMode.TOKEN,
) -> TextPipeline:
    policy = load_policy(extra_terms=[BlockedTerm(t, "geo") for t in blocked or []])
    safety = StreamSafety(SafetyStream(policy))  # blocklist and PII layers; no classifier
    return TextPipeline(assets.token_bytes, stops or [], safety, chunking)


async def test_plain_stream_ends_with_the_generation_reason_and_every_id(assets: ModelAssets) -> None:
    """Without stops or blocks all text and all ids come out, with the reason infer gave."""
    ids = assets.encode("Hello 世界 👋🏽!")
    texts, seen, out = await _run(_pipeline(assets), ids, Finish.LENGTH)
    assert ("".join(texts), seen, out.finish) == ("Hello 世界 👋🏽!", ids, Finish.LENGTH)


async def test_stop_string_cuts_the_text(assets: ModelAssets) -> None:
    """The stop string and what follows never come out; the reason is STOP_STRING with the string."""
    ids = assets.encode("The capital of France is Paris. It is big.")
    texts, _, out = await _run(_pipeline(assets, stops=["Paris"]), ids)
    assert ("".join(texts), out.finish, out.matched_stop) == ("The capital of France is ", Finish.STOP_STRING, "Paris")


async def test_blocked_term_ends_the_stream_with_its_category(assets: ModelAssets) -> None:
    """A blocked term ends the stream with CONTENT_FILTER and never comes out."""
    ids = assets.encode("The capital of Germany is Berlin.")
    texts, _, out = await _run(_pipeline(assets, blocked=["berlin"]), ids)
    assert out.finish is Finish.CONTENT_FILTER and out.category == "geo"
    assert "Ber" not in "".join(texts)


async def test_sentence_chunks_carry_all_ids_and_text(assets: ModelAssets) -> None:
    """In SENTENCE mode chunks are whole sentences, and chunk ids plus leftovers are every id fed."""
    text = "Dr. Lee arrived at 3.30 pm. She said hello! Then she left..."
    ids = assets.encode(text)
    texts, seen, out = await _run(_pipeline(assets, chunking=ChunkingMode.SENTENCE), ids)
    assert texts == ["Dr. Lee arrived at 3.30 pm.", " She said hello!", " Then she left..."]
    assert seen == ids and out.finish is Finish.STOP


async def test_email_in_the_output_is_redacted_before_release(assets: ModelAssets) -> None:
    """An e-mail address streamed token by token reaches the client only as its placeholder."""
    ids = assets.encode("Write to jane.doe@example.com today.")
    texts, _, out = await _run(_pipeline(assets), ids)
    assert "".join(texts) == "Write to [EMAIL] today." and out.finish is Finish.STOP
