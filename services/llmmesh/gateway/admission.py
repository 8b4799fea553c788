"""Admission control: a bounded number of generations in flight, a bounded priority queue, per-client rates.

A request is admitted at once while fewer than `max_inflight` generations run; otherwise it waits in a
queue of at most `max_queued` requests, INTERACTIVE ahead of BATCH (first come, first served within a
class). When the queue is full an INTERACTIVE arrival takes the place of the newest queued BATCH request
(which is shed); otherwise the arrival is refused at once. A freed slot goes straight to the head of the
queue. A waiter whose client goes away (its task is cancelled) or whose deadline passes leaves the queue
at once. Refusals are `ResourceExhausted` errors that carry how long to wait before trying again.

Per-client rate limits are token buckets keyed by the caller's identity: `rate` tokens a second up to
`burst`; a request takes one token or is refused with the time until the next one. No grpc here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmmesh.common import metrics
from llmmesh.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

__all__ = [
    "AdmissionController",
    "AdmissionLimits",
    "Priority",
    "RateLimiter",
    "Rejected",
    "check_request_id",
    "priority_from_proto",
]


class Priority(enum.IntEnum):
    """Scheduling class; the values are llmmesh.v1.Priority's (UNSPECIFIED counts as INTERACTIVE)."""

    INTERACTIVE = 1
    BATCH = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def priority_from_proto(value: int) -> Priority:
    """llmmesh.v1.Priority as sent (0 = INTERACTIVE); an unknown enum number is bad input."""
    if value == 0:
        return Priority.INTERACTIVE
    try:
        return Priority(value)
    except ValueError:
        raise InvalidArgument("priority", f"unknown priority {value}; expected 0 (unspecified), 1 or 2") from None


MAX_REQUEST_ID_CHARS = 128
# Printable ASCII without spaces: the id goes into logs, trace attributes and Triton's request id as is.
_REQUEST_ID = re.compile(r"[\x21-\x7e]*")


def check_request_id(request_id: str, field: str = "request_id") -> None:
    """request_id (or idempotency_key): empty or 1-128 printable ASCII characters, no spaces."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(field, f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if not _REQUEST_ID.fullmatch(request_id):
        bad = next(c for c in request_id if not ("\x21" <= c <= "\x7e"))
        raise InvalidArgument(field, f"only printable ASCII without spaces is allowed, got {bad!r} (U+{ord(bad):04X})")


class Rejected(ResourceExhausted):
    """Refused by admission control; `retry_after` (seconds) says when trying again makes sense."""

    def __init__(self, message: str, reason: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.reason = reason


@dataclass(frozen=True)
class AdmissionLimits:
    max_inflight: int = 256
    max_queued: int = 1024
    # Per-client token bucket: tokens a second and bucket size; 0 = no rate limit.
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 0


class RateLimiter:
    """Token buckets keyed by client identity. Full buckets are forgotten (a full bucket is a new one)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = max(burst, 1) if rate > 0 else 0
        self._clock = clock
        # identity -> (tokens, at): least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def take(self, client: str) -> float:
        """Takes one token; returns 0.0 when taken, else the seconds until a token is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.pop(client, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - at) * self._rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            self._forget_full(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self._rate

    def _forget_full(self, now: float) -> None:
        # Oldest first: a bucket untouched for burst/rate seconds is full again and need not be kept.
        refill = self._burst / self._rate
        while self._buckets:
            client, (_, at) = next(iter(self._buckets.items()))
            if now - at < refill:
                break
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


class _Waiter:
    __slots__ = ("future", "priority", "queued_at")

    def __init__(self, priority: Priority, queued_at: float) -> None:
        self.priority = priority
        self.queued_at = queued_at
        # Set to True when granted a slot; to an exception when shed from the queue.
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


class AdmissionController:
    """Bounded in-flight generations with a bounded two-class priority queue, and per-client rate limits."""

    def __init__(self, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        if limits.max_inflight < 1 or limits.max_queued < 0:
            raise ValueError("max_inflight must be >= 1 and max_queued >= 0")
        self._limits = limits
        self._clock = clock
        self._rates = RateLimiter(limits.rate_limit_per_second, limits.rate_limit_burst, clock)
        self._inflight = 0
        self._queues: dict[Priority, deque[_Waiter]] = {p: deque() for p in Priority}
        # Moving average of how long an admitted request holds its slot: the basis of retry-after hints.
        self._hold_seconds: float | None = None

    @property
    def inflight(self) -> int:
        return self._inflight

    def queued(self, priority: Priority | None = None) -> int:
        if priority is None:
            return sum(len(q) for q in self._queues.values())
        return len(self._queues[priority])

    @contextlib.asynccontextmanager
    async def admit(self, client: str, priority: Priority, timeout: float | None = None) -> AsyncIterator[None]:
        """Holds one in-flight slot for the body; waits in the queue (at most `timeout` s) or is refused."""
        wait = self._rates.take(client)
        if wait > 0:
            self._reject("rate_limited", f"rate limit exceeded for this client: {self._rate_text()}", wait)
        queued_for = await self._acquire(priority, timeout)
        metrics.ADMISSION_QUEUE_WAIT.labels(priority.label).observe(queued_for)
        started = self._clock()
        try:
            yield
        finally:
            self._learn(self._clock() - started)
            self._release()

    async def _acquire(self, priority: Priority, timeout: float | None) -> float:
        if self._inflight < self._limits.max_inflight and not self.queued():
            self._inflight += 1
            return 0.0
        if self.queued() >= self._limits.max_queued and not self._shed_batch_for(priority):
            self._reject("capacity", self._capacity_text(), self._retry_after())
        waiter = _Waiter(priority, self._clock())
        self._queues[priority].append(waiter)
        self._gauge(priority)
        try:
            if timeout is None:
                await waiter.future
            else:
                await asyncio.wait_for(asyncio.shield(waiter.future), max(timeout, 0.0))
        except TimeoutError:
            self._leave(waiter)
            raise DeadlineExceeded("deadline exceeded while waiting in the gateway's queue") from None
        except asyncio.CancelledError:
            self._leave(waiter)
            raise
        return self._clock() - waiter.queued_at

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gives up: out of the queue, or, if a slot was granted meanwhile, the slot goes on."""
        queue = self._queues[waiter.priority]
        if waiter in queue:
            queue.remove(waiter)
            self._gauge(waiter.priority)
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            self._release()
        if not waiter.future.done():
            waiter.future.cancel()

    def _shed_batch_for(self, priority: Priority) -> bool:
        """The queue is full: an interactive arrival sheds the newest queued batch request, if any."""
        batch = self._queues[Priority.BATCH]
        if priority is not Priority.INTERACTIVE or not batch:
            return False
        victim = batch.pop()
        self._gauge(Priority.BATCH)
        metrics.ADMISSION_REJECTIONS.labels("shed").inc()
        victim.future.set_exception(
            Rejected(
                f"{self._capacity_text()}; this batch request gave its place to an interactive one",
                "shed",
                self._retry_after(),
            )
        )
        return True

    def _release(self) -> None:
        # The slot passes to the head of the queue (interactive first), or becomes free.
        for priority in Priority:
            queue = self._queues[priority]
            while queue:
                waiter = queue.popleft()
                self._gauge(priority)
                if not waiter.future.done():
                    waiter.future.set_result(True)
                    return
        self._inflight -= 1

    def _gauge(self, priority: Priority) -> None:
        metrics.ADMISSION_QUEUE_DEPTH.labels(priority.label).set(len(self._queues[priority]))

    def _learn(self, held: float) -> None:
        self._hold_seconds = held if self._hold_seconds is None else 0.8 * self._hold_seconds + 0.2 * held

    def _retry_after(self) -> float:
        """Roughly when a slot for a new arrival frees up: the queue ahead drains at max_inflight per hold time."""
        if self._hold_seconds is None:
            return 1.0
        ahead = self.queued() + 1
        return min(60.0, max(0.1, self._hold_seconds * ahead / self._limits.max_inflight))

    def _capacity_text(self) -> str:
        return f"gateway at capacity: {self._inflight} in flight, {self.queued()} queued"

    def _rate_text(self) -> str:
        limits = self._limits
        return f"{limits.rate_limit_per_second:g} requests/s, burst {max(limits.rate_limit_burst, 1)}"

    @staticmethod
    def _reject(reason: str, message: str, retry_after: float) -> None:
        metrics.ADMISSION_REJECTIONS.labels(reason).inc()
        raise Rejected(message, reason, math.ceil(retry_after * 1000) / 1000)
