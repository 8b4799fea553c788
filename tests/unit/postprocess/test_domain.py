from __future__ import annotations

from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import BlockedTerm, SafetyStream, load_policy
from llmmesh.postprocess.chunker import Chunker, ChunkingMode
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


async def _batched(pipeline: TextPipeline, ids: list[int], sizes: list[int]) -> tuple[str, Output]:
    """Feeds `ids` in batches of the given sizes (cycled), as a lagging reader receives them."""
    text, pos, k = "", 0, 0
    while pos < len(ids):
        out = await pipeline.feed(ids[pos : pos + sizes[k % len(sizes)]])
        pos += sizes[k % len(sizes)]
        k += 1
        text += out.text
        if out.finish:
            return text, out
    out = await pipeline.finish(Finish.STOP)
    return text + out.text, out


BATCHINGS = [[1], [16], [2, 3], [5, 1, 7], [1000]]


async def test_usage_counts_through_the_token_that_completed_the_stop_string(assets: ModelAssets) -> None:
    """STOP_STRING: the count ends at the id that completed the stop string, for every batching."""
    ids = assets.encode("The capital of France is Paris. It is big and old and lovely.")
    expected = len(assets.encode("The capital of France is Paris"))
    for sizes in BATCHINGS:
        text, out = await _batched(_pipeline(assets, stops=["Paris"]), ids, sizes)
        assert (text, out.finish, out.completion_tokens) == ("The capital of France is ", Finish.STOP_STRING, expected)


async def test_usage_counts_the_delivered_tokens_before_a_filter(assets: ModelAssets) -> None:
    """CONTENT_FILTER: the ids whose text was delivered before the filter point, the same for every batching."""
    ids = assets.encode("The capital of Germany is a city. Its name is Berlin and it is big.")
    results = set()
    for sizes in BATCHINGS:
        text, out = await _batched(_pipeline(assets, blocked=["berlin"]), ids, sizes)
        assert out.finish is Finish.CONTENT_FILTER
        results.add((text, out.completion_tokens))
    assert len(results) == 1
    ((text, count),) = results
    assert text.startswith("The capital of Germany is a city.") and "Ber" not in text
    # The ids wholly within the delivered text: not the id that carries its trailing space into "Berlin".
    assert text.startswith(assets.decode(ids[:count])) and not text.startswith(assets.decode(ids[: count + 1]))


async def test_usage_counts_every_id_when_the_generation_ends(assets: ModelAssets) -> None:
    """STOP and LENGTH: every id received, special ids whose text is empty included."""
    ids = [*assets.encode("Short answer."), assets.eos_token_id]
    for sizes in BATCHINGS:
        _, out = await _batched(_pipeline(assets), ids, sizes)
        assert out.finish is Finish.STOP and out.completion_tokens == len(ids)


async def test_a_batch_is_released_as_one_token_chunk_and_stops_inside_it(assets: ModelAssets) -> None:
    """TOKEN mode: one chunk per feed; ids after a stop string inside a batch are leftovers, not chunk ids."""
    pipeline = _pipeline(assets, stops=["Paris"])
    ids = assets.encode("It is Paris, of course.")
    out = await pipeline.feed(ids)
    assert [p.text for p in out.pieces] == ["It is "]
    through = len(assets.encode("It is Paris"))
    assert out.pieces[0].ids + out.leftover_ids == ids
    assert out.pieces[0].ids == ids[:through] and out.completion_tokens == through


class _Marker:
    """Scores 1.0 (unsafe) a text that contains the marker word, else 0.0."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.calls = 0

    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        self.calls += 1
        return [1.0 if self.marker in t else 0.0 for t in texts]


def _clause_pipeline(assets: ModelAssets, marker: str) -> TextPipeline:
    policy = load_policy()  # the shipped policy releases clauses for CLAUSE chunking
    assert policy.classifier.release == "clause"
    safety = SafetyStream(policy, _Marker(marker), clauses=Chunker(ChunkingMode.CLAUSE))
    return TextPipeline(assets.token_bytes, [], StreamSafety(safety), ChunkingMode.CLAUSE)


async def test_clause_release_sends_each_clause_when_it_is_scored(assets: ModelAssets) -> None:
    """CLAUSE chunking with the classifier on: the first clause is a chunk before the sentence has ended, and
    the chunks are the clauses the chunker cuts, each with its own ids."""
    text = "The capital of France is Paris, which is known for its museums. It is large."
    ids = assets.encode(text)
    pipeline = _clause_pipeline(assets, "nasty")
    arrivals: list[tuple[int, str]] = []
    seen: list[int] = []
    for k, i in enumerate(ids):
        out = await pipeline.feed([i])
        arrivals += [(k, p.text) for p in out.pieces]
        seen += [x for p in out.pieces for x in p.ids]
    out = await pipeline.finish(Finish.STOP)
    arrivals += [(len(ids), p.text) for p in out.pieces]
    seen += [x for p in out.pieces for x in p.ids] + out.leftover_ids
    chunker = Chunker(ChunkingMode.CLAUSE)
    assert [t for _, t in arrivals] == chunker.push(text) + chunker.flush()
    assert seen == ids and out.finish is Finish.STOP
    sentence_end = len(assets.encode("The capital of France is Paris, which is known for its museums."))
    assert arrivals[0][1] == "The capital of France is Paris," and arrivals[0][0] < sentence_end - 3


async def test_clause_release_ends_with_content_filter_when_the_sentence_fails(assets: ModelAssets) -> None:
    """The sentence's first clause is out; its failing clause and what follows never are."""
    ids = assets.encode("Here is the answer you wanted, and it is nasty stuff. More.")
    texts, _, out = await _run(_clause_pipeline(assets, "nasty"), ids)
    assert out.finish is Finish.CONTENT_FILTER and out.category == "toxicity"
    assert "".join(texts) == "Here is the answer you wanted,"
