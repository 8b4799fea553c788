"""Postprocess in the gateway's process (`llmmesh.postprocess.local`) against the same servicer over real gRPC.

Both paths run the real servicer (SmolLM2's tokenizer, the default safety policy plus one blocked word): one
served by a grpc.aio server on a loopback port behind the services' StatusInterceptor, one called in
process. Every conversation must end the same way, statuses included; then the in-process call's own
life (cancel, deadline, writes after the end, the unexpected) is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest

from llmmesh.common.model_assets import ModelAssets
from llmmesh.postprocess.local import LocalPostprocessStub
from llmmesh.postprocess.server import PostprocessSettings, build_servicer
from llmmesh.postprocess.servicer import PostprocessServicer
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

from .loopback import loopback_channel

P = postprocess_pb2
Outcome = tuple[list[tuple[str, tuple[int, ...], bool]], tuple[Any, ...] | None, str]


@pytest.fixture(scope="module")
def servicer() -> PostprocessServicer:
    built, classifier = build_servicer(PostprocessSettings(extra_blocked_terms=["Berlin"]))
    assert classifier is None  # no Triton URL: the classifier layer is off, as in the e2e mesh's default
    return built


@pytest.fixture
async def grpc_stub(servicer: PostprocessServicer) -> AsyncIterator[postprocess_pb2_grpc.PostprocessServiceStub]:
    async with loopback_channel(
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server)
    ) as ch:
        yield postprocess_pb2_grpc.PostprocessServiceStub(ch)


def start(stop: Sequence[str] = (), chunking: int = generation_pb2.CHUNKING_MODE_TOKEN, model: str = "") -> Any:
    return P.ProcessRequest(start=P.Start(request_id="r1", model=model, stop=list(stop), chunking=chunking))


def tokens(ids: Sequence[int], per_message: int = 1) -> list[Any]:
    return [P.ProcessRequest(tokens=P.Tokens(ids=ids[i : i + per_message])) for i in range(0, len(ids), per_message)]


def end(reason: int = generation_pb2.FINISH_REASON_STOP) -> Any:
    return P.ProcessRequest(end=P.End(finish_reason=reason))


async def converse(call: Any, messages: Sequence[Any]) -> Outcome:
    """Writes every message and half-closes while reading to the end, as the gateway does: the deltas, the
    Done and the status the reader saw."""

    async def write_all() -> None:
        try:
            for message in messages:
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended early (an error, or a stop string): the reader reports how

    writer = asyncio.create_task(write_all())
    deltas: list[tuple[str, tuple[int, ...], bool]] = []
    done = None
    try:
        async for response in call:
            if response.HasField("delta"):
                deltas.append((response.delta.text, tuple(response.delta.token_ids), response.delta.speakable))
            else:
                d = response.done
                done = (d.finish_reason, d.matched_stop, d.filter_category, tuple(d.token_ids))
        status = (await call.code()).name
    except grpc.aio.AioRpcError as exc:
        status = f"{exc.code().name}: {exc.details()}"
    await writer
    return deltas, done, status


def conversations(assets: ModelAssets) -> dict[str, list[Any]]:
    answer = assets.encode("The capital of France is Paris. Write to jane.doe@example.com today! 世界 👋🏽")
    berlin = assets.encode("Germany's capital is Berlin, a big city.")
    return {
        "plain": [start(), *tokens(answer), end(generation_pb2.FINISH_REASON_LENGTH)],
        "several ids per message": [start(), *tokens(answer, per_message=5), end()],
        "stop string": [start(stop=["Paris"]), *tokens(answer), end()],
        "blocked word": [start(), *tokens(berlin), end()],
        "sentence chunks": [start(chunking=generation_pb2.CHUNKING_MODE_SENTENCE), *tokens(answer), end()],
        "no end (infer failed)": [start(), *tokens(answer[:6])],
        "tokens before start": [*tokens(answer[:2]), end()],
        "start twice": [start(), start()],
        "unknown model": [start(model="gpt-17")],
        "unknown chunking": [start(chunking=99)],
        "bad finish reason": [start(), *tokens(answer[:3]), end(generation_pb2.FINISH_REASON_CONTENT_FILTER)],
    }


# What the servicer answers to the malformed conversations (StatusInterceptor's mapping).
SERVER_STATUS = {
    "tokens before start": "INVALID_ARGUMENT: start: the first message must be start",
    "start twice": "INVALID_ARGUMENT: start: sent twice",
    "unknown model": "INVALID_ARGUMENT: start.model: unknown model 'gpt-17'",
    "unknown chunking": "INVALID_ARGUMENT: start.chunking: unknown chunking mode 99",
    "bad finish reason": "INVALID_ARGUMENT: end.finish_reason: must be STOP, LENGTH or CANCELLED",
}


async def test_every_conversation_ends_the_same_in_process_and_over_grpc(
    assets: ModelAssets, servicer: PostprocessServicer, grpc_stub: postprocess_pb2_grpc.PostprocessServiceStub
) -> None:
    local = LocalPostprocessStub(servicer)
    for name, messages in conversations(assets).items():
        over_grpc = await converse(grpc_stub.Process(timeout=10), messages)
        in_process = await converse(local.Process(timeout=10), messages)
        if over_grpc[2] == "INTERNAL: Internal error from Core":
            # grpc's client reports this instead of the server's status when the server ended the call while
            # the client was still writing (after a Done the gateway stops reading; before one, it maps this
            # to UNAVAILABLE). The server's own status (OK after a Done) is what the in-process call gives.
            over_grpc = (over_grpc[0], over_grpc[1], "OK" if over_grpc[1] else SERVER_STATUS[name])
        assert in_process == over_grpc, name
    # The cases above are not vacuous: text, a redaction, a stop, a filter and a status each came out.
    outcomes = {name: await converse(local.Process(timeout=10), m) for name, m in conversations(assets).items()}
    assert "".join(t for t, _, _ in outcomes["plain"][0]).startswith("The capital of France is Paris. Write to [")
    assert outcomes["stop string"][1] is not None and outcomes["stop string"][1][1] == "Paris"
    assert outcomes["blocked word"][1] is not None
    assert outcomes["blocked word"][1][0] == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert outcomes["no end (infer failed)"][1] is None and outcomes["no end (infer failed)"][2] == "OK"
    for name, status in SERVER_STATUS.items():
        assert outcomes[name][2] == status, name


async def test_cancel_while_a_read_waits_raises_cancelled_in_the_reader(
    assets: ModelAssets, servicer: PostprocessServicer
) -> None:
    call = LocalPostprocessStub(servicer).Process(timeout=10)
    await call.write(start())
    reader = asyncio.create_task(call.read())
    await asyncio.sleep(0.01)
    assert not reader.done()  # the servicer waits for tokens
    assert call.cancel() is True
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert call.cancelled() and call.done() and await call.code() == grpc.StatusCode.CANCELLED
    assert call.cancel() is False
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.write(tokens(assets.encode("Hi"))[0])
    assert info.value.code() == grpc.StatusCode.CANCELLED


async def test_cancel_between_reads_closes_the_servicer_and_calls_back(
    assets: ModelAssets, servicer: PostprocessServicer
) -> None:
    call = LocalPostprocessStub(servicer).Process(timeout=10)
    ended: list[Any] = []
    call.add_done_callback(ended.append)
    await call.write(start())
    for message in tokens(assets.encode("One two three four"), per_message=2):
        await call.write(message)
    first = await call.read()
    assert first.delta.text
    call.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert ended == [call]
    assert call._responses.ag_frame is None  # the servicer's generator was closed, its span ended
    with pytest.raises(asyncio.CancelledError):
        await call.read()


async def test_deadline_ends_the_call_with_deadline_exceeded(servicer: PostprocessServicer) -> None:
    call = LocalPostprocessStub(servicer).Process(timeout=0.05)
    await call.write(start())
    remaining = call.time_remaining()
    assert remaining is not None and 0.0 <= remaining <= 0.05
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()  # no tokens ever come
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await call.details() == "Deadline Exceeded"


async def test_writes_after_the_end_fail_as_grpc_calls_do(assets: ModelAssets, servicer: PostprocessServicer) -> None:
    call = LocalPostprocessStub(servicer).Process()
    assert call.time_remaining() is None
    await call.write(start())
    await call.done_writing()
    with pytest.raises(asyncio.InvalidStateError):
        await call.write(end())  # half closed
    assert [r async for r in call] == []  # no End was written: no Done, status OK
    assert await call.code() == grpc.StatusCode.OK
    with pytest.raises(asyncio.InvalidStateError):
        await call.write(end())  # finished
    assert await call.read() is grpc.aio.EOF


async def test_an_unexpected_servicer_error_is_internal_without_its_message() -> None:
    def broken(_start: Any, _deadline: float | None) -> Any:
        raise RuntimeError("secret detail that must not reach the client")

    call = LocalPostprocessStub(PostprocessServicer(broken)).Process(timeout=10)
    await call.write(start())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    assert await call.code() == grpc.StatusCode.INTERNAL
