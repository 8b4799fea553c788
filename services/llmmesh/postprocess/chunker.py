"""Speakable chunks for voice: cut released text where a speaker would pause.

TOKEN passes every delta through. SENTENCE cuts after a sentence end (. ! ? and 。！？), CLAUSE also after
clause punctuation (, ; : — and ，、；：) and before a conjunction, once the chunk has a minimum length.
Abbreviations ("Dr.", "e.g."), decimals ("3.14", "3,5") and ellipses ("...", "…") never cut. A mark is
judged only once the next character is known (".5" vs ". "), so the last character or two may wait for
the next delta, except a clause mark right after a letter ("Paris,"), which ends its clause at once (voice
hears the clause a token earlier); at the end of the stream everything left is one final chunk.
"""

from __future__ import annotations

import enum
import re

__all__ = ["Chunker", "ChunkingMode"]


class ChunkingMode(enum.Enum):
    TOKEN = "token"
    CLAUSE = "clause"
    SENTENCE = "sentence"


_SENTENCE_END = ".!?"
_CJK_SENTENCE_END = "。！？!?"
_CLAUSE_MARK = ",;:—–"
_CJK_CLAUSE_MARK = "，、；：,;"
_CLOSERS = "\"'”’)]»」』"
# Words after which a period does not end a sentence (case-insensitive, without the period).
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "cf",
        "approx",
        "no",
        "fig",
        "vol",
        "ca",
        "inc",
        "ltd",
        "co",
        "corp",
        "mt",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "u.s",
        "u.k",
        "a.m",
        "p.m",
        "ph.d",
    ]
)
_CONJUNCTIONS = re.compile(r"\s(?=(?:and|but|or|so|because|although|though|while|whereas|yet|then)\s)", re.IGNORECASE)


class Chunker:
    def __init__(self, mode: ChunkingMode, min_clause_chars: int = 16) -> None:
        self._mode = mode
        self._min_clause = min_clause_chars
        self._pending = ""

    @property
    def mode(self) -> ChunkingMode:
        return self._mode

    @property
    def held_chars(self) -> int:
        """Characters waiting for a speakable boundary."""
        return len(self._pending)

    def push(self, text: str) -> list[str]:
        """Complete chunks now known; each ends at a speakable boundary."""
        if self._mode is ChunkingMode.TOKEN:
            return [text] if text else []
        self._pending += text
        chunks: list[str] = []
        while True:
            cut = self._next_cut(self._pending)
            if cut is None:
                return chunks
            chunks.append(self._pending[:cut])
            self._pending = self._pending[cut:]

    def flush(self) -> list[str]:
        """End of stream: whatever is left is the last chunk."""
        rest, self._pending = self._pending, ""
        return [rest] if rest else []

    def _next_cut(self, s: str) -> int | None:
        """Index just after the first boundary in `s` whose following character is known, or None."""
        clause = self._mode is ChunkingMode.CLAUSE
        for i, ch in enumerate(s):
            nxt = s[i + 1] if i + 1 < len(s) else None
            if ch in _CJK_SENTENCE_END and not _is_ascii(ch):
                return _after_closers(s, i + 1)
            if ch in _SENTENCE_END:
                if nxt is None:
                    return None  # "3." may become "3.5", "etc." may go on: wait for the next character
                if self._sentence_end(s, i, nxt):
                    return _after_closers(s, i + 1)
                continue
            if not clause or i + 1 < self._min_clause:
                continue
            if ch in _CJK_CLAUSE_MARK and not _is_ascii(ch):
                return i + 1
            if ch in _CLAUSE_MARK:
                if nxt is None:
                    # After a word the mark ends its clause whatever comes next: cut now, a token earlier
                    # than waiting for the space. After a digit it may be a decimal or a time ("3,5", "10:30").
                    return i + 1 if i > 0 and s[i - 1].isalpha() else None
                if nxt.isspace():
                    return i + 1
        if clause:
            for m in _CONJUNCTIONS.finditer(s):
                if m.start() >= self._min_clause:
                    return m.start()
        return None

    @staticmethod
    def _sentence_end(s: str, i: int, nxt: str) -> bool:
        ch = s[i]
        if not (nxt.isspace() or nxt in _CLOSERS):
            return False  # "3.14", "e.g.x", "..." continuing
        if ch == ".":
            if i > 0 and s[i - 1] == ".":
                return False  # an ellipsis
            word = re.search(r"([\w.]+)$", s[:i])
            if word and (
                word.group(1).lower() in _ABBREVIATIONS or (len(word.group(1)) == 1 and word.group(1).isupper())
            ):
                return False  # "Dr.", "e.g.", an initial "J."
        return True


def _is_ascii(ch: str) -> bool:
    return ord(ch) < 128


def _after_closers(s: str, j: int) -> int | None:
    """Extend a cut past closing quotes/brackets; None when the text ends there (a closer may follow)."""
    while j < len(s) and s[j] in _CLOSERS:
        j += 1
    return j
