"""Layer 2: personal data (e-mail addresses, phone numbers, payment card numbers) replaced in place.

Streamed text is redacted before it leaves the stream, so an address that arrives over several tokens
("john", ".doe", "@", "example", ".com") must not leak its first pieces: the stream holds back the tail
that could still be part of one (the last run of characters an address or a number can contain) and
releases it once the next character shows it is complete or was never one. The hold is bounded; text
held longer than that is released, with any complete match in it redacted.

Card numbers are redacted only when their digits pass the Luhn check. Phone numbers are recognised by
shape (separated digit groups, an optional +country code and (area) code, 7 to 15 digits); ISO dates,
dotted IPv4 addresses and decimals are not phone numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PiiRedactor", "PiiStream", "luhn_valid"]

# Scripts written without spaces (CJK ideographs, kana, hangul, fullwidth forms) count as word
# characters for `\w`, but no address is written in them. Treating them as separators keeps a Japanese
# answer from being held as one long "possible address", and finds "john@example.com" or a phone
# number written right after a CJK word.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_W = rf"[^\W{_CJK}]"  # a word character that is not CJK
_LETTER = rf"[^\W\d_{_CJK}]"
_ADDR = rf"(?:{_W}|[.%+-])"  # a character of an address (local part or domain)

_EMAIL = re.compile(
    rf"(?<!{_W})(?<![.%+-]){_ADDR}+@(?:{_W}|-)+(?:\.(?:{_W}|-)+)*\.{_LETTER}{{2,}}(?!{_W}|-|\.(?:{_W}|-))"
)
_CARD = re.compile(rf"(?<!{_W})(?<![+.,/-])\d(?:[ -]?\d){{12,18}}(?!{_W}|[.,/-]\d)")
_PHONE = re.compile(
    rf"(?<!{_W})(?<![+.,/-])"
    r"(?:"
    r"\+\d{7,15}"  # +4930123456
    r"|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,8}(?:[ .-]\d{2,8}){1,5}"  # +1 415 555 0100, 030 1234567
    r"|(?:\+\d{1,3}[ .-]?)?\(\d{1,5}\)[ .-]?\d{3,10}"  # (555) 1234567
    r")"
    rf"(?!{_W}|[.,/-]\d)"
)
_NOT_PHONE = (
    re.compile(r"\d{4}-\d{1,2}-\d{1,2}"),  # ISO date
    re.compile(r"\d{1,2}[./-]\d{1,2}[./-]\d{2,4}"),  # 22.11.2025, 11/22/25
    re.compile(r"\d{1,3}(?:\.\d{1,3}){3}"),  # IPv4
)
# Characters an e-mail address can contain, and those a phone or card number can.
_EMAIL_TAIL = re.compile(rf"(?:{_ADDR}|@)+\Z")
_NUMBER_TAIL = re.compile(r"[\d+(][\d+() .-]*\Z")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


@dataclass(frozen=True)
class PiiRedactor:
    """Which kinds are redacted, and their placeholders."""

    email: str | None = "[EMAIL]"
    phone: str | None = "[PHONE]"
    card: str | None = "[CARD]"

    @property
    def enabled(self) -> bool:
        return any((self.email, self.phone, self.card))

    def placeholder(self, kind: str) -> str:
        return getattr(self, kind) or ""

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind), kind one of email, card, phone; e-mail wins, then cards."""
        found: list[tuple[int, int, str]] = []

        def free(start: int, end: int) -> bool:
            return all(end <= s or start >= e for s, e, _ in found)

        if self.email:
            found += [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
        if self.card:
            for m in _CARD.finditer(text):
                if free(m.start(), m.end()) and luhn_valid(_digits(m.group())):
                    found.append((m.start(), m.end(), "card"))
        if self.phone:
            for m in _PHONE.finditer(text):
                value = m.group()
                if not 7 <= len(_digits(value)) <= 15 or any(p.fullmatch(value) for p in _NOT_PHONE):
                    continue
                if free(m.start(), m.end()):
                    found.append((m.start(), m.end(), "phone"))
        return sorted(found)

    def redact(self, text: str) -> str:
        return _apply(text, self.spans(text), self)

    def open(self, max_hold: int) -> PiiStream:
        return PiiStream(self, max_hold)


def _apply(text: str, spans: list[tuple[int, int, str]], redactor: PiiRedactor) -> str:
    out, at = [], 0
    for start, end, kind in spans:
        out += [text[at:start], redactor.placeholder(kind)]
        at = end
    out.append(text[at:])
    return "".join(out)


class PiiStream:
    def __init__(self, redactor: PiiRedactor, max_hold: int) -> None:
        self._redactor = redactor
        self._max_hold = max_hold
        self._held = ""
        self._before = ""  # the last released character: the context a match's lookbehind needs
        self.redacted: dict[str, int] = {}  # kind -> count, for metrics

    @property
    def held(self) -> int:
        return len(self._held)

    def push(self, text: str, final: bool = False) -> str:
        """Redacted text that can be released now."""
        if not self._redactor.enabled:
            return text
        buf = self._held + text
        if not buf:
            return ""
        cut = len(buf) if final else self._hold_from(buf)
        ctx = self._before
        spans = [(s - len(ctx), e - len(ctx), k) for s, e, k in self._redactor.spans(ctx + buf) if s >= len(ctx)]
        forced = len(buf) - cut > self._max_hold
        if forced:
            cut = len(buf) - self._max_hold
        for start, end, _ in spans:
            if start < cut < end:
                # A match that straddles the cut: when the hold ran out, redact all of it (it is complete
                # in what we have); otherwise keep it whole, it may still grow.
                cut = end if forced else start
        done = [s for s in spans if s[1] <= cut]
        for _, _, kind in done:
            self.redacted[kind] = self.redacted.get(kind, 0) + 1
        self._held = buf[cut:]
        if cut:
            self._before = buf[cut - 1]
        return _apply(buf[:cut], done, self._redactor)

    def _hold_from(self, buf: str) -> int:
        cut = len(buf)
        if self._redactor.email and (m := _EMAIL_TAIL.search(buf)):
            cut = min(cut, m.start())
        if (self._redactor.phone or self._redactor.card) and (m := _NUMBER_TAIL.search(buf)):
            cut = min(cut, m.start())
        return cut
