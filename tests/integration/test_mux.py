"""Many requests on one gRPC call (llmmesh.common.mux), over real gRPC on loopback: the gateway's infer adapter
(`RemoteInfer`) against a scripted infer stage served by `MuxServer`. Each request keeps its own
responses, status, deadline and cancel; frames carry several requests' events; a lost call fails exactly
its requests; a draining stage refuses new requests and ends its calls once theirs are done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import grpc.aio
import pytest

from llmmesh.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LlmmeshError,
    ResourceExhausted,
    StatusInterceptor,
    Unavailable,
)
from llmmesh.common.metrics import RPCS
from llmmesh.common.mux import Inbox, MuxServer, MuxStream
from llmmesh.gateway.stages import RemoteInfer
from llmmesh.stages.v1 import infer_pb2, infer_pb2_grpc
from llmmesh.v1 import generation_pb2 as G

METHOD = "/llmmesh.stages.v1.InferService/Generate"


class Scripted(infer_pb2_grpc.InferServiceServicer):
    """request_id says what to do: "ok-N" streams N tokens (one per loop turn) and ends; "bad" fails with
    INVALID_ARGUMENT; "shed" with RESOURCE_EXHAUSTED and a retry hint; "hang" waits until cancelled."""

    def __init__(self) -> None:
        self.mux = MuxServer("infer")
        self.cancelled: list[str] = []
        self.frames = 0
        self.events = 0
        self.release = asyncio.Event()

    async def GenerateStreams(  # type: ignore[override]
        self, request_iterator: AsyncIterator[infer_pb2.InferStreamOps], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[infer_pb2.InferStreamEvents]:
        async for frame in self.mux.serve(
            request_iterator,
            method=METHOD,
            message=lambda op: None,
            handler=self._handle,
            event=infer_pb2.InferStreamEvent,
            frame=lambda events: infer_pb2.InferStreamEvents(events=events),
            kind=self._kind,
        ):
            self.frames += 1
            self.events += len(frame.events)
            yield frame

    @staticmethod
    def _kind(op: infer_pb2.InferStreamOp) -> str:
        """Reading an op fails for request_id "poison" (as a stage's own op parsing could)."""
        if op.open.request_id == "poison":
            raise ValueError("cannot read this op")
        return op.WhichOneof("kind") or "none"

    async def _handle(
        self, op: infer_pb2.InferStreamOp, inbox: Inbox, timeout: float | None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        rid = op.open.request_id
        try:
            if rid == "bad":
                raise InvalidArgument("input_ids", "empty")
            if rid == "shed":
                raise ResourceExhausted("too busy", retry_after=1.5)
            if rid.startswith("hang"):
                await asyncio.Event().wait()
            if rid.startswith("wait"):
                await self.release.wait()
            n = int(rid.split("-")[1])
            for i in range(n):
                yield infer_pb2.InferResponse(token_ids=[hash(rid) % 1000, i])
                await asyncio.sleep(0)
            yield infer_pb2.InferResponse(finish_reason=G.FINISH_REASON_LENGTH, completion_tokens=n)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise


@contextlib.asynccontextmanager
async def stage(port: int = 0) -> AsyncIterator[tuple[Scripted, grpc.aio.Server, int]]:
    servicer = Scripted()
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    infer_pb2_grpc.add_InferServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield servicer, server, port
    finally:
        await server.stop(None)


async def run(infer: RemoteInfer, rid: str, timeout: float | None = None) -> tuple[list[int], str]:
    """(token ids, outcome): "LENGTH" or the error's code name and message."""
    ids: list[int] = []
    try:
        async for response in infer.generate(infer_pb2.InferRequest(request_id=rid), timeout):
            ids.extend(response.token_ids)
            if response.finish_reason:
                return ids, G.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_")
        return ids, "no finish"
    except LlmmeshError as exc:
        return ids, f"{exc.code.name}: {exc}"


async def test_many_requests_share_one_call_each_with_its_own_tokens_and_status() -> None:
    async with stage() as (servicer, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = RemoteInfer(channel, calls=1)
        ok_before = RPCS.labels(METHOD, "OK")._value.get()
        rids = [f"ok-{20 + i}" for i in range(40)] + ["bad", "shed"]
        results = await asyncio.gather(*(run(infer, rid) for rid in rids))
        for rid, (ids, outcome) in zip(rids[:40], results[:40], strict=True):
            n = int(rid.split("-")[1])
            assert outcome == "LENGTH"
            assert ids == [v for i in range(n) for v in (hash(rid) % 1000, i)], rid
        assert results[40] == ([], "INVALID_ARGUMENT: input_ids: empty")
        assert results[41] == ([], "RESOURCE_EXHAUSTED: too busy")
        # One call carried all of them, and its frames carried several requests' events each.
        assert servicer.events >= sum(int(r.split("-")[1]) + 2 for r in rids[:40]) + 2
        assert servicer.frames < servicer.events / 4, (servicer.frames, servicer.events)
        # Each request counted as its own RPC would be.
        assert RPCS.labels(METHOD, "OK")._value.get() - ok_before == 40


async def test_a_shed_request_keeps_its_retry_hint() -> None:
    async with stage() as (_, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = RemoteInfer(channel)
        with pytest.raises(LlmmeshError) as caught:
            async for _ in infer.generate(infer_pb2.InferRequest(request_id="shed")):
                pass
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert getattr(caught.value, "retry_after", None) == 1.5


async def test_closing_a_stream_cancels_only_its_request() -> None:
    async with stage() as (servicer, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = RemoteInfer(channel, calls=1)
        hanging = infer.generate(infer_pb2.InferRequest(request_id="hang-1"))
        first = asyncio.create_task(anext(hanging))
        others = asyncio.gather(*(run(infer, f"ok-{50 + i}") for i in range(5)))
        await asyncio.sleep(0.2)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await hanging.aclose()
        assert [outcome for _, outcome in await others] == ["LENGTH"] * 5
        for _ in range(50):
            if servicer.cancelled:
                break
            await asyncio.sleep(0.02)
        assert servicer.cancelled == ["hang-1"]


async def test_the_deadline_travels_with_the_request() -> None:
    async with stage() as (servicer, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = RemoteInfer(channel, calls=1)
        _ids, outcome = await run(infer, "hang-2", timeout=0.3)
        assert outcome.startswith("DEADLINE_EXCEEDED")
        assert await run(infer, "ok-3") == (
            [hash("ok-3") % 1000, 0, hash("ok-3") % 1000, 1, hash("ok-3") % 1000, 2],
            "LENGTH",
        )
        for _ in range(50):
            if servicer.cancelled:
                break
            await asyncio.sleep(0.02)
        assert servicer.cancelled == ["hang-2"]  # the stage gave up too, not only the caller


async def _until_end(stream: MuxStream) -> tuple[int, int]:
    """(token ids received, end status code) of one raw stream."""
    count = 0
    while True:
        for event in await stream.events():
            if event.HasField("end"):
                stream.finish()
                return count, event.end.code
            count += len(event.response.token_ids)


async def test_a_stream_that_starts_after_a_later_opened_one_is_still_served() -> None:
    """The gateway opens a postprocess stream per request at once but sends its first op when the first token
    comes, so streams opened in one order start in another. Found by the fuzz test under load in CI: the stage
    took the late starter's first op for a late op of an ended stream and dropped it; that request hung."""
    async with stage() as (_, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        mux = RemoteInfer(channel, calls=1)._mux
        opened_first, opened_second = mux.open(5.0), mux.open(5.0)
        opened_second.send(infer_pb2.InferStreamOp(open=infer_pb2.InferRequest(request_id="ok-2")))
        assert await _until_end(opened_second) == (4, 0)
        opened_first.send(infer_pb2.InferStreamOp(open=infer_pb2.InferRequest(request_id="ok-3")))
        assert await _until_end(opened_first) == (6, 0)
        # One that never sends anything neither holds nor cancels anything on the call.
        never = mux.open(5.0)
        never.close()
        after = mux.open(5.0)
        after.send(infer_pb2.InferStreamOp(open=infer_pb2.InferRequest(request_id="ok-1")))
        assert await _until_end(after) == (2, 0)


async def test_a_lost_call_fails_exactly_its_requests_and_a_new_call_serves_again() -> None:
    async with stage() as (_servicer, server, port):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_reconnect_backoff_ms", 200)])
        infer = RemoteInfer(channel, calls=1)
        infer._mux.REOPEN_AFTER = 0.0  # type: ignore[misc]
        tasks = [asyncio.create_task(run(infer, f"hang-{i}")) for i in range(6)]
        await asyncio.sleep(0.3)
        await server.stop(None)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert all(outcome.startswith("UNAVAILABLE") for _, outcome in results), results
    async with stage(port) as (_, _, _):
        assert (await run(infer, "ok-2"))[1] == "LENGTH"
    await channel.close()


async def test_a_draining_stage_refuses_new_requests_and_ends_its_calls_once_theirs_are_done() -> None:
    async with stage() as (servicer, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = RemoteInfer(channel, calls=1)
        running = asyncio.create_task(run(infer, "wait-4"))
        await asyncio.sleep(0.2)
        await servicer.mux.drain(5.0)
        refused = await run(infer, "ok-2")
        assert refused == ([], "UNAVAILABLE: the infer stage is draining")
        servicer.release.set()
        ids, outcome = await running
        assert outcome == "LENGTH" and len(ids) == 8
        # The call ended (OK) once its request was done: the next request opens a new one, still refused.
        await asyncio.sleep(0.1)
        assert (await run(infer, "ok-1"))[1].startswith("UNAVAILABLE")


def test_error_statuses_map_back_to_the_domain_errors() -> None:
    from llmmesh.common.mux import error_of
    from llmmesh.stages.v1 import streams_pb2

    assert isinstance(error_of(streams_pb2.StreamStatus(code=14, message="x")), Unavailable)
    assert isinstance(error_of(streams_pb2.StreamStatus(code=4, message="x")), DeadlineExceeded)
    other = error_of(streams_pb2.StreamStatus(code=3, message="field: bad"))
    assert other.code == grpc.StatusCode.INVALID_ARGUMENT and str(other) == "field: bad"


async def test_a_request_cancelled_before_its_task_runs_is_counted_and_does_not_hold_the_call_open() -> None:
    """A stream whose open and cancel reach the stage in one frame: the stage starts the request's task and
    cancels it before it ever ran, so none of the task's own code runs. Its bookkeeping must still end: the
    request is counted CANCELLED, and the call ends once the gateway ends its side (the call was kept open
    forever before, one more each time a call with such a request was retired)."""
    async with stage() as (_, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        mux = RemoteInfer(channel, calls=1)._mux
        mux.alone = lambda op: False  # as postprocess's first ops: an open shares a frame with what follows
        cancelled_before = RPCS.labels(METHOD, "CANCELLED")._value.get()
        warm = mux.open(5.0)
        warm.send(infer_pb2.InferStreamOp(open=infer_pb2.InferRequest(request_id="ok-1")))
        assert await _until_end(warm) == (2, 0)
        conn = warm._conn
        stream = mux.open(5.0)
        stream.send(infer_pb2.InferStreamOp(open=infer_pb2.InferRequest(request_id="hang-9")))
        stream.close()  # the open and the cancel leave in one frame
        for _ in range(100):
            if RPCS.labels(METHOD, "CANCELLED")._value.get() > cancelled_before:
                break
            await asyncio.sleep(0.02)
        assert RPCS.labels(METHOD, "CANCELLED")._value.get() - cancelled_before == 1
        conn.retire()  # no stream left: the gateway ends its side, the stage then ends the call
        for _ in range(100):
            if not conn.alive:
                break
            await asyncio.sleep(0.02)
        assert not conn.alive, "the stage kept the call open"


async def test_a_stage_that_cannot_read_its_ops_fails_the_call_at_once() -> None:
    """If reading a call's ops fails, the requests on the call fail at once with the call's error (and it is
    logged), rather than the call going deaf: its running requests went on, and every request sent on it
    later waited for its deadline."""
    async with stage() as (servicer, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = RemoteInfer(channel, calls=1)
        running = asyncio.create_task(run(infer, "hang-7", timeout=30))
        await asyncio.sleep(0.2)
        poisoned = await asyncio.wait_for(run(infer, "poison", timeout=30), 5)
        assert poisoned[1].startswith("INTERNAL"), poisoned
        assert (await asyncio.wait_for(running, 5))[1].startswith("INTERNAL")
        assert servicer.cancelled == ["hang-7"]
        # The next request opens a new call and is served.
        assert (await asyncio.wait_for(run(infer, "ok-2"), 5))[1] == "LENGTH"


async def test_a_request_waits_for_a_stage_that_is_coming_back() -> None:
    """Found by the drain fault test in CI: right after infer restarted, postprocess's channel to it was
    still in reconnect backoff and every request failed UNAVAILABLE at once (the gateway waits up to its
    connect timeout for a stage's channel; postprocess, reading infer itself, did not). A request now waits
    for the channel up to `connect_timeout`."""
    from llmmesh.launcher import free_port

    port = free_port()
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        infer = RemoteInfer(channel, calls=1, connect_timeout=5.0)
        with pytest.raises(LlmmeshError):  # nothing there yet: the connect timeout, not a hang
            await run_raising(RemoteInfer(channel, calls=1, connect_timeout=0.3), "ok-1")
        async with stage(port):
            assert await asyncio.wait_for(run(infer, "ok-2"), 10) == (
                [hash("ok-2") % 1000, 0, hash("ok-2") % 1000, 1],
                "LENGTH",
            )


async def run_raising(infer: RemoteInfer, rid: str) -> None:
    async for _ in infer.generate(infer_pb2.InferRequest(request_id=rid), 5.0):
        pass
