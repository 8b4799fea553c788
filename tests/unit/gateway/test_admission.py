from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from llmmesh.client.retry import retry_after_from_metadata
from llmmesh.common.errors import DeadlineExceeded, InvalidArgument, StatusInterceptor
from llmmesh.gateway.admission import (
    AdmissionController,
    AdmissionLimits,
    Priority,
    RateLimiter,
    Rejected,
    check_request_id,
    priority_from_proto,
)
from llmmesh.gateway.servicer import GatewayServicer
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

INT, BAT = Priority.INTERACTIVE, Priority.BATCH


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Holder:
    """Runs `admit` in a task and holds the slot until released; records the order of admission."""

    def __init__(self, ctl: AdmissionController, order: list[str]) -> None:
        self._ctl = ctl
        self._order = order
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, priority: Priority, timeout: float | None = None, client: str = "c") -> None:
        self._release[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._run(name, priority, timeout, client))

    async def _run(self, name: str, priority: Priority, timeout: float | None, client: str) -> None:
        async with self._ctl.admit(client, priority, timeout):
            self._order.append(name)
            await self._release[name].wait()

    def release(self, name: str) -> None:
        self._release[name].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def holding(ctl: AdmissionController) -> AsyncIterator[tuple[Holder, list[str]]]:
    order: list[str] = []
    holder = Holder(ctl, order)
    try:
        yield holder, order
    finally:
        for task in holder.tasks.values():
            task.cancel()
        await asyncio.gather(*holder.tasks.values(), return_exceptions=True)


async def test_admits_at_once_up_to_max_inflight_then_queues() -> None:
    """Up to max_inflight requests run at once; the next one waits until a slot frees."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=2, max_queued=4))
    async with holding(ctl) as (h, order):
        for name in ("a", "b", "c"):
            h.start(name, INT)
        await settle()
        assert order == ["a", "b"] and ctl.inflight == 2 and ctl.queued() == 1
        h.release("a")
        await settle()
        assert order == ["a", "b", "c"] and ctl.inflight == 2 and ctl.queued() == 0


async def test_interactive_is_admitted_before_batch_and_fifo_within_a_class() -> None:
    """Waiting interactive requests go first, in arrival order; then batch ones, in arrival order."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=10))
    async with holding(ctl) as (h, order):
        h.start("run", BAT)
        await settle()
        for name, priority in (("b1", BAT), ("i1", INT), ("b2", BAT), ("i2", INT), ("b3", BAT)):
            h.start(name, priority)
            await settle()
        assert ctl.queued(INT) == 2 and ctl.queued(BAT) == 3
        for name in ("run", "i1", "i2", "b1", "b2"):
            h.release(name)
            await settle()
        assert order == ["run", "i1", "i2", "b1", "b2", "b3"]


async def test_a_full_queue_refuses_at_once_with_retry_information() -> None:
    """Beyond max_inflight + max_queued the request is refused immediately, saying what was exhausted."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=2, max_queued=2))
    async with holding(ctl) as (h, _):
        for name in ("a", "b", "c", "d"):
            h.start(name, INT)
        await settle()
        with pytest.raises(Rejected) as err:
            async with ctl.admit("c", INT):
                pass
        assert str(err.value) == "gateway at capacity: 2 in flight, 2 queued"
        assert err.value.reason == "capacity" and err.value.retry_after is not None and err.value.retry_after > 0


async def test_interactive_arrival_sheds_the_newest_queued_batch_request() -> None:
    """With the queue full, an interactive request takes the place of the newest batch one, which is refused."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=2))
    async with holding(ctl) as (h, order):
        h.start("run", BAT)
        h.start("b1", BAT)
        h.start("b2", BAT)
        await settle()
        h.start("i1", INT)
        await settle()
        with pytest.raises(Rejected) as err:
            await h.tasks["b2"]
        assert err.value.reason == "shed"
        h.release("run")
        await settle()
        h.release("i1")
        await settle()
        assert order == ["run", "i1", "b1"]


async def test_a_full_queue_of_interactive_requests_refuses_interactive_too() -> None:
    """Nothing is shed for an interactive arrival when no batch request waits."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=1))
    async with holding(ctl) as (h, _):
        h.start("run", INT)
        h.start("i1", INT)
        await settle()
        with pytest.raises(Rejected):
            async with ctl.admit("c", INT):
                pass
        assert ctl.queued() == 1


async def test_a_cancelled_waiter_leaves_the_queue_at_once() -> None:
    """A queued request whose client goes away is removed; the freed slot goes to the next waiter."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=4))
    async with holding(ctl) as (h, order):
        h.start("run", INT)
        h.start("gone", INT)
        h.start("next", INT)
        await settle()
        h.tasks["gone"].cancel()
        await settle()
        assert ctl.queued() == 1
        h.release("run")
        await settle()
        assert order == ["run", "next"] and ctl.inflight == 1


async def test_a_waiter_whose_deadline_passes_leaves_the_queue() -> None:
    """A queued request that runs out of time fails with DEADLINE_EXCEEDED and frees its place."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=4))
    async with holding(ctl) as (h, _):
        h.start("run", INT)
        await settle()
        with pytest.raises(DeadlineExceeded):
            async with ctl.admit("c", INT, timeout=0.01):
                pass
        assert ctl.queued() == 0 and ctl.inflight == 1


async def test_a_slot_is_released_when_the_body_fails() -> None:
    """An admitted request that raises gives its slot back."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=0))
    with pytest.raises(RuntimeError):
        async with ctl.admit("c", INT):
            raise RuntimeError("boom")
    assert ctl.inflight == 0
    async with ctl.admit("c", INT):
        assert ctl.inflight == 1


async def test_a_slot_granted_to_a_cancelled_waiter_passes_on() -> None:
    """If a waiter is cancelled just after it was granted a slot, the slot goes to the next waiter."""
    ctl = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=4))
    async with holding(ctl) as (h, order):
        h.start("run", INT)
        h.start("late", INT)
        h.start("next", INT)
        await settle()
        h.release("run")
        await asyncio.sleep(0)  # "run" leaves and grants "late"'s future ...
        h.tasks["late"].cancel()  # ... but "late" is cancelled before it resumes
        await settle()
        assert ctl.inflight == 1 and ctl.queued() == 0
        assert order == ["run", "next"]


def test_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    """burst requests pass at once; then one per 1/rate seconds, with the exact wait reported."""
    clock = FakeClock()
    bucket = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)
    assert bucket.take("b") == 0.0  # another client has its own bucket
    clock.now += 0.25
    assert bucket.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take("a") == 0.0
    clock.now += 10
    assert [bucket.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled up to burst, not beyond


def test_token_bucket_forgets_full_buckets() -> None:
    """Buckets untouched long enough to be full again are dropped, so memory stays bounded."""
    clock = FakeClock()
    bucket = RateLimiter(rate=10.0, burst=1, clock=clock)
    for i in range(100):
        bucket.take(f"client-{i}")
    clock.now += 1.0
    bucket.take("fresh")
    assert len(bucket) == 1


def test_rate_zero_means_no_limit() -> None:
    """rate 0 turns the limiter off."""
    bucket = RateLimiter(rate=0.0, burst=0)
    assert not bucket.enabled and all(bucket.take("a") == 0.0 for _ in range(1000))


async def test_rate_limited_client_is_refused_with_the_time_until_a_token() -> None:
    """A client over its rate gets RESOURCE_EXHAUSTED with retry_after = time to its next token."""
    clock = FakeClock()
    ctl = AdmissionController(AdmissionLimits(rate_limit_per_second=1.0, rate_limit_burst=2), clock=clock)
    for _ in range(2):
        async with ctl.admit("alice", INT):
            pass
    with pytest.raises(Rejected) as err:
        async with ctl.admit("alice", INT):
            pass
    assert err.value.reason == "rate_limited" and err.value.retry_after == pytest.approx(1.0)
    assert "rate limit exceeded" in str(err.value)
    async with ctl.admit("bob", INT):
        pass
    clock.now += 1.0
    async with ctl.admit("alice", INT):
        pass


def test_priority_values() -> None:
    """UNSPECIFIED is interactive; unknown enum numbers are refused naming the field."""
    assert priority_from_proto(0) is INT and priority_from_proto(1) is INT and priority_from_proto(2) is BAT
    for bad in (3, -1, 1 << 20):
        with pytest.raises(InvalidArgument, match=r"^priority: "):
            priority_from_proto(bad)


@pytest.mark.parametrize("good", ["", "abc-123", "a" * 128, "user/7:turn=3", "0f" * 16])
def test_request_ids_accepted(good: str) -> None:
    """Printable ASCII ids up to 128 characters are fine (and empty: the gateway makes one up)."""
    check_request_id(good)


@pytest.mark.parametrize("bad", ["a" * 129, "has space", "tab\there", "nul\x00", "é", "line\n", "\x85"])
def test_request_ids_refused(bad: str) -> None:
    """Too long, spaces, controls and non-ASCII are refused naming request_id."""
    with pytest.raises(InvalidArgument, match=r"^request_id: "):
        check_request_id(bad)


class _FakeOrchestrator:
    """Stands in for the stages: the test is about the servicer's admission, not generation."""

    async def generate(
        self, request: object, timeout: float | None, arrived: float | None = None, caller: str = ""
    ) -> AsyncIterator[object]:
        yield generation_pb2.GenerateResponse(final=generation_pb2.Final(request_id="x"))


async def test_gateway_refusal_carries_retry_info_and_trailers() -> None:
    """Through the real servicer and status interceptor: a rate-limited call gets RetryInfo and retry-after trailers."""
    clock = FakeClock()
    admission = AdmissionController(AdmissionLimits(rate_limit_per_second=0.5, rate_limit_burst=1), clock=clock)
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GatewayServicer(_FakeOrchestrator(), admission),  # type: ignore[arg-type]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateRequest(prompt="Hi")
            assert [r.HasField("final") async for r in stub.Generate(request, timeout=5)] == [True]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(request, timeout=5):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (err.value.details() or "").startswith("rate limit exceeded for this client")
            trailers = dict(err.value.trailing_metadata() or ())
            assert trailers["retry-after"] == "2" and trailers["retry-after-ms"] == "2000"
            assert "grpc-status-details-bin" in trailers
            assert retry_after_from_metadata(err.value.trailing_metadata() or ()) == pytest.approx(2.0)
            bad = generation_pb2.GenerateRequest(prompt="Hi", priority=5)  # type: ignore[arg-type]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(bad, timeout=5):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith("priority: unknown priority 5")
    finally:
        await server.stop(0)
