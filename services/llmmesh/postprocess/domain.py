"""The postprocess pipeline for one stream: ids -> whole characters -> stop strings -> safety -> chunks.

Each stage only holds back what it must: the detokenizer an incomplete character, the stop matcher a
tail that may become a stop string, the safety layer what it has not yet checked, the chunker text up
to the next speakable boundary. Nothing reaches the client before every stage has released it. A safety
layer that releases clause by clause (voice) cuts the chunks itself: the chunker then has nothing to do.

A text pipeline (no vocabulary: a model served by an OpenAI-compatible endpoint) takes text instead of
ids (`feed_text`) into the same stop strings, safety and chunks; its pieces carry no ids. Each text
message counts as one unit where ids are counted (a stop string ends the answer with the message that
completed it; a filter keeps the messages wholly delivered), and the answer's token count is the
endpoint's own (End.completion_tokens) when the stream ends; ended early by a stop string or a filter,
before the endpoint has reported any count, it is the number of text messages counted so far (llama.cpp,
vLLM and TGI send one token per message, so it is the token count there; an estimate elsewhere).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmmesh.common.errors import InvalidArgument
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
    """The safety layer of one stream: returns (checked text to release, in pieces; blocked category or None)."""

    async def push(self, text: str, final: bool = False) -> tuple[list[str], str | None]: ...

    @property
    def chunks(self) -> bool:
        """True when the released pieces are the speakable chunks themselves (clause-level release)."""
        ...

    @property
    def held_chars(self) -> int:
        """Characters pushed but not yet released."""
        ...


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
    # When the stream ended: the tokens of the answer (see TextPipeline.completion_tokens).
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


class TextPipeline:
    """One stream's text work. Ids are processed one at a time, whatever their batching: what is
    released, where a stop string or a filter ends the answer, and the answer's token count are the same
    on every run of a deterministic generation (a consumer that lags receives ids in batches)."""

    def __init__(
        self,
        token_bytes: Sequence[bytes] | None,
        stops: Sequence[str],
        safety: TextSafety,
        chunking: ChunkingMode = ChunkingMode.TOKEN,
    ) -> None:
        # None: a text pipeline (the model's backend sends text; there is no vocabulary).
        self._token_bytes = token_bytes
        self._detok = IncrementalDetokenizer(token_bytes) if token_bytes is not None else None
        self._stops = StopMatcher(stops)
        self._safety = safety
        self._chunker = Chunker(chunking)
        self._pending_ids: list[int] = []
        # Bytes of text after each id received (ends[k] = bytes of ids 0..k), and the text the stop
        # matcher released, in order: the answer's token count is read off them at its end.
        self._ends: list[int] = []
        self._released: list[str] = []
        self._released_chars = 0
        self._reported_tokens = 0
        self.finished = False

    @property
    def streams_text(self) -> bool:
        return self._detok is None

    async def feed_text(self, text: str) -> Output:
        """New text from a model that sends text: one unit of the answer's count (see the module's doc)."""
        if self._detok is not None:
            raise InvalidArgument("text", "this model streams token ids: send tokens, not text")
        if self.finished:
            return Output()
        self._ends.append((self._ends[-1] if self._ends else 0) + len(text.encode()))
        return await self._step(text, final=False)

    async def feed(self, ids: Sequence[int]) -> Output:
        if self._detok is None or self._token_bytes is None:
            raise InvalidArgument("tokens", "this model streams text (an OpenAI-compatible endpoint): send text")
        if self.finished:
            return Output()
        texts = self._detok.feed_each(ids)  # checks every id first
        out = Output()
        end = self._ends[-1] if self._ends else 0
        for k, (i, text) in enumerate(zip(ids, texts, strict=True)):
            self._pending_ids.append(i)
            end += len(self._token_bytes[i])
            self._ends.append(end)
            step = await self._step(text, final=False)
            out.pieces += step.pieces
            if step.finish is not None:
                step.pieces = out.pieces
                step.leftover_ids += ids[k + 1 :]
                out = step
                break
        if self._chunker.mode is ChunkingMode.TOKEN and len(out.pieces) > 1:
            # Every delta is a chunk in TOKEN mode: what one batch released goes out as one chunk.
            out.pieces = [Piece("".join(p.text for p in out.pieces), [i for p in out.pieces for i in p.ids])]
        return out

    async def finish(self, reason: Finish, completion_tokens: int = 0) -> Output:
        """End of generation: release and check what was held back, flush the last chunk. `completion_tokens`:
        the endpoint's count, for a text pipeline (a token pipeline counts its ids)."""
        if self.finished:
            return Output()
        self._reported_tokens = completion_tokens
        return await self._step(self._detok.flush() if self._detok is not None else "", final=True, reason=reason)

    def _tokens_through(self, text_bytes: int) -> int:
        """The fewest ids whose bytes cover `text_bytes` bytes of text."""
        return min(bisect.bisect_left(self._ends, text_bytes) + 1, len(self._ends)) if text_bytes else 0

    def _tokens_within(self, text_bytes: int) -> int:
        """The ids whose bytes lie wholly within the first `text_bytes` bytes of text."""
        return bisect.bisect_right(self._ends, text_bytes)

    def _released_bytes(self, chars: int | None = None) -> int:
        return len("".join(self._released)[:chars].encode())

    async def _step(self, text: str, final: bool, reason: Finish | None = None) -> Output:
        released, stop = self._stops.push(text)
        if final and stop is None:
            released += self._stops.flush()
        ending = final or stop is not None
        # What had passed every layer before this push (the client may have it): the filter point.
        delivered = self._released_chars - self._safety.held_chars - self._chunker.held_chars
        self._released.append(released)
        self._released_chars += len(released)
        safe, category = await self._safety.push(released, final=ending)
        if category is not None:
            # The answer is what the client received: the ids whose text was delivered before the filter.
            self.finished = True
            return Output(
                finish=Finish.CONTENT_FILTER,
                category=category,
                leftover_ids=self._take_ids(),
                completion_tokens=self._tokens_within(self._released_bytes(max(delivered, 0))),
            )
        if self._safety.chunks:
            # The safety layer released clause by clause, cut where this chunker would cut.
            chunks = safe
        else:
            chunks = self._chunker.push("".join(safe))
            if ending:
                chunks += self._chunker.flush()
        pieces = [Piece(c, []) for c in chunks]
        if pieces:
            pieces[0].ids = self._take_ids()
        if stop is not None:
            # Up to and including the id that completed the stop string: the model generated it.
            self.finished = True
            return Output(
                pieces,
                Finish.STOP_STRING,
                matched_stop=stop,
                leftover_ids=self._take_ids(),
                completion_tokens=self._tokens_through(self._released_bytes() + len(stop.encode())),
            )
        if final:
            self.finished = True
            assert reason is not None
            count = self._reported_tokens if self._detok is None else len(self._ends)
            return Output(pieces, reason, leftover_ids=self._take_ids(), completion_tokens=count)
        return Output(pieces)

    def _take_ids(self) -> list[int]:
        ids, self._pending_ids = self._pending_ids, []
        return ids
