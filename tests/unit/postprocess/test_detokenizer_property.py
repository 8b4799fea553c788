"""Property: streaming detokenization over random sequences of SmolLM2's real vocabulary equals the
tokenizers library's own full decode, and never shows U+FFFD where the full decode does not."""

from __future__ import annotations

from functools import cache

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmmesh.common.model_assets import ModelAssets, load_model_assets
from llmmesh.postprocess.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"
# Real text whose characters span several tokens (emoji sequences, CJK, combining marks, Arabic):
# spliced into random ids, they put valid multi-byte characters between invalid byte runs.
SNIPPETS = ["👩‍👩‍👧‍👦", "👋🏽", "🇫🇷", "東京は日本の首都", "naïve x̃", "مرحبا", "½ — “”", "한국어"]


@cache
def _pools() -> tuple[int, list[int], list[int], list[int], list[list[int]]]:
    """Vocabulary size and the ids worth over-sampling: single bytes, fragments of characters, specials."""
    assets = load_model_assets()
    single = [i for i, b in enumerate(assets.token_bytes) if len(b) == 1]
    fragments = []
    for i, b in enumerate(assets.token_bytes):
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            fragments.append(i)  # not whole characters on its own: lead or continuation bytes of one
    snippets = [assets.encode(s) for s in SNIPPETS]
    return assets.vocab_size, single, fragments, sorted(assets.special_token_ids), snippets


@st.composite
def token_ids(draw: st.DrawFn) -> list[int]:
    vocab, single, fragments, special, snippets = _pools()
    # Uniform ids alone almost never produce split characters or invalid byte runs; mix in the ids that do.
    one = st.one_of(
        st.integers(0, vocab - 1),
        st.sampled_from(single),
        st.sampled_from(fragments),
        st.sampled_from(special),
    )
    segments = draw(st.lists(st.one_of(one.map(lambda i: [i]), st.sampled_from(snippets)), max_size=40))
    return [i for segment in segments for i in segment]


@settings(
    max_examples=500,
    deadline=None,
    # Same examples on every run: CI is reproducible, and a failure prints its example.
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ids=token_ids(), groups=st.lists(st.integers(1, 5), max_size=48))
def test_streamed_deltas_equal_the_full_decode(assets: ModelAssets, ids: list[int], groups: list[int]) -> None:
    """Fed in random-size groups, the deltas join to assets.decode(ids); every U+FFFD in a delta is at a
    position where the full decode has one; and what is out after each group is a prefix of the full
    decode (nothing is ever taken back)."""
    full = assets.decode(ids)
    det = IncrementalDetokenizer(assets.token_bytes)
    deltas, at = [], 0
    sizes = iter(groups)
    while at < len(ids):
        n = next(sizes, 1)
        delta = det.feed(ids[at : at + n])
        if not delta and any(assets.token_bytes[i] for i in ids[at : at + n]):
            event("bytes held back for a character not yet complete")
        deltas.append(delta)
        at += n
        assert full.startswith("".join(deltas))
    deltas.append(det.flush())
    assert "".join(deltas) == full
    event("full decode has U+FFFD" if REPLACEMENT in full else "full decode is valid UTF-8")
    offset = 0
    for delta in deltas:
        for k, ch in enumerate(delta):
            if ch == REPLACEMENT:
                assert full[offset + k] == REPLACEMENT
        offset += len(delta)


def test_pools_cover_the_interesting_ids() -> None:
    """The strategy really draws single-byte, partial-character and special tokens from this vocabulary."""
    vocab, single, fragments, special, snippets = _pools()
    assert vocab == 49152
    assert len(single) > 200  # byte-level BPE: one token per byte value that occurs in UTF-8 text
    assert len(fragments) > 100 and len(special) == 17
    assert all(len(ids) > 1 for ids in snippets)
