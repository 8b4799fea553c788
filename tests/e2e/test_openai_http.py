"""The gateway's OpenAI-compatible HTTP front door, driven by real clients: the official `openai` SDK (sync
and async, streamed and not) and `curl -N`, against the session mesh (real Triton, SmolLM2, the four
services as processes). Keys and TLS: tests/e2e/test_security.py; no side door: test_side_doors.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from llmmesh.launcher import Mesh

from .conftest import BLOCKED_WORD, model_counters, request, wait_for

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    # No keys in the session mesh: the SDK insists on some key, which the gateway then does not check.
    return openai.OpenAI(base_url=f"{mesh.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(mesh: Mesh, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{mesh.http_url}{path}", data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_completion_answers_with_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "smollm2"
    (choice,) = reply.choices
    assert "Paris" in (choice.message.content or "") and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client: openai.OpenAI, gateway: Any) -> None:
    """stream=True: server-sent deltas that join to the non-streamed greedy answer and to the gRPC answer
    for the same chat; include_usage adds a last chunk with the usage and no choices."""
    messages = [{"role": "user", "content": "Describe Paris in three sentences."}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=48)
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "one piece: not streamed"
    assert "".join(deltas) == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]

    from llmmesh.v1 import generation_pb2

    grpc_request = generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(**m) for m in messages]),
        model="smollm2",
        sampling=generation_pb2.SamplingParams(temperature=0, max_tokens=48),
    )
    grpc_text = "".join(r.chunk.text for r in gateway.Generate(grpc_request, timeout=120) if r.HasField("chunk"))
    assert grpc_text == "".join(deltas)


def test_async_client_streams_and_completes_text(mesh: Mesh) -> None:
    """The async SDK on /v1/completions, streamed and not: the same greedy text."""

    async def run() -> tuple[str, str, str | None]:
        async with openai.AsyncOpenAI(base_url=f"{mesh.http_url}/v1", api_key="unused", max_retries=0) as aclient:
            whole = await aclient.completions.create(
                model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=12
            )
            stream = await aclient.completions.create(
                model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=12, stream=True
            )
            parts, reason = [], None
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
            assert whole.object == "text_completion"
            return whole.choices[0].text, "".join(parts), reason

    whole, streamed, reason = asyncio.run(run())
    assert whole and streamed == whole
    assert reason in ("stop", "length")


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=32, stop=["Paris"]
    )
    assert "Paris" not in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"


def test_a_filtered_answer_ends_with_content_filter(client: openai.OpenAI) -> None:
    """The safety policy applies here too: the e2e mesh blocks a word the model will say."""
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of Germany?"}],
        temperature=0,
        max_tokens=48,
    )
    assert reply.choices[0].finish_reason == "content_filter"
    assert BLOCKED_WORD not in (reply.choices[0].message.content or "")


def test_curl_streams_server_sent_events(mesh: Mesh) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "smollm2", "messages": QUESTION, "max_tokens": 12, "temperature": 0, "stream": True})
    out = subprocess.run(
        [curl, "-sN", "--fail-with-body", "-H", "Content-Type: application/json", "-d", body,
         f"{mesh.http_url}/v1/chat/completions"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)
    assert "Paris" in text


def test_models_and_health(mesh: Mesh, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"smollm2", "gemma3-270m", "gemma3", "auto", "reliable", "careful", "ab"} <= ids
    with urllib.request.urlopen(f"{mesh.http_url}/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
    ids=["tools", "logprobs", "n", "temperature", "max_tokens"],
)
def test_an_unsupported_or_bad_parameter_is_a_400_naming_it(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=QUESTION, **{"max_tokens": 4, **extra})
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == param, err.value.body
    assert param in err.value.message


def test_an_unknown_model_is_a_404_listing_the_known_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=QUESTION, max_tokens=4)
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_found"
    assert "smollm2" in err.value.message


def test_a_body_that_is_not_json_is_a_400(mesh: Mesh) -> None:
    status, body = _post(mesh, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_a_client_that_disconnects_cancels_the_generation_at_the_model(mesh: Mesh, client: openai.OpenAI) -> None:
    before = model_counters(mesh)
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a very long story about a lighthouse."}],
        temperature=0.8,
        max_tokens=1500,
        stream=True,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()
    closed_at = time.monotonic()
    assert wait_for(lambda: model_counters(mesh).get("cancelled", 0) >= before.get("cancelled", 0) + 1, timeout=5)
    print(f"\ncancel seen at the model within {time.monotonic() - closed_at:.2f} s of the disconnect")
    assert model_counters(mesh)["tokens"] - before["tokens"] < 1500


def test_the_grpc_path_still_answers_beside_http(gateway: Any) -> None:
    """Both doors share one admission controller and one orchestrator: gRPC keeps answering."""
    responses = list(gateway.Generate(request("Say hi.", max_tokens=4, temperature=0.0), timeout=60))
    assert responses[-1].HasField("final")
