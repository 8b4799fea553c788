from __future__ import annotations

import pytest

from llmmesh.postprocess.chunker import Chunker, ChunkingMode


def _chunks(mode: ChunkingMode, text: str, step: int = 1, min_clause: int = 16) -> list[str]:
    c = Chunker(mode, min_clause_chars=min_clause)
    out: list[str] = []
    for i in range(0, len(text), step):
        out += c.push(text[i : i + step])
    return out + c.flush()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_sentences_cut_after_sentence_ends_whatever_the_delta_sizes(step: int) -> None:
    """Sentence chunks are the same whether text arrives a character or all at once."""
    text = "It rains. Does it? Yes! Fine"
    assert _chunks(ChunkingMode.SENTENCE, text, step) == ["It rains.", " Does it?", " Yes!", " Fine"]


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith met Mr. Jones at St. Mary's.",
        "Pi is about 3.14159 and e is 2.718 exactly.",
        "Wait... what happened next was odd.",
        "Use tools, e.g. a hammer, i.e. something heavy.",
        "J. R. R. Tolkien wrote it…and more.",
    ],
)
def test_abbreviations_decimals_and_ellipses_do_not_cut(text: str) -> None:
    """None of these inner periods ends a sentence: the text is one chunk."""
    assert _chunks(ChunkingMode.SENTENCE, text) == [text]


def test_cjk_sentence_and_clause_marks_cut_without_spaces() -> None:
    """。！？ end sentences and ，、； end clauses with no following space."""
    assert _chunks(ChunkingMode.SENTENCE, "東京は大きい。本当？はい！") == ["東京は大きい。", "本当？", "はい！"]
    assert _chunks(ChunkingMode.CLAUSE, "我们今天去公园，然后吃饭、看电影。", min_clause=3) == [
        "我们今天去公园，",
        "然后吃饭、",
        "看电影。",
    ]


def test_clauses_cut_at_punctuation_and_before_conjunctions_past_the_minimum() -> None:
    """Clause chunks end at a comma or before a conjunction, but never before the minimum length."""
    text = "Paris is the capital, and it is big but busy; people love it a lot because of the food."
    assert _chunks(ChunkingMode.CLAUSE, text) == [
        "Paris is the capital,",
        " and it is big but busy;",
        " people love it a lot",
        " because of the food.",
    ]
    assert _chunks(ChunkingMode.CLAUSE, "Yes, and no.") == ["Yes, and no."]


def test_a_mark_at_the_end_waits_for_the_next_character() -> None:
    """A trailing period is not judged until the next character arrives (it may be a decimal)."""
    c = Chunker(ChunkingMode.SENTENCE)
    assert c.push("It costs 3.") == []
    assert c.push("5 euros. Ok") == ["It costs 3.5 euros."]
    assert c.flush() == [" Ok"]


def test_a_clause_mark_after_a_word_cuts_without_waiting_for_the_next_token() -> None:
    """ "Paris," ends its clause as soon as the comma arrives; after a digit the comma waits ("3,5")."""
    c = Chunker(ChunkingMode.CLAUSE)
    assert c.push("The capital of France is Paris,") == ["The capital of France is Paris,"]
    assert c.push(" a city on the Seine;") == [" a city on the Seine;"]
    assert c.push(" it costs about 3,") == []
    assert c.push("5 euros a coffee, or more.") == [" it costs about 3,5 euros a coffee,"]
    assert c.flush() == [" or more."]


def test_token_mode_passes_deltas_through() -> None:
    """TOKEN mode returns each non-empty delta as it comes."""
    c = Chunker(ChunkingMode.TOKEN)
    assert c.push("Hel") == ["Hel"] and c.push("") == [] and c.flush() == []
