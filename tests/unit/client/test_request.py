from __future__ import annotations

import pytest

from llmmesh.client import Chunking, build_request
from llmmesh.client.request import with_request_id
from llmmesh.v1 import generation_pb2


def test_a_prompt_with_parameters_becomes_a_request() -> None:
    """Keyword parameters fill sampling, model, chunking and request id; unset ones stay unset."""
    request = build_request(
        "Hi", max_tokens=32, temperature=0.0, stop=["\n"], model="smollm2", chunking=Chunking.SENTENCE, request_id="r1"
    )
    assert request.prompt == "Hi" and request.model == "smollm2" and request.request_id == "r1"
    assert request.sampling.max_tokens == 32 and request.sampling.HasField("temperature")
    assert request.sampling.temperature == 0.0 and not request.sampling.HasField("top_p")
    assert list(request.sampling.stop) == ["\n"] and request.chunking == generation_pb2.CHUNKING_MODE_SENTENCE


def test_a_conversation_becomes_chat_turns() -> None:
    """(role, content) pairs become the request's chat, in order."""
    request = build_request([("system", "Be brief."), ("user", "Hi")])
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "Be brief."), ("user", "Hi")]


def test_a_ready_request_is_copied_and_overridden() -> None:
    """Passing a GenerateRequest copies it (the caller's stays untouched) and applies the overrides."""
    original = generation_pb2.GenerateRequest(prompt="Hi", sampling=generation_pb2.SamplingParams(max_tokens=5))
    request = build_request(original, max_tokens=9)
    assert request.sampling.max_tokens == 9 and original.sampling.max_tokens == 5


def test_unknown_parameters_and_a_bare_stop_string_are_refused() -> None:
    """Typos fail loudly instead of being ignored; `stop="x"` would otherwise become ["x"] by accident."""
    with pytest.raises(TypeError, match="max_token"):
        build_request("Hi", max_token=3)
    with pytest.raises(TypeError, match="stop"):
        build_request("Hi", stop="\n")


def test_request_id_is_made_once_and_kept() -> None:
    """A request without an id gets one; a second call (a retry) keeps it."""
    request = with_request_id(build_request("Hi"))
    first = request.request_id
    assert len(first) == 32 and with_request_id(request).request_id == first
