from __future__ import annotations

from llmmesh.postprocess.textmatch import StopMatcher


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
