"""The postprocess pipeline for one stream: token ids -> whole characters -> stop strings -> blocklist."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmmesh.postprocess.detokenizer import IncrementalDetokenizer
from llmmesh.postprocess.textmatch import BlockedTerm, Blocklist, StopMatcher

__all__ = ["Finish", "Output", "TextPipeline"]


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    STOP_STRING = "stop_string"
    CONTENT_FILTER = "content_filter"
    CANCELLED = "cancelled"


@dataclass
class Output:
    """What to send after one step: text (maybe empty), the ids it accounts for, and the end if reached."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish: Finish | None = None
    matched_stop: str = ""
    category: str = ""


class TextPipeline:
    def __init__(self, token_bytes: Sequence[bytes], stops: Sequence[str], blocked: Sequence[BlockedTerm]) -> None:
        self._detok = IncrementalDetokenizer(token_bytes)
        self._stops = StopMatcher(stops)
        self._blocklist = Blocklist(blocked)
        self._pending_ids: list[int] = []
        self.finished = False

    def _take_ids(self) -> list[int]:
        ids, self._pending_ids = self._pending_ids, []
        return ids

    def feed(self, ids: Sequence[int]) -> Output:
        if self.finished:
            return Output()
        self._pending_ids.extend(ids)
        text = self._detok.feed(ids)
        return self._step(text, final=False)

    def finish(self, reason: Finish) -> Output:
        """End of generation: release what was held back for stop strings; check the last of it."""
        if self.finished:
            return Output()
        text = self._detok.flush()
        return self._step(text, final=True, reason=reason)

    def _step(self, text: str, final: bool, reason: Finish | None = None) -> Output:
        released, stop = self._stops.push(text)
        if final and stop is None:
            released += self._stops.flush()
        safe, category = self._blocklist.push(released, final=final or stop is not None)
        if category is not None:
            self.finished = True
            return Output("", self._take_ids(), Finish.CONTENT_FILTER, category=category)
        if stop is not None:
            self.finished = True
            return Output(safe, self._take_ids(), Finish.STOP_STRING, matched_stop=stop)
        if final:
            self.finished = True
            return Output(safe, self._take_ids(), reason)
        if safe:
            return Output(safe, self._take_ids())
        return Output()
