"""The postprocess pipeline for one stream: ids -> whole characters -> stop strings -> safety -> chunks.

Each stage only holds back what it must: the detokenizer an incomplete character, the stop matcher a
tail that may become a stop string, the safety layer what it has not yet checked, the chunker text up
to the next speakable boundary. Nothing reaches the client before every stage has released it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmmesh.postprocess.chunker import Chunker, ChunkingMode
from llmmesh.postprocess.detokenizer import IncrementalDetokenizer
from llmmesh.postprocess.textmatch import StopMatcher

__all__ = ["Finish", "Output", "Piece", "TextPipeline", "TextSafety"]


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    STOP_STRING = "stop_string"
    CONTENT_FILTER = "content_filter"
    CANCELLED = "cancelled"


class TextSafety(Protocol):
    """The safety layer of one stream: returns (checked text to release, blocked category or None)."""

    async def push(self, text: str, final: bool = False) -> tuple[str, str | None]: ...


@dataclass
class Piece:
    """One chunk to send: text, the ids received since the previous chunk, and whether speech may pause."""

    text: str
    ids: list[int]
    speakable: bool = True


@dataclass
class Output:
    """What one step produced: chunks (maybe none) and, when the stream ended, why."""

    pieces: list[Piece] = field(default_factory=list)
    finish: Finish | None = None
    matched_stop: str = ""
    category: str = ""
    # Ids not yet attached to a chunk when the stream ended.
    leftover_ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


class TextPipeline:
    def __init__(
        self,
        token_bytes: Sequence[bytes],
        stops: Sequence[str],
        safety: TextSafety,
        chunking: ChunkingMode = ChunkingMode.TOKEN,
    ) -> None:
        self._detok = IncrementalDetokenizer(token_bytes)
        self._stops = StopMatcher(stops)
        self._safety = safety
        self._chunker = Chunker(chunking)
        self._pending_ids: list[int] = []
        self.finished = False

    async def feed(self, ids: Sequence[int]) -> Output:
        if self.finished:
            return Output()
        self._pending_ids.extend(ids)
        return await self._step(self._detok.feed(ids), final=False)

    async def finish(self, reason: Finish) -> Output:
        """End of generation: release and check what was held back, flush the last chunk."""
        if self.finished:
            return Output()
        return await self._step(self._detok.flush(), final=True, reason=reason)

    async def _step(self, text: str, final: bool, reason: Finish | None = None) -> Output:
        released, stop = self._stops.push(text)
        if final and stop is None:
            released += self._stops.flush()
        ending = final or stop is not None
        safe, category = await self._safety.push(released, final=ending)
        if category is not None:
            self.finished = True
            return Output(finish=Finish.CONTENT_FILTER, category=category, leftover_ids=self._take_ids())
        chunks = self._chunker.push(safe)
        if ending:
            chunks += self._chunker.flush()
        pieces = [Piece(c, []) for c in chunks]
        if pieces:
            pieces[0].ids = self._take_ids()
        if stop is not None:
            self.finished = True
            return Output(pieces, Finish.STOP_STRING, matched_stop=stop, leftover_ids=self._take_ids())
        if final:
            self.finished = True
            return Output(pieces, reason, leftover_ids=self._take_ids())
        return Output(pieces)

    def _take_ids(self) -> list[int]:
        ids, self._pending_ids = self._pending_ids, []
        return ids
