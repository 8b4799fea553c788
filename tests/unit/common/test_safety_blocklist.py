from __future__ import annotations

import gc
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.common.safety.blocklist import BlockedTerm, TermMatcher, fold

TERMS = [
    BlockedTerm("shit", "profanity", "en"),
    BlockedTerm("kill yourself", "violence", "en"),
    BlockedTerm("scheiße", "profanity", "de"),
    BlockedTerm("enculé", "profanity", "fr"),
    BlockedTerm("hijo de puta", "profanity", "es"),
    BlockedTerm("tue-toi", "violence", "fr"),
    BlockedTerm("死ね", "violence", "ja"),
]
MATCHER = TermMatcher(TERMS)


def _run(pieces: list[str], matcher: TermMatcher = MATCHER) -> tuple[list[str], str | None]:
    """Feeds pieces through a stream; returns what each push released and the block, if any."""
    stream = matcher.open(max_hold=256)
    released = []
    try:
        for i, piece in enumerate(pieces):
            final = i == len(pieces) - 1
            category = stream.scan(piece)
            if category is None and final:
                category = stream.finish()
            if category is not None:
                return released, category
            released.append(stream.release(final))
        return released, None
    finally:
        stream.close()


def test_folding_is_per_character() -> None:
    """Folding pieces one by one equals folding the whole text, accents, ß and ligatures included."""
    text = "Scheiße, ENCULÉ! ﬁne ｆｕｌｌ ’quote’ naïve"
    assert fold(text) == "scheisse, encule! fine full 'quote' naive"
    assert "".join(fold(c) for c in text) == fold(text)


@pytest.mark.parametrize(
    ("pieces", "category"),
    [
        (["this is sh", "it", " indeed"], "profanity"),
        (["SHIT"], "profanity"),
        (["Das ist Schei", "ße!"], "profanity"),
        (["Das ist SCHEISSE"], "profanity"),
        (["quel encule", " !"], "profanity"),
        (["eres un hijo", " de ", "puta"], "profanity"),
        (["go kill", "\n  your", "self"], "violence"),
        (["tue", "-", "toi"], "violence"),
        (["お前は死", "ね"], "violence"),
    ],
)
def test_terms_are_found_across_pieces_and_languages(pieces: list[str], category: str) -> None:
    """Case, accents and whitespace do not hide a term, however the text is split."""
    released, blocked = _run(pieces)
    assert blocked == category
    assert "".join(released).strip() in ("", "this is", "Das ist", "quel", "eres un", "go", "お前は")


@pytest.mark.parametrize("text", ["shitake mushrooms", "the bullshitting", "Scheißegal", "killer yourself", "ashit"])
def test_only_whole_words_match(text: str) -> None:
    """A term inside a longer word is not blocked, and the text is released whole."""
    released, blocked = _run([*text, ""])
    assert blocked is None
    assert "".join(released) == text


def test_a_possible_prefix_is_held_and_released_when_it_cannot_match() -> None:
    """'sh' waits for the next piece; once it becomes 'shy' it is released."""
    stream = MATCHER.open(max_hold=256)
    assert stream.scan("I am sh") is None
    assert stream.release() == "I am "
    assert stream.scan("y. ") is None
    assert stream.release() == "shy. "
    stream.close()


def test_text_that_cannot_start_a_term_is_released_at_once() -> None:
    """Nothing is held when the tail is not a term prefix at a word start."""
    stream = MATCHER.open(max_hold=256)
    stream.scan("Hello wor")
    assert stream.release() == "Hello wor"
    stream.close()


def test_a_complete_term_at_the_end_waits_for_the_next_character() -> None:
    """'shit' may still be 'shitake': held until the next piece (or the end) decides."""
    stream = MATCHER.open(max_hold=256)
    assert stream.scan("eat shit") is None
    assert stream.release() == "eat "
    assert stream.finish() == "profanity"


def test_hold_is_bounded() -> None:
    """The held tail never exceeds max_hold characters."""
    stream = MATCHER.open(max_hold=6)
    stream.scan("kill         ")
    stream.release()
    assert stream.held <= 6
    stream.close()


def test_an_empty_term_set_passes_everything() -> None:
    """With no terms there is no hyperscan database and nothing is held."""
    released, blocked = _run(["a", "b"], TermMatcher([]))
    assert (released, blocked) == (["a", "b"], None)


def test_find_checks_a_whole_text() -> None:
    """find() is the one-shot form used for prompts."""
    assert MATCHER.find("You are a hijo de puta.") == "profanity"
    assert MATCHER.find("Hola, ¿qué tal?") is None


# Reference for the property: whole-word matching on the folded text with Python's re.
_REF = [
    re.compile(r"(?<![a-z0-9_])shit(?![a-z0-9_])"),
    re.compile(r"(?<![a-z0-9_])kill[ \t\n\r\f\v]+yourself(?![a-z0-9_])"),
]
_WORDS = ["shit", "shi", "t", "kill", "your", "self", "yourself", " ", "  ", "\n", "a", "x", ".", "Sh", "IT", "é"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    words=st.lists(st.sampled_from(_WORDS), max_size=20),
    cuts=st.lists(st.integers(1, 5), min_size=1, max_size=30),
)
def test_streamed_matching_equals_whole_text_matching(words: list[str], cuts: list[int]) -> None:
    """For any split: blocked iff the whole text has a term; else everything is released unchanged;
    and what was released before a block never contains a whole term."""
    text = "".join(words)
    pieces, at = [], 0
    for n in cuts:
        if at >= len(text):
            break
        pieces.append(text[at : at + n])
        at += n
    pieces.append(text[at:])
    matcher = TermMatcher(TERMS[:2])
    released, blocked = _run(pieces, matcher)
    expected = any(p.search(fold(text)) for p in _REF)
    assert (blocked is not None) == expected
    if blocked is None:
        assert "".join(released) == text
    else:
        out = fold("".join(released))
        assert not any(p.search(out + " ") for p in _REF)


def test_streams_dropped_without_close_are_freed_safely() -> None:
    """A response cancelled mid-way drops its stream; hyperscan's state is freed and nothing crashes."""
    for _ in range(200):
        stream = MATCHER.open(max_hold=256)
        stream.scan("half a sentence about sh")
        del stream
    gc.collect()
    assert MATCHER.find("still works: shit") == "profanity"
