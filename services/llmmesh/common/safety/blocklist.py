"""Layer 1: blocked terms, matched by hyperscan in streaming mode across chunk boundaries.

Text is folded before matching (compatibility decomposition, accents dropped, case folded, typographic
quotes made plain), so "Scheiße", "SCHEISSE" and "scheisse" are one term, as are "pédé" and "pede", and
fullwidth letters fold to ASCII. Folding is per character, so folding the pieces one by one gives the
same stream as folding the whole text: hyperscan's stream state carries partial matches over the
boundaries, whatever the chunking.

Word boundaries are hyperscan's `\\b`, which it supports only without Unicode properties (UCP), i.e. on
ASCII word characters. Terms in the scripts the policy covers (Latin: en, de, fr, es, ...) fold to ASCII
at their edges, so `\\b` applies there; a term whose edge is not an ASCII word character (CJK, say) gets
no boundary at that edge and matches as a substring, which is what those scripts need anyway.

hyperscan reports a match only once it has seen the character after it (the trailing `\\b`), and says
nothing about partial matches. So the stream also holds back the shortest tail of the text that could
still become a match (a prefix of some term starting at a word start), and releases it as soon as it
cannot. Nothing that might be part of a blocked term leaves this layer before hyperscan has decided.

Not thread-safe: a compiled term set has one hyperscan scratch; use it from one thread (the event loop).
Two threads scanning at once get hyperscan's "scratch in use" error, not corruption.
"""

from __future__ import annotations

import contextlib
import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hyperscan

__all__ = ["BlockedTerm", "TermMatcher", "TermStream", "fold"]

# Apostrophes and quotes a model writes typographically; NFKD leaves them as they are.
_PUNCTUATION = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
# hyperscan's `\s` without UCP; folding maps the Unicode spaces to " " (NFKD).
_WHITESPACE = re.compile(r"[ \t\n\v\f\r]+")


@functools.lru_cache(maxsize=8192)
def _fold_char(char: str) -> str:
    decomposed = unicodedata.normalize("NFKD", char)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().translate(_PUNCTUATION)


def fold(text: str) -> str:
    """The matching form of a text; per character, so fold(a) + fold(b) == fold(a + b)."""
    if text.isascii():
        return text.lower()
    return "".join(map(_fold_char, text))


def _is_word(char: str) -> bool:
    """hyperscan's `\\w` without UCP."""
    return char.isascii() and (char.isalnum() or char == "_")


@dataclass(frozen=True)
class BlockedTerm:
    term: str
    category: str
    language: str = ""


def _pattern(folded: str) -> bytes:
    words = folded.split()
    body = r"\s+".join("".join(c if c.isalnum() or not c.isascii() else "\\" + c for c in w) for w in words)
    head = r"\b" if _is_word(folded[0]) else ""
    tail = r"\b" if _is_word(folded[-1]) else ""
    return (head + body + tail).encode()


class TermMatcher:
    """A compiled set of blocked terms (one hyperscan database in stream mode), shared by all streams."""

    def __init__(self, terms: Sequence[BlockedTerm]) -> None:
        # Folded and with whitespace runs made one space: the form the hold-back compares with.
        by_form: dict[str, str] = {}
        for t in terms:
            form = " ".join(fold(t.term).split())
            if form:
                by_form.setdefault(form, t.category)
        self.forms = tuple(by_form)
        self.categories = tuple(by_form.values())
        self.longest = max(map(len, self.forms), default=0)
        # Every prefix of every term, each marked with whether the term starts with a word character
        # (then a match can only start at a word start).
        self._prefixes: dict[str, bool] = {}
        for form in self.forms:
            needs_word_start = _is_word(form[0])
            for k in range(1, len(form) + 1):
                prefix = form[:k]
                self._prefixes[prefix] = self._prefixes.get(prefix, True) and needs_word_start
        self.database: Any = None
        if self.forms:
            self.database = hyperscan.Database(mode=hyperscan.HS_MODE_STREAM)
            try:
                self.database.compile(
                    expressions=[_pattern(f) for f in self.forms],
                    ids=list(range(len(self.forms))),
                    elements=len(self.forms),
                    flags=[hyperscan.HS_FLAG_UTF8] * len(self.forms),
                )
            except hyperscan.error as exc:
                raise ValueError(f"blocklist: hyperscan cannot compile the terms: {exc}") from None

    def open(self, max_hold: int) -> TermStream:
        return TermStream(self, max_hold)

    def prefix_rule(self, folded_tail: str) -> bool | None:
        """None: not a prefix of any term; else whether it must start at a word start to be one."""
        return self._prefixes.get(folded_tail)

    def find(self, text: str) -> str | None:
        """The category of the first blocked term in a whole text, or None."""
        stream = self.open(max_hold=len(text) + 1)
        try:
            stream.scan(text)
            return stream.finish()
        finally:
            stream.close()


class TermStream:
    """One response's pass through the term set: scan each piece, release what cannot be a match."""

    def __init__(self, matcher: TermMatcher, max_hold: int) -> None:
        self._matcher = matcher  # hyperscan's stream borrows the database: keep it alive through us
        self._max_hold = max_hold
        self._held = ""
        self._last_folded = " "  # what preceded the held text, folded (a start of text is a word start)
        self.category: str | None = None
        self._hs: Any = None
        if matcher.database is not None:
            # hyperscan borrows the callback without a reference of its own: keep the bound method alive
            # here for as long as the stream lives, or a match calls freed memory (segfault).
            self._on_match_ref = self._on_match
            # Exactly as `with db.stream(...) as s` does it: the extension's __enter__ returns a borrowed
            # reference that balances the extra one `stream()` hands out. Calling `hyperscan.Stream(...)`
            # and `__enter__` separately frees the stream under our feet.
            self._hs = matcher.database.stream(match_event_handler=self._on_match_ref).__enter__()

    def _on_match(self, pattern_id: int, _start: int, _end: int, _flags: int, _context: object) -> None:
        if self.category is None:
            self.category = self._matcher.categories[pattern_id]

    def scan(self, text: str) -> str | None:
        """Feeds a piece of text; returns the category of a blocked term completed by it, if any."""
        self._held += text
        if self._hs is not None and text:
            self._hs.scan(fold(text).encode("utf-8", "replace"))  # HS_FLAG_UTF8 needs valid UTF-8
        return self.category

    def finish(self) -> str | None:
        """End of text: a term at the very end matches now (its trailing boundary is the end)."""
        self.close()
        return self.category

    def close(self) -> None:
        hs, self._hs = self._hs, None
        if hs is not None:
            hs.close()

    def __del__(self) -> None:
        # A stream dropped without close (a cancelled response) must still free hyperscan's stream state.
        with contextlib.suppress(Exception):
            self.close()

    def release(self, final: bool = False) -> str:
        """Takes the text that can no longer be part of a blocked term (all of it when final)."""
        buf = self._held
        keep = 0 if final else self._tail_to_hold(buf)
        keep = min(keep, self._max_hold)
        released = buf[: len(buf) - keep]
        self._held = buf[len(buf) - keep :]
        if released:
            folded = fold(released)
            if folded:
                self._last_folded = folded[-1]
        return released

    @property
    def held(self) -> int:
        return len(self._held)

    def _tail_to_hold(self, buf: str) -> int:
        if not buf or not self._matcher.forms:
            return 0
        # Fold each character once; prev[i] is the folded character just before buf[i].
        pieces = [fold(c) for c in buf]
        prev: list[str] = []
        last = self._last_folded
        for piece in pieces:
            prev.append(last)
            if piece:
                last = piece[-1]
        keep = 0
        tail = ""
        lower = max(0, len(buf) - self._max_hold)
        for i in range(len(buf) - 1, lower - 1, -1):
            tail = pieces[i] + tail
            form = _WHITESPACE.sub(" ", tail)
            if len(form) > self._matcher.longest:
                break  # growing to the left never shortens it: no earlier start can be a prefix
            rule = self._matcher.prefix_rule(form)
            if rule is None:
                continue
            if rule and _is_word(prev[i]):
                continue  # inside a word: a term with a leading boundary cannot start here
            keep = len(buf) - i
        return keep
