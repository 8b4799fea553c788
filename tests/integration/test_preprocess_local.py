"""Preprocess in the gateway's process (`llmmesh.preprocess.local`) against the same servicer over real gRPC.

The real servicer (SmolLM2's tokenizer and template, the default safety policy) is served by a grpc.aio
server on a loopback port behind the services' StatusInterceptor and called in process: every request
must get the same response, or the same status code and message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from llmmesh.preprocess.local import LocalPreprocessStub
from llmmesh.preprocess.server import PreprocessSettings, build_servicer
from llmmesh.preprocess.servicer import PreprocessServicer
from llmmesh.stages.v1 import preprocess_pb2, preprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

from .loopback import loopback_channel

G = generation_pb2


@pytest.fixture(scope="module")
def servicer() -> PreprocessServicer:
    built, classifier = build_servicer(PreprocessSettings())
    assert classifier is None
    return built


@pytest.fixture
async def grpc_stub(servicer: PreprocessServicer) -> AsyncIterator[preprocess_pb2_grpc.PreprocessServiceStub]:
    async with loopback_channel(
        lambda server: preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, server)
    ) as ch:
        yield preprocess_pb2_grpc.PreprocessServiceStub(ch)


def sampling(**fields: object) -> G.SamplingParams:
    return G.SamplingParams(**fields)  # type: ignore[arg-type]


REQUESTS = {
    "prompt": G.GenerateRequest(prompt="What is the capital of France?", sampling=sampling(temperature=0.0)),
    "chat, seeded, stop": G.GenerateRequest(
        chat=G.Chat(messages=[G.ChatMessage(role="user", content="Hello  there\u00a0friend")]),
        sampling=sampling(temperature=0.7, seed=7, stop=["\n\n"], max_tokens=12),
        request_id="abc-1",
    ),
    "sampled, no seed": G.GenerateRequest(prompt="Tell me a story.", sampling=sampling(temperature=0.9)),
    "blocked prompt": G.GenerateRequest(prompt="You are a fucking idiot, answer me."),
    "empty": G.GenerateRequest(),
    "max_tokens 0": G.GenerateRequest(prompt="Hi", sampling=sampling(max_tokens=0)),
    "top_p 1.5": G.GenerateRequest(prompt="Hi", sampling=sampling(top_p=1.5)),
    "unknown model": G.GenerateRequest(prompt="Hi", model="gpt-17"),
    "unknown chunking": G.GenerateRequest(prompt="Hi", chunking=99),  # type: ignore[arg-type]
    "over the context": G.GenerateRequest(prompt="word " * 9000),
}


async def outcome(call: object) -> object:
    try:
        return await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return (exc.code(), exc.details())


async def test_every_request_gets_the_same_answer_in_process_and_over_grpc(
    servicer: PreprocessServicer, grpc_stub: preprocess_pb2_grpc.PreprocessServiceStub
) -> None:
    local = LocalPreprocessStub(servicer)
    results = {}
    for name, request in REQUESTS.items():
        message = preprocess_pb2.PrepareRequest(request=request)
        over_grpc = await outcome(grpc_stub.Prepare(message, timeout=10))
        in_process = await outcome(local.Prepare(message, timeout=10))
        assert in_process == over_grpc, name
        results[name] = in_process
    # Not vacuous: answers with ids and hashes, a blocked prompt, and statuses that name the field.
    prompt = results["prompt"]
    assert isinstance(prompt, preprocess_pb2.PrepareResponse)
    assert prompt.input_ids and prompt.shareable and len(prompt.request_hash) > 0
    blocked = results["blocked prompt"]
    assert isinstance(blocked, preprocess_pb2.PrepareResponse) and blocked.blocked_category == "profanity"
    assert results["max_tokens 0"][0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]
    assert "sampling.max_tokens" in results["over the context"][1]  # type: ignore[index]


async def test_an_unexpected_error_is_internal_without_its_message(servicer: PreprocessServicer) -> None:
    class Broken(PreprocessServicer):
        async def Prepare(self, request: object, context: object) -> preprocess_pb2.PrepareResponse:  # type: ignore[override]
            raise RuntimeError("secret detail that must not reach the client")

    broken = Broken.__new__(Broken)
    result = await outcome(LocalPreprocessStub(broken).Prepare(preprocess_pb2.PrepareRequest(), timeout=1))
    assert result == (grpc.StatusCode.INTERNAL, "internal error")


async def test_the_deadline_ends_a_slow_prepare_with_deadline_exceeded() -> None:
    class Slow(PreprocessServicer):
        async def Prepare(self, request: object, context: object) -> preprocess_pb2.PrepareResponse:  # type: ignore[override]
            await asyncio.sleep(5)  # as a prompt classifier that does not answer
            return preprocess_pb2.PrepareResponse()

    result = await outcome(
        LocalPreprocessStub(Slow.__new__(Slow)).Prepare(preprocess_pb2.PrepareRequest(), timeout=0.05)
    )
    assert result == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
