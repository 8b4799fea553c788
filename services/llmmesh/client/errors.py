"""The client's exceptions: one class per status a caller handles differently, each keeping code and details.

Callers catch `MeshError` for everything, or a subclass for the cases they treat apart (bad input is a
bug to fix, UNAVAILABLE and RESOURCE_EXHAUSTED are worth trying again later, an expired deadline is the
caller's own budget). The raw status code and message stay on every instance.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from llmmesh.client.retry import retry_after_from_metadata

__all__ = [
    "CallCancelledError",
    "DeadlineExceededError",
    "IncompleteStreamError",
    "InternalError",
    "InvalidArgumentError",
    "MeshError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
]


class MeshError(Exception):
    """A call to the mesh failed; `code` and `details` are the gRPC status the mesh (or the channel) gave."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        retry_after: float | None = None,
        trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        # Seconds the server asked us to wait before trying again (RESOURCE_EXHAUSTED with retry info).
        self.retry_after = retry_after
        self.trailing_metadata = tuple(trailing_metadata)


class InvalidArgumentError(MeshError):
    """The request was refused as malformed; `details` starts with the offending field's name."""


class UnauthenticatedError(MeshError):
    """No or wrong credentials (API key, bearer token, client certificate)."""


class PermissionDeniedError(MeshError):
    """The credentials were valid but do not allow this call."""


class ResourceExhaustedError(MeshError):
    """The mesh shed the request (or a message was too large); see `retry_after`."""


class UnavailableError(MeshError):
    """The mesh, a stage or Triton could not be reached, or was lost mid-stream."""


class DeadlineExceededError(MeshError):
    """The caller's deadline expired before the stream completed."""


class CallCancelledError(MeshError):
    """The call was cancelled (by this client, or the server gave up on it)."""


class InternalError(MeshError):
    """Something unexpected failed inside the mesh (INTERNAL, UNKNOWN and other codes)."""


class IncompleteStreamError(MeshError):
    """The stream ended with status OK but without its final message: the answer is not known to be whole."""


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
}


def error_from_status(
    code: grpc.StatusCode, details: str | None, metadata: Iterable[tuple[str, str | bytes]] = ()
) -> MeshError:
    metadata = tuple(metadata)
    cls = _BY_CODE.get(code, InternalError)
    return cls(code, details or code.name, retry_after=retry_after_from_metadata(metadata), trailing_metadata=metadata)


def error_from_rpc(exc: grpc.RpcError) -> MeshError:
    """The `MeshError` for a failed sync or asyncio call (both are `grpc.RpcError` with a status)."""
    code_of = getattr(exc, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(exc, "details", None)
    details = details_of() if callable(details_of) else str(exc)
    metadata_of = getattr(exc, "trailing_metadata", None)
    metadata = metadata_of() if callable(metadata_of) else None
    return error_from_status(code or grpc.StatusCode.UNKNOWN, details, tuple(metadata or ()))
