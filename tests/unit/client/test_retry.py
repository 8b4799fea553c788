from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from llmmesh.client.retry import RetryPolicy, retry_after_from_metadata

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
POLICY = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.0)


def test_unavailable_backs_off_exponentially_until_attempts_are_used_up() -> None:
    """UNAVAILABLE waits 0.1 s, then 0.2 s, and the third failure is final."""
    assert POLICY.delay(1, UNAVAILABLE, None, None) == 0.1
    assert POLICY.delay(2, UNAVAILABLE, None, None) == 0.2
    assert POLICY.delay(3, UNAVAILABLE, None, None) is None


def test_backoff_is_capped_and_jittered_within_bounds() -> None:
    """Backoff never exceeds max_backoff × (1 + jitter)."""
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=0.5, jitter=0.2)
    for _ in range(100):
        delay = policy.delay(9, UNAVAILABLE, None, None)
        assert delay is not None and 0.4 <= delay <= 0.6


def test_other_codes_are_never_retried() -> None:
    """INVALID_ARGUMENT, DEADLINE_EXCEEDED, INTERNAL and CANCELLED are final."""
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAUTHENTICATED,
    ):
        assert POLICY.delay(1, code, None, None) is None


def test_resource_exhausted_is_retried_only_with_retry_info_and_no_sooner_than_asked() -> None:
    """Without retry information RESOURCE_EXHAUSTED is final; with it the wait is at least the server's."""
    assert POLICY.delay(1, EXHAUSTED, None, None) is None
    assert POLICY.delay(1, EXHAUSTED, 0.75, None) == 0.75
    assert POLICY.delay(1, EXHAUSTED, 0.01, None) == 0.1


def test_no_retry_whose_wait_would_outlast_the_deadline() -> None:
    """A wait that ends after the deadline is not started: the caller gets the error at once."""
    assert POLICY.delay(1, UNAVAILABLE, None, 0.05) is None
    assert POLICY.delay(1, EXHAUSTED, 2.0, 1.0) is None
    assert POLICY.delay(1, UNAVAILABLE, None, 5.0) == 0.1


def test_retry_after_is_read_from_google_rpc_retry_info() -> None:
    """The standard grpc-status-details-bin trailer with RetryInfo gives the delay in seconds."""
    status = status_pb2.Status(code=8, message="busy")
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    )
    assert retry_after_from_metadata([("grpc-status-details-bin", status.SerializeToString())]) == 1.5


def test_retry_after_is_read_from_plain_trailers_and_garbage_is_ignored() -> None:
    """`retry-after-ms` and `retry-after` trailers work; unparsable values and other keys are ignored."""
    assert retry_after_from_metadata([("retry-after-ms", "250")]) == 0.25
    assert retry_after_from_metadata([("Retry-After", "2")]) == 2.0
    assert retry_after_from_metadata([("retry-after", "soon"), ("x", "1")]) is None
    assert retry_after_from_metadata([("grpc-status-details-bin", b"\xff\xff")]) is None
    assert retry_after_from_metadata([]) is None
