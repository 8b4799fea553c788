"""Infer's OpenAI-compatible backend over real gRPC against a real OpenAI-compatible server: llama.cpp's own
HTTP server (xllamacpp, SmolLM2) on a loopback port, started with an API key. Infer is built by its own
`create_server` from a registry holding a Triton model (no Triton runs) beside the endpoint's models."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from llmmesh.infer.server import InferSettings, create_server
from llmmesh.launcher import free_port
from llmmesh.stages.v1 import infer_pb2, infer_pb2_grpc, preprocess_pb2
from llmmesh.v1 import generation_pb2
from tests.integration.loopback import serving
from tests.llamacpp_server import LlamaCppServer, running_llama

KEY = "sk-llmmesh-test-0123456789abcdef"
WRONG_KEY = "sk-wrong-key-fedcba9876543210"
KEY_ENV = "LLMMESH_TEST_OPENAI_KEY"
QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant."
STORY = "Write a very long story about a dragon who learns to cook."


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    with running_llama(tmp_path_factory.mktemp("llama"), KEY) as server:
        yield server


def _registry(folder: Path, base_url: str, *, triton: bool = True) -> Path:
    (folder / "wrong.key").write_text(WRONG_KEY + "\n", encoding="utf-8")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    models = [
        f"  - {{name: remote, aliases: [gpt], default: {str(not triton).lower()}, backend: openai,"
        f" openai: {{base_url: '{base_url}', model: smollm2-135m, api_key_env: {KEY_ENV}}}}}",
        f"  - {{name: wrongkey, backend: openai, openai: {{base_url: '{base_url}', api_key_file: wrong.key}}}}",
        f"  - {{name: slow, backend: openai, openai: {{base_url: '{base_url}', api_key_env: {KEY_ENV},"
        " first_token_timeout_s: 0.001}}",
        f"  - {{name: nowhere, backend: openai, openai: {{base_url: '{dead}'}}}}",
    ]
    if triton:
        models.insert(0, "  - {name: smollm2, default: true, triton_model: smollm2}")
    path = folder / ("models.yaml" if triton else "remote-only.yaml")
    path.write_text("models:\n" + "\n".join(models) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, llama: LlamaCppServer) -> Iterator[Path]:
    os.environ[KEY_ENV] = KEY
    try:
        yield _registry(tmp_path_factory.mktemp("registry"), llama.base_url)
    finally:
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
async def infer(registry: Path) -> AsyncIterator[infer_pb2_grpc.InferServiceStub]:
    # Triton's address has nothing behind it: the endpoint's models must not need it.
    settings = InferSettings(
        host="127.0.0.1", port=0, model_registry=str(registry), triton_url=f"127.0.0.1:{free_port()}"
    )
    async with serving(await create_server(settings)) as channel:
        yield infer_pb2_grpc.InferServiceStub(channel)


def _request(
    model: str = "remote", prompt: str = QUESTION, max_tokens: int = 40, **fields: object
) -> infer_pb2.InferRequest:
    chat = generation_pb2.Chat(
        messages=[
            generation_pb2.ChatMessage(role="system", content=SYSTEM),
            generation_pb2.ChatMessage(role="user", content=prompt),
        ]
    )
    sampling = preprocess_pb2.ResolvedSampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)
    return infer_pb2.InferRequest(request_id="r1", model=model, chat=chat, sampling=sampling, **fields)  # type: ignore[arg-type]


async def _collect(call: grpc.aio.UnaryStreamCall) -> list[infer_pb2.InferResponse]:
    return [response async for response in call]


async def test_streamed_text_is_the_whole_answer_with_the_endpoints_usage(
    infer: infer_pb2_grpc.InferServiceStub, llama: LlamaCppServer
) -> None:
    """The text deltas concatenate to the endpoint's own non-streamed answer; the last message has the finish,
    the endpoint's prompt and completion token counts, and reuse NOT_SHAREABLE (never shared)."""
    responses = await _collect(infer.Generate(_request(stop=["Paris"]), timeout=60))
    assert len(responses) > 3 and all(not r.token_ids for r in responses)
    text = "".join(r.text for r in responses)
    last = responses[-1]
    client = openai.AsyncOpenAI(base_url=llama.base_url, api_key=KEY, max_retries=0)
    whole = await client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        max_tokens=40,
        temperature=0.0,
        top_p=1.0,
        seed=1,
    )
    await client.close()
    assert whole.usage is not None
    print(f"\nanswer: {text!r}; usage: prompt {last.prompt_tokens}, completion {last.completion_tokens}")
    # The stop string is not sent upstream (postprocess matches it): the answer goes past "Paris".
    assert text == whole.choices[0].message.content and "Paris" in text
    assert (last.prompt_tokens, last.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert last.prompt_tokens > 0 and last.completion_tokens > 0
    assert last.finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    assert responses[0].reuse == last.reuse == generation_pb2.REUSE_NOT_SHAREABLE


async def test_max_tokens_ends_with_length(infer: infer_pb2_grpc.InferServiceStub) -> None:
    """A prompt (no chat) is one user message; max_tokens reached is FINISH_REASON_LENGTH with that many tokens."""
    sampling = preprocess_pb2.ResolvedSampling(max_tokens=5, temperature=0.0, top_p=1.0)
    responses = await _collect(
        infer.Generate(infer_pb2.InferRequest(request_id="r", model="gpt", prompt=STORY, sampling=sampling), timeout=60)
    )
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert responses[-1].completion_tokens == 5 and "".join(r.text for r in responses)


async def test_client_cancel_aborts_the_upstream_request(
    infer: infer_pb2_grpc.InferServiceStub, llama: LlamaCppServer
) -> None:
    """Cancelling infer's call mid-stream frees the endpoint's slot at once: llama.cpp stops generating long
    before max_tokens (its slot idle, its predicted-token counter far below max_tokens)."""

    def predicted() -> float:
        for line in llama.get("/metrics").splitlines():
            if line.startswith("llamacpp:tokens_predicted_total"):
                return float(line.split()[-1])
        raise AssertionError("no llamacpp:tokens_predicted_total")

    before = await asyncio.to_thread(predicted)
    call = infer.Generate(_request(prompt=STORY, max_tokens=1500), timeout=120)
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 5:
            break
    assert await asyncio.to_thread(llama.busy_slots) == 1
    cancelled = time.monotonic()
    call.cancel()
    while await asyncio.to_thread(llama.busy_slots):
        assert time.monotonic() - cancelled < 10, "the endpoint's slot is still busy 10 s after the cancel"
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - cancelled
    await asyncio.sleep(0.5)
    generated = await asyncio.to_thread(predicted) - before
    print(
        f"\ncancel -> endpoint slot idle: {elapsed * 1000:.0f} ms; tokens generated upstream: {generated:.0f} of 1500"
    )
    assert elapsed < 2.0
    assert generated < 300


async def test_wrong_key_is_failed_precondition_without_the_key(infer: infer_pb2_grpc.InferServiceStub) -> None:
    """The endpoint refusing the mesh's key (401) is FAILED_PRECONDITION naming the model; no key in the message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(infer.Generate(_request(model="wrongkey"), timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    print(f"\n401 -> {info.value.code().name}: {details}")
    assert "'wrongkey'" in details and "credentials" in details
    assert WRONG_KEY not in details and KEY not in details


async def test_no_first_token_in_time_is_unavailable(infer: infer_pb2_grpc.InferServiceStub) -> None:
    """No first token within first_token_timeout_s is UNAVAILABLE naming the model and the limit."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(infer.Generate(_request(model="slow"), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "'slow'" in (info.value.details() or "") and "first_token_timeout_s" in (info.value.details() or "")


async def test_unreachable_endpoint_is_unavailable(infer: infer_pb2_grpc.InferServiceStub) -> None:
    """An endpoint nobody listens on is UNAVAILABLE naming the model and the endpoint."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(infer.Generate(_request(model="nowhere"), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "'nowhere'" in (info.value.details() or "") and "cannot reach" in (info.value.details() or "")


async def test_request_the_endpoint_refuses_is_invalid_argument(infer: infer_pb2_grpc.InferServiceStub) -> None:
    """A request beyond the endpoint's context (its 400) is INVALID_ARGUMENT with the endpoint's reason."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(infer.Generate(_request(prompt="hello " * 3000), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'remote'" in (info.value.details() or "") and "context" in (info.value.details() or "")


async def test_caller_deadline_is_deadline_exceeded_and_aborts_upstream(
    infer: infer_pb2_grpc.InferServiceStub, llama: LlamaCppServer
) -> None:
    """The caller's deadline ending mid-answer is DEADLINE_EXCEEDED, and the endpoint's slot is freed."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(infer.Generate(_request(prompt=STORY, max_tokens=1500), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while await asyncio.to_thread(llama.busy_slots):
        assert time.monotonic() < deadline, "the endpoint's slot is still busy after the caller's deadline"
        await asyncio.sleep(0.01)


async def test_the_key_is_never_logged(
    infer: infer_pb2_grpc.InferServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither structlog's events nor the SDK's own (stdlib) logs at DEBUG carry a key, on success or error."""
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        await _collect(infer.Generate(_request(max_tokens=5), timeout=60))
        with pytest.raises(grpc.aio.AioRpcError):
            await _collect(infer.Generate(_request(model="wrongkey"), timeout=30))
    logged = repr(events) + caplog.text + repr([r.__dict__ for r in caplog.records])
    assert any(e.get("event") == "request_failed" for e in events)
    assert KEY not in logged and WRONG_KEY not in logged


async def test_infer_serves_without_triton_when_every_model_is_remote(
    tmp_path: Path, llama: LlamaCppServer, registry: Path
) -> None:
    """A registry of OpenAI-compatible models only: infer is SERVING with no Triton anywhere, and generates."""
    path = _registry(tmp_path, llama.base_url, triton=False)
    settings = InferSettings(host="127.0.0.1", port=0, model_registry=str(path), triton_url=f"127.0.0.1:{free_port()}")
    async with serving(await create_server(settings)) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = await _collect(
            infer_pb2_grpc.InferServiceStub(channel).Generate(_request(max_tokens=3), timeout=60)
        )
        assert responses[-1].completion_tokens == 3
