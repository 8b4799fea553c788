from __future__ import annotations

import grpc
import pytest

from llmmesh.client import (
    CallCancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    MeshError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from llmmesh.client.errors import error_from_status


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, CallCancelledError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.UNKNOWN, InternalError),
    ],
)
def test_each_status_maps_to_its_exception_keeping_code_and_details(code: grpc.StatusCode, cls: type) -> None:
    """Every status becomes a MeshError subclass that still carries the code and the server's message."""
    error = error_from_status(code, "prompt: must not be empty")
    assert isinstance(error, cls) and isinstance(error, MeshError)
    assert error.code is code and error.details == "prompt: must not be empty"
    assert str(error) == f"{code.name}: prompt: must not be empty"


def test_retry_after_comes_from_the_trailers() -> None:
    """A shed request's retry information is kept on the exception."""
    error = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [("retry-after-ms", "300")])
    assert error.retry_after == 0.3 and error.trailing_metadata == (("retry-after-ms", "300"),)


def test_missing_details_fall_back_to_the_code_name() -> None:
    """A status without a message still says what happened."""
    assert error_from_status(grpc.StatusCode.UNAVAILABLE, None).details == "UNAVAILABLE"
