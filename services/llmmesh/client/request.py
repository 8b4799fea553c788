"""Building a `GenerateRequest` from keyword arguments, so callers need not touch the proto classes."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from typing import TypedDict

from llmmesh.v1 import generation_pb2

__all__ = ["Chunking", "RequestParams", "build_request", "with_request_id"]


class Chunking(enum.Enum):
    """Where the mesh cuts the answer into chunks (voice front ends speak each chunk as it arrives)."""

    TOKEN = generation_pb2.CHUNKING_MODE_TOKEN
    CLAUSE = generation_pb2.CHUNKING_MODE_CLAUSE
    SENTENCE = generation_pb2.CHUNKING_MODE_SENTENCE


class RequestParams(TypedDict, total=False):
    """Optional request fields; unset ones take the mesh's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    model: str
    chunking: Chunking
    request_id: str
    # Opt-in: makes the call idempotent for this caller (see GenerateRequest.idempotency_key).
    idempotency_key: str
    # Generate anew: no joining of a running identical generation, no cached replay.
    fresh: bool


def build_request(
    prompt: str | Sequence[tuple[str, str]] | generation_pb2.GenerateRequest, **params: object
) -> generation_pb2.GenerateRequest:
    """A request from a plain prompt, a conversation as (role, content) turns, or a ready request (copied).

    Keyword arguments are those of `RequestParams`; on a ready request they override its fields.
    """
    if isinstance(prompt, generation_pb2.GenerateRequest):
        request = generation_pb2.GenerateRequest()
        request.CopyFrom(prompt)
    elif isinstance(prompt, str):
        request = generation_pb2.GenerateRequest(prompt=prompt)
    else:
        request = generation_pb2.GenerateRequest(
            chat=generation_pb2.Chat(
                messages=[generation_pb2.ChatMessage(role=role, content=content) for role, content in prompt]
            )
        )
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = params.pop(name, None)
        if value is not None:
            setattr(request.sampling, name, value)
    stop = params.pop("stop", None)
    if stop is not None:
        if isinstance(stop, str):
            raise TypeError("stop: a sequence of strings, not a string")
        del request.sampling.stop[:]
        request.sampling.stop.extend(stop)
    model = params.pop("model", None)
    if model is not None:
        request.model = str(model)
    chunking = params.pop("chunking", None)
    if chunking is not None:
        request.chunking = Chunking(chunking).value
    for name in ("request_id", "idempotency_key"):
        value = params.pop(name, None)
        if value is not None:
            setattr(request, name, str(value))
    fresh = params.pop("fresh", None)
    if fresh is not None:
        request.fresh = bool(fresh)
    if params:
        raise TypeError(f"unknown request parameters: {', '.join(sorted(params))}")
    return request


def with_request_id(request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
    """Gives the request an id when it has none, so that every retry of it carries the same id (the mesh's
    logs and traces then see one request, not several). An id never makes a call idempotent: nothing is
    stored for it unless the caller sets `idempotency_key`."""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return request
