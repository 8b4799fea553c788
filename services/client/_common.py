"""Pieces shared by the sync and asyncio clients: one place decides what a response or a failure means."""

from __future__ import annotations

import grpc

from llmmesh.client.errors import DeadlineExceededError, IncompleteStreamError, MeshError
from llmmesh.client.retry import Deadline, RetryPolicy
from llmmesh.v1 import generation_pb2

__all__ = ["INTERRUPT", "deadline_error", "incomplete", "retry_delay"]

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
