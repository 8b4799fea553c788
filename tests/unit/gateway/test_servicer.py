"""The gateway servicer's Converse and Generate plumbing over real gRPC, with a scripted orchestrator (a fake
of the stages, for a unit test about its caller: the servicer)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from llmmesh.common.errors import StatusInterceptor
from llmmesh.gateway.servicer import GatewayServicer
from llmmesh.v1 import generation_pb2, generation_pb2_grpc


class _ScriptedOrchestrator:
    """Yields `chunks` chunks `gap` seconds apart, then a final; then lingers `linger` seconds before its
    stream ends. Records the request ids it saw and whether each generation was closed."""

    def __init__(self, chunks: int = 3, gap: float = 0.01, linger: float = 0.0) -> None:
        self.chunks, self.gap, self.linger = chunks, gap, linger
        self.request_ids: list[str] = []
        self.closed = 0
        self.closed_event = asyncio.Event()

    async def generate(
        self,
        request: generation_pb2.GenerateRequest,
        timeout: float | None,
        arrived: float | None = None,
        caller: str = "",
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        self.request_ids.append(request.request_id)
        try:
            for i in range(self.chunks):
                await asyncio.sleep(self.gap)
                yield generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(text=f"c{i} "))
            yield generation_pb2.GenerateResponse(final=generation_pb2.Final(request_id=request.request_id))
            await asyncio.sleep(self.linger)
        finally:
            self.closed += 1
            self.closed_event.set()


@pytest.fixture
async def served() -> AsyncIterator[tuple[_ScriptedOrchestrator, str]]:
    orchestrator = _ScriptedOrchestrator()
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GatewayServicer(orchestrator), server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield orchestrator, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _turn(prompt: str = "Hi", request_id: str = "") -> generation_pb2.ConverseRequest:
    return generation_pb2.ConverseRequest(generate=generation_pb2.GenerateRequest(prompt=prompt, request_id=request_id))


_INTERRUPT = generation_pb2.ConverseRequest(interrupt=generation_pb2.Interrupt())


async def test_an_interrupt_racing_the_end_of_an_answer_never_gets_both_final_and_interrupted(
    served: tuple[_ScriptedOrchestrator, str],
) -> None:
    """An interrupt sent as the last chunk arrives (the final is ready at once): the stream ends with the
    final or with the acknowledgement, never both, over many tries."""
    orchestrator, address = served
    orchestrator.linger = 0.05
    endings = set()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for _ in range(20):
            call = stub.Converse()
            await call.write(_turn())
            kinds = []
            async for response in call:
                kinds.append(response.WhichOneof("kind"))
                if kinds.count("chunk") == orchestrator.chunks and len(kinds) == orchestrator.chunks:
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.write(_INTERRUPT)
            assert kinds[:-1] == ["chunk"] * (len(kinds) - 1) and kinds[-1] in ("final", "interrupted"), kinds
            endings.add(kinds[-1])
    assert endings  # which one wins the race varies; neither ever follows the other


async def test_interrupted_carries_the_request_id_the_gateway_chose(served: tuple[_ScriptedOrchestrator, str]) -> None:
    """Without a client request id, Interrupted.request_id is the id the generation ran under, never empty."""
    orchestrator, address = served
    orchestrator.gap = 0.1
    async with grpc.aio.insecure_channel(address) as channel:
        call = generation_pb2_grpc.GenerationServiceStub(channel).Converse()
        await call.write(_turn())
        responses = []
        async for response in call:
            responses.append(response)
            if len(responses) == 1:
                await call.write(_INTERRUPT)
        ack = responses[-1].interrupted
        assert responses[-1].HasField("interrupted") and ack.delivered_text == "c0 " and ack.delivered_chunks == 1
        assert ack.request_id and ack.request_id == orchestrator.request_ids[0]
        await asyncio.wait_for(orchestrator.closed_event.wait(), 1)


@pytest.mark.parametrize("rpc", ["Generate", "Converse"])
async def test_a_client_that_goes_away_closes_the_generation_at_once(
    served: tuple[_ScriptedOrchestrator, str], rpc: str
) -> None:
    """A cancelled call closes the orchestrator's generation (its calls to the stages) at once, not at GC."""
    orchestrator, address = served
    orchestrator.chunks, orchestrator.gap = 1000, 0.005
    gc.disable()  # what is left to garbage collection stays open: the test sees only explicit clean-up
    try:
        await _cancel_mid_stream(address, rpc)
        await asyncio.wait_for(orchestrator.closed_event.wait(), 0.5)
    finally:
        gc.enable()
    assert orchestrator.closed == 1


async def _cancel_mid_stream(address: str, rpc: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        if rpc == "Generate":
            call = stub.Generate(generation_pb2.GenerateRequest(prompt="Hi"))
        else:
            call = stub.Converse()
            await call.write(_turn())
        await call.read()
        await call.read()
        call.cancel()
