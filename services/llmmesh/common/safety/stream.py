"""One response's pass through the layered policy: blocklist -> PII redaction -> classifier.

Each layer holds back only what it must and passes the rest on at once:
1. the blocklist holds a tail that could still become a blocked term (a few characters);
2. PII redaction holds the last word or number, which could still turn out to be an address;
3. the classifier holds the current unit (a sentence, or `window_chars` when no sentence ends) until
   it is complete and scored.
Text leaves `push` only after all three have passed it, so nothing unchecked is released; a block
ends the stream and releases nothing more. Every layer's hold is bounded by the policy's
`hold.max_chars`.

Clause-level release (the policy's `classifier.release: clause`, for a stream given a clause splitter:
requests with CLAUSE chunking): the classifier's unit is the clause, cut by the splitter where the
chunker would cut. Each clause is scored with the sentence so far in front of it (so the clause that
completes a sentence is scored as the whole sentence) and released as a speakable piece of its own; a
sentence that fails once complete ends the stream (CONTENT_FILTER) though its first clauses are out.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Protocol

from llmmesh.common.safety.blocklist import TermStream
from llmmesh.common.safety.classifier import Classifier
from llmmesh.common.safety.pii import PiiStream
from llmmesh.common.safety.policy import SafetyPolicy

__all__ = ["ClauseSplitter", "SafetyStream", "SafetyVerdict", "check_prompt", "split_units"]

# A sentence ends at . ! ? … (and closing quotes or brackets) followed by whitespace (so "3.14" and
# "e.g.x" do not end one, and a final "." waits for the next character), at CJK full stops at once,
# and at a line break.
# A unit ends after its sentence mark and the one whitespace that proves it (released with the unit, so a
# chunker downstream can see the boundary without waiting for the next sentence).
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s|[。！？]+[」』”’）)]*|\n")
# A clause piece that ends its sentence (the splitter cuts after the mark and any closers).
_ENDS_SENTENCE = re.compile(r"(?:[.!?…]+[\"'”’)\]»」』]*|[。！？]+[」』”’）)]*|\n)\s*$")


class ClauseSplitter(Protocol):
    """Cuts text into speakable clauses (postprocess's CLAUSE chunker)."""

    def push(self, text: str) -> list[str]: ...

    def flush(self) -> list[str]: ...

    @property
    def held_chars(self) -> int: ...


@dataclass(frozen=True)
class SafetyVerdict:
    """The result of one push."""

    # Checked text that may be released now (PII replaced by placeholders); "" when blocked.
    text: str
    # The category when the stream must end (content filter); None otherwise.
    blocked: str | None = None
    # Clause-level release: `text` as speakable pieces, each cut where the splitter cut (else empty).
    pieces: tuple[str, ...] = ()


def _unit_end(text: str, window: int) -> int | None:
    """Where the first complete unit of `text` ends, or None if it is not complete yet."""
    m = _SENTENCE_END.search(text, 0, window + 1)
    if m is not None and m.end() <= window:
        return m.end()
    if len(text) < window:
        return None
    # No sentence end within the window: cut at a space in its second half, so words stay whole.
    space = text.rfind(" ", window // 2, window)
    return space + 1 if space > 0 else window


def split_units(text: str, window: int) -> list[str]:
    """A whole text cut into the units the classifier scores (sentences, at most `window` characters)."""
    units = []
    while text:
        end = _unit_end(text, window) or len(text)
        units.append(text[:end])
        text = text[end:]
    return units


def _needs_score(unit: str) -> bool:
    return any(c.isalnum() for c in unit)


def _tail(text: str, limit: int) -> str:
    """The last `limit` characters of `text` at most, starting at a word where it is cut."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < len(cut) - 1 else cut


class SafetyStream:
    """Feeds one response's text through the policy, piece by piece. Use from one task at a time.

    `deadline` is the response's deadline on `time.monotonic()`'s clock (None: none): each classifier call
    is given the time that remains until it. `clauses`: the stream's clause splitter when its request wants
    clauses (CLAUSE chunking); with a classifier and a policy that releases clauses, `chunks` is then True
    and every verdict's `pieces` are the speakable pieces to send.
    """

    def __init__(
        self,
        policy: SafetyPolicy,
        classifier: Classifier | None = None,
        deadline: float | None = None,
        clauses: ClauseSplitter | None = None,
    ) -> None:
        self.policy = policy
        self._classifier = classifier if policy.classifier.enabled else None
        self._deadline = deadline
        self._terms: TermStream = policy.matcher.open(policy.max_hold_chars)
        self._pii: PiiStream = policy.redactor.open(policy.max_hold_chars)
        self._window = min(policy.classifier.window_chars, policy.max_hold_chars)
        self._unit = ""
        self._clauses = clauses if self._classifier is not None and policy.classifier.release == "clause" else None
        # Clause-level release: the released part of the current sentence (the next clause's context).
        self._sentence = ""
        self._busy = False
        self.blocked: str | None = None
        self.finished = False
        self.units_scored = 0

    @property
    def chunks(self) -> bool:
        """True when this stream releases clause by clause: each verdict's `pieces` are speakable chunks."""
        return self._clauses is not None

    @property
    def held_chars(self) -> int:
        """Characters pushed but not yet released (all layers)."""
        held = self._terms.held + self._pii.held + len(self._unit)
        return held + self._clauses.held_chars if self._clauses is not None else held

    @property
    def redacted(self) -> dict[str, int]:
        """How many e-mail addresses, phone and card numbers were replaced so far, by kind."""
        return dict(self._pii.redacted)

    async def push(self, text: str, final: bool = False) -> SafetyVerdict:
        """Checks a piece of text; with final=True, everything still held is checked and released.

        After the stream has ended (final, or blocked), pushes release nothing and repeat the verdict.
        A classifier failure raises (Unavailable, DeadlineExceeded) and ends the stream: unchecked text
        is never released. So does a cancellation while the classifier is awaited.
        """
        if self.finished:
            return SafetyVerdict("", self.blocked)
        if self._busy:
            raise RuntimeError("SafetyStream.push called again before the previous push returned")
        self._busy = True
        try:
            return await self._push(text, final)
        except BaseException:
            # Held text was taken out for scoring and never checked: the stream cannot go on.
            self._end()
            raise
        finally:
            self._busy = False

    async def _push(self, text: str, final: bool) -> SafetyVerdict:
        category = self._terms.scan(text)
        if category is None and final:
            category = self._terms.finish()
        if category is not None:
            return self._block(category)
        passed = self._pii.push(self._terms.release(final), final)
        if self._classifier is None:
            if final:
                self._end()
            return SafetyVerdict(passed)
        if self._clauses is not None:
            return await self._release_clauses(passed, final)
        self._unit += passed
        units = []
        while (end := _unit_end(self._unit, self._window)) is not None:
            units.append(self._unit[:end])
            self._unit = self._unit[end:]
        if final and self._unit:
            units.append(self._unit)
            self._unit = ""
        released = await self._score(units)
        if released is None:
            return self._block(self.policy.classifier.category)
        if final:
            self._end()
        return SafetyVerdict(released)

    async def _release_clauses(self, passed: str, final: bool) -> SafetyVerdict:
        assert self._clauses is not None
        pieces = self._clauses.push(passed)
        if final or self._clauses.held_chars >= self._window:
            # The end, or no clause boundary within the window (a bounded hold): what is held is one piece.
            pieces += self._clauses.flush()
        # Each piece is scored with the sentence so far in front of it: the last clause of a sentence is
        # scored as the whole sentence.
        scored: list[str] = []
        context = self._sentence
        for piece in pieces:
            context += piece
            if _needs_score(piece):
                scored.append(context)
            context = "" if _ENDS_SENTENCE.search(piece) else _tail(context, self._window)
        if scored and await self._unsafe(scored):
            return self._block(self.policy.classifier.category)
        self._sentence = context
        if final:
            self._end()
        return SafetyVerdict("".join(pieces), pieces=tuple(pieces))

    async def _unsafe(self, texts: list[str]) -> bool:
        assert self._classifier is not None
        left = None if self._deadline is None else self._deadline - time.monotonic()
        scores = await self._classifier.score(texts, left)
        self.units_scored += len(texts)
        return any(s >= self.policy.classifier.threshold for s in scores)

    async def _score(self, units: list[str]) -> str | None:
        """The units joined if all pass, None if one is unsafe."""
        scored = [u for u in units if _needs_score(u)]
        if scored and await self._unsafe(scored):
            return None
        return "".join(units)

    def _block(self, category: str) -> SafetyVerdict:
        self.blocked = category
        self._end()
        return SafetyVerdict("", category)

    def _end(self) -> None:
        self.finished = True
        self._unit = ""
        self._sentence = ""
        self._terms.close()

    def close(self) -> None:
        """Ends the stream early (cancel, barge-in): frees the matcher state; held text is dropped."""
        self._end()


async def check_prompt(
    policy: SafetyPolicy, text: str, classifier: Classifier | None = None, timeout: float | None = None
) -> str | None:
    """The category that blocks this prompt, or None: blocked terms, then (if enabled) the classifier,
    which gets `timeout` seconds at most (the request's remaining time; None: the classifier's own limit)."""
    category = policy.matcher.find(text)
    if category is not None:
        return category
    settings = policy.classifier
    if classifier is None or not settings.enabled or not settings.check_prompts:
        return None
    units = [u for u in split_units(text, settings.window_chars) if _needs_score(u)]
    if units and max(await classifier.score(units, timeout)) >= settings.threshold:
        return settings.category
    return None
