"""Matching on streamed text: stop strings and blocked terms, across token boundaries.

Both hold back the shortest tail of the text that could still become a match and release it as soon
as it cannot, so nothing that might be (the start of) a stop string or a blocked term reaches the
client, and nothing else waits longer than it must.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BlockedTerm", "Blocklist", "StopMatcher"]


class StopMatcher:
    """Finds the first of several stop strings in a text that arrives piece by piece."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to release, matched stop string or None). After a match, stop pushing."""
        if not self._stops:
            return text, None
        buf = self._held + text
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self._held = ""
            return buf[: best[0]], best[1]
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if stop.startswith(buf[-k:]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """At end of stream the held tail did not become a stop string: release it."""
        held, self._held = self._held, ""
        return held


@dataclass(frozen=True)
class BlockedTerm:
    term: str
    category: str


class Blocklist:
    """Case-insensitive whole-word matching of blocked terms (a term may span several words)."""

    def __init__(self, terms: Iterable[BlockedTerm]) -> None:
        self._terms = {t.term.casefold(): t.category for t in terms if t.term.strip()}
        alternatives = "|".join(re.escape(t) for t in sorted(self._terms, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self._terms else None
        self._held = ""

    @property
    def empty(self) -> bool:
        return self._pattern is None

    def push(self, text: str, final: bool = False) -> tuple[str, str | None]:
        """Returns (text safe to release, blocked category or None). A block ends the stream."""
        if self._pattern is None:
            return text, None
        buf = self._held + text
        for match in self._pattern.finditer(buf):
            # A match at the very end may still grow into a longer word ("ass" -> "assistant").
            if match.end() < len(buf) or final:
                self._held = ""
                return "", self._terms.get(match.group(0).casefold(), "blocked")
        keep = 0 if final else self._tail_to_hold(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def _tail_to_hold(self, buf: str) -> int:
        folded = buf.casefold()
        if len(folded) != len(buf):  # casefold changed lengths (ß -> ss): hold conservatively
            folded = buf.lower()
        longest = max(map(len, self._terms))
        for k in range(min(longest, len(buf)), 0, -1):
            start = len(buf) - k
            if start > 0 and buf[start - 1].isalnum() and buf[start].isalnum():
                continue  # not at a word start
            tail = folded[start:]
            if any(term.startswith(tail) for term in self._terms):
                return k
        return 0
