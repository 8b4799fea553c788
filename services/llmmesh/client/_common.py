"""Pieces shared by the sync and asyncio clients: one place decides what a response or a failure means."""

from __future__ import annotations

from typing import Any

import grpc

from llmmesh.client.errors import DeadlineExceededError, IncompleteStreamError, MeshError
from llmmesh.client.options import ClientConfig, Metadata
from llmmesh.client.request import with_request_id
from llmmesh.client.results import Chunk, FinalResult
from llmmesh.client.retry import Deadline, RetryPolicy
from llmmesh.v1 import generation_pb2

__all__ = ["INTERRUPT", "GenerationState", "deadline_error", "incomplete", "retry_delay"]

INTERRUPT = generation_pb2.ConverseRequest(interrupt=generation_pb2.Interrupt())


def incomplete() -> IncompleteStreamError:
    return IncompleteStreamError(grpc.StatusCode.UNKNOWN, "the stream ended without its final message")


def deadline_error() -> DeadlineExceededError:
    return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call could start")


def retry_delay(
    policy: RetryPolicy, attempt: int, error: MeshError, deadline: Deadline, chunks_seen: bool
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up and raise `error`."""
    if chunks_seen:
        # Part of an answer was delivered: a second generation could contradict it.
        return None
    return policy.delay(attempt, error.code, error.retry_after, deadline.remaining())


class GenerationState:
    """What a `Generate` call holds, whether it is read blocking or awaited (see sync.py and aio.py)."""

    def __init__(
        self,
        stub: Any,
        request: generation_pb2.GenerateRequest,
        config: ClientConfig,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> None:
        self.request = with_request_id(request)
        self.final: FinalResult | None = None
        self.attempts = 0
        self._stub = stub
        self._config = config
        self._deadline = Deadline(timeout)
        self._metadata = config.call_metadata(metadata)
        self._call: Any = None
        self._done = False

    def _accept(self, response: generation_pb2.GenerateResponse) -> Chunk | None:
        """The chunk a response carries, or None once it was the final message (then `final` is set)."""
        if response.HasField("final"):
            self.final = FinalResult.from_proto(response.final)
            self._done = True
            return None
        return Chunk.from_proto(response.chunk)

    def cancel(self) -> None:
        """Stops the generation (the mesh cancels the Triton request); further iteration ends."""
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True
