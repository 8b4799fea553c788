from __future__ import annotations

from llmmesh.common.model_assets import ModelAssets
from llmmesh.postprocess.domain import Finish, TextPipeline
from llmmesh.postprocess.textmatch import BlockedTerm


def _run(
    pipeline: TextPipeline, ids: list[int], end: Finish = Finish.STOP
) -> tuple[str, list[int], Finish | None, str]:
    text: list[str] = []
    seen: list[int] = []
    for i in ids:
        out = pipeline.feed([i])
        text.append(out.text)
        seen.extend(out.ids)
        if out.finish:
            return "".join(text), seen, out.finish, out.matched_stop or out.category
    out = pipeline.finish(end)
    text.append(out.text)
    seen.extend(out.ids)
    return "".join(text), seen, out.finish, ""


def test_plain_stream_ends_with_the_generation_reason_and_every_id(assets: ModelAssets) -> None:
    """Without stops or blocks all text and all ids come out, with the reason infer gave."""
    ids = assets.encode("Hello 世界 👋🏽!")
    text, seen, finish, _ = _run(TextPipeline(assets.token_bytes, [], []), ids, Finish.LENGTH)
    assert (text, seen, finish) == ("Hello 世界 👋🏽!", ids, Finish.LENGTH)


def test_stop_string_cuts_the_text(assets: ModelAssets) -> None:
    """The stop string and what follows never come out; the reason is STOP_STRING with the string."""
    ids = assets.encode("The capital of France is Paris. It is big.")
    text, _, finish, stop = _run(TextPipeline(assets.token_bytes, ["Paris"], []), ids)
    assert (text, finish, stop) == ("The capital of France is ", Finish.STOP_STRING, "Paris")


def test_blocked_term_ends_the_stream_with_its_category(assets: ModelAssets) -> None:
    """A blocked term ends the stream with CONTENT_FILTER and never comes out."""
    ids = assets.encode("The capital of Germany is Berlin.")
    pipeline = TextPipeline(assets.token_bytes, [], [BlockedTerm("berlin", "geo")])
    text, _, finish, category = _run(pipeline, ids)
    assert finish is Finish.CONTENT_FILTER and category == "geo"
    assert "Berlin" not in text and "Ber" not in text
