"""Python client for the mesh's public API (`llmmesh.v1.GenerationService`), blocking and asyncio.

`Client`/`AsyncClient` stream typed chunks and a final result, carry deadlines, credentials (API key or
bearer token as metadata) and TLS, retry only before the first chunk, and open barge-in voice turns.
"""

from __future__ import annotations

from llmmesh.client.aio import AsyncClient, AsyncGeneration, AsyncVoiceSession
from llmmesh.client.errors import (
    CallCancelledError,
    DeadlineExceededError,
    IncompleteStreamError,
    InternalError,
    InvalidArgumentError,
    MeshError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from llmmesh.client.options import ClientConfig, Credentials, TlsConfig
from llmmesh.client.request import Chunking, build_request
from llmmesh.client.results import Chunk, FinalResult, FinishReason, Interrupted, Result, Timings, Usage
from llmmesh.client.retry import NO_RETRY, RetryPolicy
from llmmesh.client.sync import Client, Generation, VoiceSession

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "AsyncGeneration",
    "AsyncVoiceSession",
    "CallCancelledError",
    "Chunk",
    "Chunking",
    "Client",
    "ClientConfig",
    "Credentials",
    "DeadlineExceededError",
    "FinalResult",
    "FinishReason",
    "Generation",
    "IncompleteStreamError",
    "InternalError",
    "Interrupted",
    "InvalidArgumentError",
    "MeshError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Result",
    "RetryPolicy",
    "Timings",
    "TlsConfig",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "VoiceSession",
    "build_request",
]
