from __future__ import annotations

import pytest

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.model_assets import ModelAssets
from llmmesh.postprocess.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "東京は日本の首都です。北京是中国的首都。",
    "서울은 한국의 수도입니다",
    "مرحبا بالعالم، كيف حالك؟",
    "naïve café, x̃ and ñ (combining marks)",
    "Family: 👩‍👩‍👧‍👦, wave 👋🏽, flag 🇫🇷, keycap 1️⃣",
    "½ ¾ — “quotes” ‘single’ …",
]


def _stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [det.feed([i]) for i in ids]
    deltas.append(det.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_concatenate_to_the_full_decode(assets: ModelAssets, text: str) -> None:
    """Fed one token at a time, the deltas join to exactly the tokenizer's own decode and the input."""
    ids = assets.encode(text)
    deltas = _stream(IncrementalDetokenizer(assets.token_bytes), ids)
    assert "".join(deltas) == assets.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multi_token_characters_are_held_until_complete(assets: ModelAssets) -> None:
    """An emoji split over several tokens produces no text until its last byte arrives."""
    ids = assets.encode("👋🏽")
    assert len(ids) > 2, "the emoji should span several tokens in this vocabulary"
    deltas = _stream(IncrementalDetokenizer(assets.token_bytes), ids)
    assert [d for d in deltas if d] == ["👋", "🏽"] or "".join(deltas) == "👋🏽"
    assert all(d in ("", "👋", "🏽", "👋🏽") for d in deltas)


def test_byte_fallback_tokens_rebuild_cjk_one_byte_at_a_time(assets: ModelAssets) -> None:
    """Single-byte tokens (the vocabulary's byte fallback) spelling a CJK character yield it whole."""
    byte_token = {b[0]: i for i, b in enumerate(assets.token_bytes) if len(b) == 1}
    ids = [byte_token[b] for b in "語🙂".encode()]  # a KeyError here means no fallback token for that byte
    det = IncrementalDetokenizer(assets.token_bytes)
    deltas = _stream(det, ids)
    assert deltas == ["", "", "語", "", "", "", "🙂", ""]
    assert assets.decode(ids) == "語🙂"


def test_invalid_bytes_decode_like_the_tokenizer(assets: ModelAssets) -> None:
    """A truncated character becomes U+FFFD exactly where the full decode has one, never earlier."""
    byte_token = {b[0]: i for i, b in enumerate(assets.token_bytes) if len(b) == 1}
    euro = "€".encode()
    ids = [byte_token[euro[0]], byte_token[euro[1]], *assets.encode(" ok")]
    deltas = _stream(IncrementalDetokenizer(assets.token_bytes), ids)
    assert "".join(deltas) == assets.decode(ids) == "\ufffd ok"
    assert deltas[0] == deltas[1] == ""


def test_trailing_incomplete_character_is_flushed_as_replacement(assets: ModelAssets) -> None:
    """At end of stream an incomplete character is emitted as U+FFFD, as the full decode does."""
    byte_token = {b[0]: i for i, b in enumerate(assets.token_bytes) if len(b) == 1}
    ids = [byte_token["語".encode()[0]]]
    det = IncrementalDetokenizer(assets.token_bytes)
    assert det.feed(ids) == ""
    assert det.flush() == assets.decode(ids) == "\ufffd"


def test_special_tokens_add_no_text(assets: ModelAssets) -> None:
    """Special tokens (<|im_end|>) decode to nothing, as with skip_special_tokens."""
    det = IncrementalDetokenizer(assets.token_bytes)
    assert det.feed([*assets.encode("Hi"), assets.eos_token_id]) == "Hi"


@pytest.mark.parametrize("bad", [-1, 49152, 10**9])
def test_ids_outside_the_vocabulary_are_invalid_arguments(assets: ModelAssets, bad: int) -> None:
    """An id outside the vocabulary is rejected with a message naming it."""
    det = IncrementalDetokenizer(assets.token_bytes)
    with pytest.raises(InvalidArgument, match=str(bad)):
        det.feed([1, bad])
