"""Typed results: what a stream delivers, converted from the proto messages once, at the edge."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from llmmesh.v1 import generation_pb2

__all__ = ["Chunk", "FinalResult", "FinishReason", "Interrupted", "Result", "Timings", "Usage"]


class FinishReason(enum.Enum):
    UNSPECIFIED = generation_pb2.FINISH_REASON_UNSPECIFIED
    STOP = generation_pb2.FINISH_REASON_STOP
    LENGTH = generation_pb2.FINISH_REASON_LENGTH
    STOP_STRING = generation_pb2.FINISH_REASON_STOP_STRING
    CONTENT_FILTER = generation_pb2.FINISH_REASON_CONTENT_FILTER
    CANCELLED = generation_pb2.FINISH_REASON_CANCELLED

    @classmethod
    def from_proto(cls, value: int) -> FinishReason:
        try:
            return cls(value)
        except ValueError:
            # A newer server may send a reason this client does not know yet.
            return cls.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer; `received_at` is this client's `time.monotonic()` when it arrived."""

    text: str
    token_ids: tuple[int, ...]
    speakable: bool
    received_at: float

    @classmethod
    def from_proto(cls, chunk: generation_pb2.Chunk, received_at: float | None = None) -> Chunk:
        return cls(
            chunk.text,
            tuple(chunk.token_ids),
            chunk.speakable,
            time.monotonic() if received_at is None else received_at,
        )


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """The gateway's own measurements, milliseconds from when it received the request."""

    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    time_to_first_speakable_chunk_ms: float


def _reuse_name(value: int) -> str:
    """llmmesh.v1.Reuse as a short name; "" for UNSPECIFIED, "unknown" for a value added by a newer mesh."""
    if value == generation_pb2.REUSE_UNSPECIFIED:
        return ""
    try:
        return generation_pb2.Reuse.Name(value).removeprefix("REUSE_").lower()
    except ValueError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class FinalResult:
    """The last message of a completed stream."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    request_id: str
    model: str
    matched_stop: str = ""
    filter_category: str = ""
    # How the answer was produced: "none" (generated for this request), "not_shareable", "joined_in_flight",
    # "cache_hit", "deduplicated" (same request id) or "disabled"; "" when nothing was generated.
    reuse: str = ""
    # With reuse "not_shareable": why the request could not share a generation.
    reuse_detail: str = ""

    @classmethod
    def from_proto(cls, final: generation_pb2.Final) -> FinalResult:
        t = final.timings
        return cls(
            FinishReason.from_proto(final.finish_reason),
            Usage(final.usage.prompt_tokens, final.usage.completion_tokens),
            Timings(t.queue_ms, t.time_to_first_token_ms, t.total_ms, t.time_to_first_speakable_chunk_ms),
            final.request_id,
            final.model,
            final.matched_stop,
            final.filter_category,
            _reuse_name(final.reuse),
            final.reuse_detail,
        )


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The outcome of a barge-in.

    `acknowledged` is True when the mesh confirmed the interrupt: `delivered_text` is then exactly the text
    of the chunks it sent before stopping. False when the answer had already completed (or the call never
    started) before the interrupt reached the mesh: `delivered_text` is then what this client received.
    """

    delivered_text: str
    delivered_chunks: int
    request_id: str
    acknowledged: bool = True

    @classmethod
    def from_proto(cls, ack: generation_pb2.Interrupted) -> Interrupted:
        return cls(ack.delivered_text, ack.delivered_chunks, ack.request_id, True)


@dataclass(frozen=True, slots=True)
class Result:
    """A whole answer: its text, the chunks it arrived in, and the final message."""

    text: str
    chunks: tuple[Chunk, ...]
    final: FinalResult
