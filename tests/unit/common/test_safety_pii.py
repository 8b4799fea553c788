from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.common.safety.pii import PiiRedactor, luhn_valid

REDACTOR = PiiRedactor()


def _stream(pieces: list[str], max_hold: int = 256) -> list[str]:
    stream = REDACTOR.open(max_hold)
    return [stream.push(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write to john.doe+news@example.co.uk.", "Write to [EMAIL]."),
        ("Mail Jörg at jörg@beispiel.de, please", "Mail Jörg at [EMAIL], please"),
        ("Call +1 415 555 0100 now", "Call [PHONE] now"),
        ("Call (555) 123-4567.", "Call [PHONE]."),
        ("Tel. +49 30 12345678", "Tel. [PHONE]"),
        ("Appelez le 01 23 45 67 89", "Appelez le [PHONE]"),
        ("or +4930123456", "or [PHONE]"),
        ("Card 4111 1111 1111 1111 expires", "Card [CARD] expires"),
        ("Card 4111-1111-1111-1111", "Card [CARD]"),
        ("Amex 378282246310005.", "Amex [CARD]."),
        ("メールはjohn@example.comです", "メールは[EMAIL]です"),
        ("電話03-1234-5678まで", "電話[PHONE]まで"),
    ],
)
def test_pii_is_replaced_in_place(text: str, expected: str) -> None:
    """E-mail addresses, phone numbers and Luhn-valid card numbers become placeholders."""
    assert REDACTOR.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The number 4111 1111 1111 1112 fails the Luhn check.",
        "On 2025-11-22 at 10:30, pi is 3.14159265358979.",
        "The server at 192.168.100.200 answered.",
        "It costs $1,299.99 and weighs 12 kg; call 911.",
        "Dates like 22.11.2025 or 11/22/2025 are not phones.",
        "user@localhost is not an address with a domain",
        "ISBN 978-3-16-148410-0",
    ],
)
def test_ordinary_text_and_numbers_are_left_alone(text: str) -> None:
    """Invalid card numbers, dates, decimals, IPs, prices and short numbers are not redacted."""
    assert REDACTOR.redact(text) == text


def test_luhn() -> None:
    """The Luhn check accepts real test card numbers and rejects a changed digit."""
    assert luhn_valid("4111111111111111") and luhn_valid("5555555555554444") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


def test_an_address_split_into_tokens_is_redacted_and_never_leaks_a_piece() -> None:
    """Token by token, no piece of the address is released before it is known to be one."""
    pieces = ["Mail", " john", ".doe", "@", "exam", "ple", ".com", " or", " call", " 555", "-123", "-4567", "."]
    out = _stream([*pieces, ""])
    assert "".join(out) == "Mail [EMAIL] or call [PHONE]."
    for released in out:
        assert not any(fragment in released for fragment in ("john", "doe", "exam", "555", "4567"))


def test_the_last_word_is_held_only_until_the_next_character() -> None:
    """Ordinary text waits at most for the next piece: the word could still turn into an address."""
    stream = REDACTOR.open(256)
    assert stream.push("Hello wor") == "Hello "
    assert stream.push("ld, how") == "world, "
    assert stream.push(" are you?", final=True) == "how are you?"


def test_hold_is_bounded_and_a_complete_match_is_still_redacted() -> None:
    """A run longer than the bound is released; a complete address in it is redacted whole."""
    stream = REDACTOR.open(20)
    out = stream.push("x" * 30 + " a@b.com" + "y" * 25)
    assert len(out) >= 30
    assert stream.held <= 20
    stream = REDACTOR.open(16)
    out = stream.push("see longname@example.com") + stream.push("", final=True)
    assert out == "see [EMAIL]"


def test_kinds_can_be_turned_off() -> None:
    """A kind without a placeholder is not redacted; with none, text passes unheld."""
    assert PiiRedactor(email=None).redact("a@b.com 555-123-4567") == "a@b.com [PHONE]"
    off = PiiRedactor(None, None, None).open(256)
    assert off.push("a@b") == "a@b"


def test_redactions_are_counted_by_kind() -> None:
    """The stream counts what it replaced (for metrics)."""
    stream = REDACTOR.open(256)
    stream.push("a@b.com and x@y.org and 4111111111111111", final=True)
    assert stream.redacted == {"email": 2, "card": 1}


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    parts=st.lists(
        st.sampled_from(["Mail ", "john", ".", "doe", "@", "example", ".com", " ", "call ", "555", "-", "0100", ", "]),
        max_size=16,
    ),
    cuts=st.lists(st.integers(1, 4), min_size=1, max_size=40),
)
def test_streamed_redaction_equals_whole_text_redaction(parts: list[str], cuts: list[int]) -> None:
    """However the text is split, the released text equals redacting the whole text at once."""
    text = "".join(parts)
    pieces, at = [], 0
    for n in cuts:
        pieces.append(text[at : at + n])
        at += n
    pieces.append(text[at:])
    assert "".join(_stream(pieces)) == REDACTOR.redact(text)


def test_text_in_scripts_without_spaces_is_not_held_as_a_possible_address() -> None:
    """A Japanese sentence has no spaces, yet it is released at once: CJK is not address material."""
    stream = REDACTOR.open(256)
    assert stream.push("東京は日本の首都です。北京是中国的首都") == "東京は日本の首都です。北京是中国的首都"
