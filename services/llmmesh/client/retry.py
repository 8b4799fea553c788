"""When to try a call again: only before the first chunk, only on statuses that say "not now", with backoff.

A stream that has delivered a chunk is never retried: the caller (or a listener) already has part of an
answer, and a second generation could differ from it. Before that, UNAVAILABLE is retried (the mesh or a
stage was briefly unreachable: nothing was generated for us), and RESOURCE_EXHAUSTED only when the server
attached retry information, because gRPC also uses that code for "message too large", which no retry fixes.
Every attempt shares the caller's one deadline; a retry that could not start before it is not made.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

__all__ = ["NO_RETRY", "RETRYABLE_CODES", "Deadline", "RetryPolicy", "retry_after_from_metadata"]

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# The standard rich-status trailer (google.rpc.Status with details such as google.rpc.RetryInfo).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts in all (1 = no retry) and exponential backoff with jitter between them, in seconds."""

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    # Each backoff is scaled by a random factor in [1 - jitter, 1 + jitter] so that clients shed together
    # do not come back together.
    jitter: float = 0.2
    codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def delay(
        self, attempt: int, code: grpc.StatusCode, retry_after: float | None, remaining: float | None
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1` after attempt `attempt` (1-based) failed with `code`.

        None means do not retry: the code is not retryable, attempts are used up, or the wait would not end
        before the deadline (`remaining` seconds; None = no deadline).
        """
        if attempt >= self.max_attempts or code not in self.codes:
            return None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is None:
            return None
        backoff = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        backoff *= 1.0 + random.uniform(-self.jitter, self.jitter)
        # The server's own estimate wins when it asks for longer than our backoff.
        wait = max(backoff, retry_after or 0.0)
        if remaining is not None and wait >= remaining:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def retry_after_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> float | None:
    """The server's "retry after" in seconds, from google.rpc.RetryInfo or a `retry-after(-ms)` trailer."""
    for key, value in metadata:
        key = key.lower()
        try:
            if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
                found = _retry_info_delay(value)
                if found is not None:
                    return found
            elif key == "retry-after-ms":
                return max(0.0, float(_text(value)) / 1000.0)
            elif key == "retry-after":
                return max(0.0, float(_text(value)))
        except ValueError:
            continue
    return None


def _retry_info_delay(status_bytes: bytes) -> float | None:
    try:
        # googleapis-common-protos comes with the OpenTelemetry exporters; without it, rich status is ignored.
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    from google.protobuf.message import DecodeError

    status = status_pb2.Status()
    try:
        status.ParseFromString(status_bytes)
    except DecodeError as exc:
        raise ValueError("malformed grpc-status-details-bin") from exc
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return max(0.0, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class Deadline:
    """One deadline shared by every attempt of a call (and by the backoff waits between them)."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0
