from __future__ import annotations

from llmmesh.postprocess.textmatch import BlockedTerm, Blocklist, StopMatcher


def _push_all(m: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        text, stop = m.push(piece)
        out.append(text)
        if stop:
            return "".join(out), stop
    out.append(m.flush())
    return "".join(out), None


def test_stop_string_split_across_pieces_is_found_and_not_released() -> None:
    """A stop string arriving in three pieces ends the text right before it."""
    m = StopMatcher(["STOP"])
    assert m.push("Hello S") == ("Hello ", None)
    assert m.push("T") == ("", None)
    assert m.push("OP and more") == ("", "STOP")


def test_partial_match_is_released_once_it_cannot_match() -> None:
    """Text held back as a possible stop string is released when the next piece rules it out."""
    m = StopMatcher(["</answer>"])
    assert m.push("a </an") == ("a ", None)
    assert m.push("swers") == ("</answers", None)


def test_earliest_of_several_stop_strings_wins() -> None:
    """With several stop strings the one that starts first ends the text."""
    assert _push_all(StopMatcher(["world", "lo w"]), ["hel", "lo wor", "ld"]) == ("hel", "lo w")


def test_held_text_is_released_at_end_of_stream() -> None:
    """A tail held back as a possible match is released when the stream ends without it."""
    assert _push_all(StopMatcher(["\n\nUser:"]), ["Answer.", "\n\nUs"]) == ("Answer.\n\nUs", None)


def test_no_stop_strings_passes_text_through() -> None:
    """Without stop strings nothing is held back."""
    assert StopMatcher([]).push("abc") == ("abc", None)


def _blocklist(*terms: str) -> Blocklist:
    return Blocklist([BlockedTerm(t, "test") for t in terms])


def test_blocked_word_split_across_pieces_is_caught_before_release() -> None:
    """A blocked word arriving in two pieces is never released, even partly."""
    b = _blocklist("darn")
    assert b.push("oh da") == ("oh ", None)
    assert b.push("rn it") == ("", "test")


def test_blocked_match_is_case_insensitive_and_whole_word() -> None:
    """Matching ignores case but not word boundaries: a longer word containing the term passes."""
    b = _blocklist("ass")
    assert b.push("an assistant ", final=False) == ("an assistant ", None)
    assert _blocklist("ass").push("Ass!", final=False) == ("", "test")


def test_term_at_the_end_waits_for_the_next_character() -> None:
    """A term at the very end may grow into an allowed word, so it is held, then judged."""
    b = _blocklist("ass")
    assert b.push("the ass") == ("the ", None)
    assert b.push("et is here") == ("asset is here", None)


def test_term_at_end_of_stream_is_blocked() -> None:
    """At the end of the stream a held term is judged final and blocks."""
    b = _blocklist("berlin")
    assert b.push("is Berlin") == ("is ", None)
    assert b.push("", final=True) == ("", "test")


def test_multi_word_terms_span_pieces() -> None:
    """A term of several words is caught across pieces."""
    b = _blocklist("kill yourself")
    assert b.push("go kill ") == ("go ", None)
    assert b.push("yourself now")[1] == "test"


def test_empty_blocklist_passes_everything() -> None:
    """Without terms nothing is held."""
    assert _blocklist().push("anything") == ("anything", None)
