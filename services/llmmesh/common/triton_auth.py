"""The header that opens Triton's restricted protocols to the mesh's own clients of Triton.

Triton refuses a call to a restricted protocol unless it carries a header given to it at start:
`--grpc-restricted-protocol=<protocols>:<key>=<value>` (the gRPC header is then
`triton-grpc-protocol-<key>`) and `--http-restricted-api=<apis>:<key>=<value>` (the HTTP header is
`<key>`). Without it a gRPC call ends UNAVAILABLE ("This protocol is restricted, expecting header ...")
and an HTTP call gets 403 (tritonserver 2.51, measured).

Restricted: whatever generates or changes the server (inference, the model repository's load and
unload, shared-memory regions, trace and log settings). Open: health (readiness probes), metadata,
model configuration and statistics, which only read.

`llmmesh.launcher` makes one random header per mesh, starts Triton with `triton_args(header)` and hands
the header to the services that call Triton (infer; preprocess and postprocess for the safety
classifier) as their `triton_header` setting, in Triton's own `<key>=<value>` form; their channels to
Triton send it on every call (`header_interceptors`).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

__all__ = ["RESTRICTED", "header_interceptors", "new_header", "triton_args"]

RESTRICTED = ("inference", "model-repository", "shared-memory", "trace", "logging")
_KEY = "llmmesh-triton-key"
_GRPC_PREFIX = "triton-grpc-protocol-"


def new_header() -> str:
    """A fresh random header, `<key>=<value>`."""
    return f"{_KEY}={secrets.token_urlsafe(32)}"


def _split(header: str) -> tuple[str, str]:
    key, sep, value = header.partition("=")
    if not (sep and key and value) or ":" in header or "," in header:
        raise ValueError("a Triton header is '<key>=<value>' without ':' or ','")
    return key.lower(), value


def triton_args(header: str) -> list[str]:
    """tritonserver's flags that restrict RESTRICTED, over gRPC and HTTP, to calls carrying `header`;
    none for an empty header (Triton open)."""
    if not header:
        return []
    _split(header)
    protocols = ",".join(RESTRICTED)
    return [f"--grpc-restricted-protocol={protocols}:{header}", f"--http-restricted-api={protocols}:{header}"]


def header_interceptors(header: str) -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors that send `header` on every unary and bidirectional call; none for ''."""
    if not header:
        return []
    key, value = _split(header)
    metadata = ((_GRPC_PREFIX + key, value),)
    return [_UnaryUnary(metadata), _StreamStream(metadata)]


def _with_metadata(details: grpc.aio.ClientCallDetails, extra: Iterable[tuple[str, str]]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_metadata(client_call_details, self._metadata), request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_with_metadata(client_call_details, self._metadata), request_iterator)
