"""The gateway's work: one request through preprocess, infer and postprocess, relayed as it streams.

    client ─► Preprocess.prepare ─► Infer.generate (token ids) ─► Postprocess.process (text) ─► client

The stages are interfaces (`llmmesh.gateway.stages`): in this process or behind gRPC, the orchestrator
cannot tell. One request is one task group: a pump task moves infer's token ids into a feed, postprocess
reads the feed, and this generator relays postprocess's text to the caller. Every exit — the answer's end,
a stop string or filter (postprocess ends early), the caller gone, an error — cancels the pump (and with
it infer's call, so the Triton request) before anything else is awaited. Every call gets the time that
remains of the caller's deadline.

Retries, only before the caller has a chunk and only for a lost stage (`Unavailable`; a status that is
the request's own answer is never retried): Prepare once more; infer's stream once more until its first
response; postprocess's stream re-opened once, replaying the feed from its start. With several replicas
the retry goes where the stage's round-robin channel points next. Once a chunk was sent nothing is
retried: a second generation could contradict it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry import trace

from llmmesh.common import metrics
from llmmesh.common.errors import DeadlineExceeded, LlmmeshError, Unavailable
from llmmesh.common.logging import get_logger
from llmmesh.common.registry import ModelEntry
from llmmesh.common.telemetry import set_attributes
from llmmesh.gateway.routing import Cascade, Pick, Plan, Router
from llmmesh.gateway.stages import Stages, generate_retried
from llmmesh.stages.v1 import infer_pb2, postprocess_pb2, preprocess_pb2
from llmmesh.v1 import generation_pb2

__all__ = ["HOP_ORDERS", "SHARING_SCOPES", "Orchestrator", "with_request_id"]

log = get_logger(__name__)
_T = TypeVar("_T")

# Who may share a generation (join it in flight, replay its cached result): callers with the same
# identity only, or every caller of the mesh.
SHARING_SCOPES = ("caller", "global")
# Who reads infer's token ids: the gateway, which relays them to postprocess (default), or postprocess itself.
HOP_ORDERS = ("gateway", "postprocess")


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded")
        return left


class _Feed:
    """What postprocess reads: Start, Tokens..., End. Kept whole, so that a postprocess stream opened again
    (a retry before the first chunk) reads it from the start; ended without End when the generation failed."""

    def __init__(self) -> None:
        self._messages: list[postprocess_pb2.ProcessRequest] = []
        self._closed = False
        self._changed = asyncio.Event()
        # How far the furthest reader got, and an event set when it moves on.
        self._read = 0
        self._progress = asyncio.Event()
        # Readers that take each message as it is put (a multiplexed stage stream's sender), no task between.
        self._listeners: list[Callable[[postprocess_pb2.ProcessRequest | None], None]] = []

    def put(self, message: postprocess_pb2.ProcessRequest) -> None:
        self._messages.append(message)
        for listener in self._listeners:
            listener(message)
        self._wake()

    async def caught_up(self) -> None:
        """Waits until postprocess has taken all but the last message put: the pump reads infer no faster
        than postprocess takes tokens, so a lagging reader gets infer's coalesced batches (several ids per
        message), as a direct write to the stream would, instead of a backlog of single ids."""
        while self._read < len(self._messages) - 1:
            self._progress.clear()
            await self._progress.wait()

    def close(self) -> None:
        self._closed = True
        for listener in self._listeners:
            listener(None)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def reader(self) -> _FeedReader:
        """The messages from the first on: each reader (each postprocess stream) has its own position."""
        return _FeedReader(self)


class _FeedReader:
    """An iterator, not an async generator: whoever drops it (grpc's writer task, a stage that returned)
    leaves nothing to be closed or finalized."""

    def __init__(self, feed: _Feed) -> None:
        self._feed = feed
        self._next = 0

    def __aiter__(self) -> _FeedReader:
        return self

    async def __anext__(self) -> postprocess_pb2.ProcessRequest:
        feed = self._feed
        while self._next >= len(feed._messages):
            if feed._closed:
                raise StopAsyncIteration
            await feed._changed.wait()
        self._next += 1
        self._taken()
        return feed._messages[self._next - 1]

    def _taken(self) -> None:
        feed = self._feed
        if self._next > feed._read:
            feed._read = self._next
            feed._progress.set()

    def listen(self, listener: Callable[[postprocess_pb2.ProcessRequest | None], None]) -> Callable[[], None]:
        """Calls `listener` with each message from this reader's position on, as it is put (None once the feed
        is closed), instead of being iterated; returns the function that stops it."""
        feed = self._feed

        def deliver(message: postprocess_pb2.ProcessRequest | None) -> None:
            if message is not None:
                self._next += 1
                self._taken()
            listener(message)

        while self._next < len(feed._messages):
            deliver(feed._messages[self._next])
        if feed._closed:
            listener(None)
            return lambda: None
        feed._listeners.append(deliver)
        return lambda: feed._listeners.remove(deliver) if deliver in feed._listeners else None


@dataclass
class _Generation:
    """What the pump learnt from infer: how the tokens were produced, and the failure that ended it."""

    reuse: generation_pb2.Reuse = generation_pb2.REUSE_UNSPECIFIED
    error: BaseException | None = None
    # A text backend's own prompt token count (an OpenAI-compatible endpoint tokenizes the prompt itself).
    prompt_tokens: int = 0


class _Escalate(Exception):
    """A cascade's first model was not confident enough: its answer is dropped before any text was sent."""

    def __init__(self, mean: float, tokens: int) -> None:
        super().__init__(f"mean log-probability {mean:.2f}")
        self.mean = mean
        self.tokens = tokens


@dataclass
class _Gate:
    """A cascade's check: the first `check_tokens` tokens are held back until their mean log-probability
    says whether this model answers or the cascade escalates."""

    check_tokens: int
    threshold: float
    tokens: int = 0
    log_probs: list[float] = field(default_factory=list)
    mean: float | None = None
    decided: bool = False

    def add(self, response: infer_pb2.InferResponse) -> None:
        self.tokens += len(response.token_ids)
        self.log_probs.extend(response.log_probs)

    @property
    def full(self) -> bool:
        return self.tokens >= self.check_tokens

    def decide(self) -> None:
        """Raises _Escalate when the tokens seen are not confident enough; tokens without log-probabilities
        (an answer replayed from the cache: completed answers only, so one that passed) are kept."""
        self.decided = True
        probs = self.log_probs[: self.check_tokens]
        if probs:
            self.mean = sum(probs) / len(probs)
            if self.mean < self.threshold:
                raise _Escalate(self.mean, self.tokens)

    def describe(self) -> str:
        if self.mean is None:
            return "kept (no log-probabilities: a replayed answer)"
        return f"kept (mean logprob {self.mean:.2f} >= {self.threshold:g})"


@dataclass
class _Times:
    """When the answer that reached the caller passed each point (time.monotonic())."""

    started: float
    handed: float = 0.0
    first_token: float | None = None
    first_speakable: float | None = None
    # The cost of answers a cascade dropped on its way to this one.
    dropped_cost: float = 0.0


def with_request_id(request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
    """The request itself when it has an id, else a copy with a new one (the caller's message is not changed)."""
    if request.request_id:
        return request
    named = generation_pb2.GenerateRequest()
    named.CopyFrom(request)
    named.request_id = uuid.uuid4().hex
    return named


def _for_model(request: generation_pb2.GenerateRequest, model: str) -> generation_pb2.GenerateRequest:
    """The request as preprocess sees it once a route chose `model`."""
    if request.model == model:
        return request
    chosen = generation_pb2.GenerateRequest()
    chosen.CopyFrom(request)
    chosen.model = model
    return chosen


def _first_model(plan: Plan | None) -> ModelEntry | None:
    """The model a plan tries first: a pick's, a cascade's first, a fallback's first option's."""
    if plan is None:
        return None
    if isinstance(plan, Pick):
        return plan.model
    if isinstance(plan, Cascade):
        return plan.first
    return _first_model(plan.options[0]) if plan.options else None


class _PromptVerdict(Exception):
    """The prompt's deferred verdict ended the answer: it blocked (`category`) or could not be had (`error`)."""

    def __init__(self, category: str = "", error: LlmmeshError | None = None) -> None:
        super().__init__(category or str(error))
        self.category, self.error = category, error


async def _held(
    outputs: AsyncGenerator[postprocess_pb2.ProcessResponse, None],
    verdict: asyncio.Future[preprocess_pb2.CheckPromptResponse],
) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
    """`outputs`, none of it before the prompt's verdict has passed. A verdict that blocks or fails raises
    _PromptVerdict as soon as it comes, even while the first output is still awaited (the generation is
    then stopped at once, not at its first token)."""
    first: asyncio.Future[postprocess_pb2.ProcessResponse] | None = None
    try:
        while not verdict.done():
            if first is None:
                first = asyncio.ensure_future(anext(outputs))
            either: tuple[asyncio.Future[Any], ...] = (first, verdict)
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                await asyncio.wait((verdict,))  # an output is in: hold it for the verdict
        try:
            category = verdict.result().blocked_category
        except LlmmeshError as exc:
            raise _PromptVerdict(error=exc) from None
        if category:
            raise _PromptVerdict(category)
        if first is not None:
            try:
                yield await first
            except StopAsyncIteration:
                return
            first = None
        async for response in outputs:
            yield response
    finally:
        if first is not None:
            first.cancel()  # the stage's stream ends with it; then it can be closed
            await asyncio.wait((first,))
            _retrieved(first)
        await outputs.aclose()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a dropped task's outcome as seen (asyncio would log an exception nobody retrieved)."""
    if not task.cancelled():
        task.exception()


def _prompt_blocked(
    prepared: preprocess_pb2.PrepareResponse, category: str, times: _Times, request_id: str
) -> generation_pb2.GenerateResponse:
    """The answer to a prompt the safety policy blocked: a result, not an error; nothing of it released."""
    final = generation_pb2.Final(
        finish_reason=generation_pb2.FINISH_REASON_CONTENT_FILTER,
        usage=generation_pb2.Usage(prompt_tokens=len(prepared.input_ids)),
        timings=generation_pb2.Timings(total_ms=_ms(times.started, time.monotonic())),
        request_id=request_id,
        model=prepared.model,
        filter_category=category,
    )
    return generation_pb2.GenerateResponse(final=final)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)


def _label(plan: Plan) -> str:
    if isinstance(plan, Pick):
        return plan.model.name
    if isinstance(plan, Cascade):
        return plan.first.name
    return plan.route.name


# Reuse kinds whose tokens the model did not generate for this request.
_SAVED = (generation_pb2.REUSE_JOINED_IN_FLIGHT, generation_pb2.REUSE_CACHE_HIT, generation_pb2.REUSE_DEDUPLICATED)

# A fallback route skips a target that failed with these before its first chunk: lost or not reachable,
# overloaded, or not serving that model (whether the error was raised here or answered by a remote stage).
_SKIPPABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)


class Orchestrator:
    def __init__(
        self,
        stages: Stages,
        sharing_scope: str = "global",
        router: Router | None = None,
        hop_order: str = "postprocess",
    ) -> None:
        """Without a `router` a request's model goes to preprocess as it is (no routes, no prices).
        `hop_order` "postprocess": a remote postprocess reads a plain answer's tokens from infer itself
        (Start.infer) instead of the gateway relaying them; cascades and fallbacks with a first-token
        timeout keep the gateway's order (they watch infer's stream themselves)."""
        if sharing_scope not in SHARING_SCOPES:
            raise ValueError(f"sharing_scope must be one of {SHARING_SCOPES}, got {sharing_scope!r}")
        if hop_order not in HOP_ORDERS:
            raise ValueError(f"hop_order must be one of {HOP_ORDERS}, got {hop_order!r}")
        self._stages = stages
        self._sharing_scope = sharing_scope
        self._router = router
        self._chained = hop_order == "postprocess" and "postprocess" in stages.channels

    async def generate(
        self,
        request: generation_pb2.GenerateRequest,
        timeout: float | None,
        arrived: float | None = None,
        caller: str = "",
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """`arrived` (time.monotonic()) is when the gateway received the request, before admission: the
        timings and queue time count from there. `caller` is the caller's identity: idempotency keys are
        always scoped by it, and shared generations too when the sharing scope is "caller"; a split route
        places the caller in an arm by it; cost metrics are counted per caller."""
        times = _Times(started=time.monotonic() if arrived is None else arrived)
        deadline = _Deadline(timeout)
        request = with_request_id(request)
        span = trace.get_current_span()  # the gateway's server span (grpc instrumentation), when tracing
        route, plan = ("", None) if self._router is None else self._router.plan(request, caller)
        await self._stages.connected(deadline.remaining())
        # Why the routes decided as they did, outermost first: filled in as the plan runs.
        reasons: list[str] = []
        if plan is None:
            answer = self._attempt(request, None, deadline, caller, times, span)
        else:
            answer = self._run(plan, request, deadline, caller, times, span, reasons, None)
        async with contextlib.aclosing(answer):
            async for response in answer:
                if response.HasField("final"):
                    final = response.final
                    final.route = " -> ".join(reasons)
                    final.usage.cost = self._cost(final.model, final.usage) + times.dropped_cost
                    _record(span, final, times, time.monotonic(), route, caller)
                yield response

    def _cost(self, model: str, usage: generation_pb2.Usage) -> float:
        if self._router is None:
            return 0.0
        try:
            entry = self._router.registry.resolve(model)
        except LookupError:
            return 0.0
        return entry.price(usage.prompt_tokens, usage.completion_tokens)

    async def _run(
        self,
        plan: Plan,
        request: generation_pb2.GenerateRequest,
        deadline: _Deadline,
        caller: str,
        times: _Times,
        span: trace.Span,
        reasons: list[str],
        first_token_timeout: float | None,
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """One plan's answer; `reasons` gets its part of Final.route before the answer's first message."""
        reasons.extend(plan.why)
        if isinstance(plan, Pick):
            attempt = self._attempt(request, plan.model, deadline, caller, times, span, None, first_token_timeout)
            async with contextlib.aclosing(attempt):
                async for response in attempt:
                    yield response
            return
        mark = len(reasons)
        if isinstance(plan, Cascade):
            route = plan.route
            gate = _Gate(route.check_tokens, route.min_mean_logprob)
            reasons.append(f"{route.name}: cascade: {plan.first.name}")
            attempt = self._attempt(request, plan.first, deadline, caller, times, span, gate, first_token_timeout)
            answered = False
            try:
                async with contextlib.aclosing(attempt):
                    async for response in attempt:
                        answered = True
                        reasons[mark] = f"{route.name}: cascade: {plan.first.name} {gate.describe()}"
                        yield response
                return
            except _Escalate as exc:
                reasons[mark] = (
                    f"{route.name}: cascade: escalated (mean logprob {exc.mean:.2f} < {route.min_mean_logprob:g})"
                )
                log.info("cascade_escalated", request_id=request.request_id, route=route.name, mean=exc.mean)
            except LlmmeshError as exc:
                # A first model that cannot answer (lost, overloaded, not loaded) is passed over like an
                # unsure one, before anything was sent.
                if exc.code not in _SKIPPABLE or answered:
                    raise
                reasons[mark] = f"{route.name}: cascade: {plan.first.name} unavailable ({exc.code.name.lower()})"
                log.info("cascade_skipped", request_id=request.request_id, route=route.name, code=exc.code.name)
            rest = self._run(plan.rest, request, deadline, caller, times, span, reasons, first_token_timeout)
            async with contextlib.aclosing(rest):
                async for response in rest:
                    yield response
            return
        route = plan.route
        timeout = route.first_token_timeout_s or first_token_timeout
        skipped: list[str] = []
        for index, option in enumerate(plan.options):
            del reasons[mark:]
            tried = "".join(f"{s} -> " for s in skipped)
            reasons.append(f"{route.name}: fallback: {tried}{_label(option)}")
            answered = False
            answer = self._run(option, request, deadline, caller, times, span, reasons, timeout)
            try:
                async with contextlib.aclosing(answer):
                    async for response in answer:
                        answered = True
                        yield response
                return
            except LlmmeshError as exc:
                if exc.code not in _SKIPPABLE or answered or index == len(plan.options) - 1:
                    raise
                skipped.append(f"{_label(option)} unavailable ({exc.code.name.lower()})")
                log.info(
                    "fallback",
                    request_id=request.request_id,
                    route=route.name,
                    skipped=_label(option),
                    code=exc.code.name,
                    error=str(exc),
                )

    async def _attempt(
        self,
        request: generation_pb2.GenerateRequest,
        model: ModelEntry | None,
        deadline: _Deadline,
        caller: str,
        times: _Times,
        span: trace.Span,
        gate: _Gate | None = None,
        first_token_timeout: float | None = None,
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """One model's answer: prepare, generate, process. `model` None: the request's own model name."""
        if model is not None:
            request = _for_model(request, model.name)
        request_id = request.request_id
        prepared = await self._prepare(request, deadline, defer_classifier=True)
        set_attributes(
            span,
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": prepared.model,
                "gen_ai.request.max_tokens": prepared.sampling.max_tokens,
                "gen_ai.request.temperature": prepared.sampling.temperature,
                "gen_ai.request.top_p": prepared.sampling.top_p,
                "gen_ai.usage.input_tokens": len(prepared.input_ids),
                "llmmesh.request_id": request_id,
            },
        )
        if prepared.blocked_category:
            # The prompt failed the safety policy: a result, not an error, and nothing is generated.
            times.handed = time.monotonic()
            yield _prompt_blocked(prepared, prepared.blocked_category, times, request_id)
            return
        infer_request = self._infer_request(request, prepared, caller, log_probs=gate is not None)
        times.handed = time.monotonic()
        # The policy checks this prompt with the classifier alongside the model's start: the verdict is
        # awaited before anything of the answer is passed on, and a block cancels the generation.
        verdict = (
            asyncio.ensure_future(self._preprocess(self._stages.preprocess.check_prompt, request, deadline))
            if prepared.prompt_check_pending
            else None
        )
        prompt_blocked = ""
        first_token_at: float | None = None
        first_speakable_at: float | None = None
        done: postprocess_pb2.Done | None = None
        generation = _Generation()
        feed = _Feed()
        failure: LlmmeshError | None = None
        closed = False
        chained = self._chained and gate is None and first_token_timeout is None
        async with asyncio.TaskGroup() as tasks:
            if chained:
                # Postprocess streams the generation from infer itself: Start carries the request, nothing follows.
                feed.put(postprocess_pb2.ProcessRequest(start=self._start(prepared, infer_request)))
                feed.close()
                pump: asyncio.Task[None] | None = None
            else:
                pump = tasks.create_task(
                    self._pump(infer_request, prepared, deadline, feed, generation, gate, first_token_timeout)
                )
            try:
                committed = False
                for attempt in (1, 2):
                    try:
                        outputs = self._stages.postprocess.process(feed.reader(), deadline.remaining())
                        if verdict is not None:
                            outputs = _held(outputs, verdict)
                        async with contextlib.aclosing(outputs):
                            async for response in outputs:
                                if response.HasField("done"):
                                    # Postprocess has ended the answer (maybe early: a stop string, a
                                    # filter): stop the generation now, then read its stream to its end.
                                    done = response.done
                                    if pump is not None:
                                        pump.cancel()
                                    else:
                                        generation.reuse = done.reuse
                                        generation.prompt_tokens = done.prompt_tokens
                                    continue
                                delta = response.delta
                                now = time.monotonic()
                                if first_token_at is None and delta.text:
                                    first_token_at = now
                                    span.add_event("first_token")
                                if first_speakable_at is None and delta.speakable:
                                    first_speakable_at = now
                                committed = True
                                yield generation_pb2.GenerateResponse(
                                    chunk=generation_pb2.Chunk(
                                        text=delta.text, token_ids=delta.token_ids, speakable=delta.speakable
                                    )
                                )
                        break
                    except Unavailable as exc:
                        if committed or done is not None or attempt == 2 or generation.error is not None:
                            raise
                        log.info("stage_retry", stage="postprocess", request_id=request_id, code=exc.code.name)
            except _PromptVerdict as verdict_ended:
                prompt_blocked, failure = verdict_ended.category, verdict_ended.error
            except LlmmeshError as exc:
                failure = exc
            except GeneratorExit:
                # The caller closed this stream (a barge-in, an RPC that ended): leave the group quietly
                # (3.11's TaskGroup would wrap GeneratorExit in an exception group), then end.
                closed = True
            finally:
                # Every exit stops the generation first: infer's call, and with it the Triton request.
                if pump is not None:
                    pump.cancel()
                if verdict is not None:  # a verdict nobody waits for any more
                    verdict.cancel()
                    verdict.add_done_callback(_retrieved)
        if closed:
            raise GeneratorExit
        if prompt_blocked:
            log.info("prompt_blocked_alongside", request_id=request_id, category=prompt_blocked)
            if prepared.shareable:
                with contextlib.suppress(LlmmeshError):
                    await self._stages.infer.forget(infer_request.request_hash)
            yield _prompt_blocked(prepared, prompt_blocked, times, request_id)
            return
        if done is None:
            if isinstance(generation.error, _Escalate) and model is not None:
                # What the dropped answer cost is part of the request's cost.
                times.dropped_cost += model.price(len(prepared.input_ids), generation.error.tokens)
            # The generation's own failure explains a postprocess stream that ended without a result.
            raise generation.error or failure or Unavailable("postprocess ended the stream without a result")
        if done.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER and prepared.shareable:
            # Filtered text is never served from the result cache.
            with contextlib.suppress(LlmmeshError):
                await self._stages.infer.forget(infer_request.request_hash)
        if done.token_ids and done.finish_reason in (
            generation_pb2.FINISH_REASON_STOP,
            generation_pb2.FINISH_REASON_LENGTH,
        ):
            # Ids whose text was empty (e.g. a trailing special token) still belong to the answer.
            yield generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(token_ids=done.token_ids))
        times.first_token, times.first_speakable = first_token_at, first_speakable_at
        finished = time.monotonic()
        started = times.started
        final = generation_pb2.Final(
            finish_reason=done.finish_reason,
            # What the answer consumed, counted by postprocess the same way on every run (Usage's doc comment);
            # a text backend's prompt as the endpoint counted it.
            usage=generation_pb2.Usage(
                prompt_tokens=generation.prompt_tokens or len(prepared.input_ids),
                completion_tokens=done.completion_tokens,
            ),
            timings=generation_pb2.Timings(
                queue_ms=_ms(started, times.handed),
                time_to_first_token_ms=_ms(started, first_token_at) if first_token_at else 0.0,
                total_ms=_ms(started, finished),
                time_to_first_speakable_chunk_ms=_ms(started, first_speakable_at) if first_speakable_at else 0.0,
            ),
            request_id=request_id,
            model=prepared.model,
            matched_stop=done.matched_stop,
            filter_category=done.filter_category,
            reuse=generation.reuse,
            reuse_detail=prepared.not_shareable_reason
            if generation.reuse == generation_pb2.REUSE_NOT_SHAREABLE
            else "",
        )
        yield generation_pb2.GenerateResponse(final=final)

    def _infer_request(
        self,
        request: generation_pb2.GenerateRequest,
        prepared: preprocess_pb2.PrepareResponse,
        caller: str,
        log_probs: bool = False,
    ) -> infer_pb2.InferRequest:
        # The caller's identity scopes what it may share; it travels inside the keys, never as a request id.
        share_key = prepared.request_hash if self._sharing_scope == "global" else f"{caller}/{prepared.request_hash}"
        infer_request = infer_pb2.InferRequest(
            request_id=request.request_id,
            model=prepared.model,
            input_ids=prepared.input_ids,
            end_id=prepared.end_id,
            pad_id=prepared.pad_id,
            sampling=prepared.sampling,
            stop_token_ids=prepared.stop_token_ids,
            request_hash=share_key,
            shareable=prepared.shareable,
            priority=request.priority,
            idempotency_key=f"{caller}/{request.idempotency_key}" if request.idempotency_key else "",
            fresh=request.fresh,
            return_log_probs=log_probs,
        )
        if prepared.backend == "openai":
            # The endpoint tokenizes and templates: it gets the request's text and the stop strings.
            if request.WhichOneof("input") == "chat":
                infer_request.chat.CopyFrom(request.chat)
            else:
                infer_request.prompt = request.prompt
            infer_request.stop.extend(prepared.stop)
        return infer_request

    async def warm(self, request: generation_pb2.GenerateRequest, timeout: float | None, caller: str = "") -> str:
        """An interim turn (Converse's `interim`): prepared as its request will be (validation, template,
        tokens), then prefilled by the model its request would start on (a cascade's first model, a
        fallback's first option), generating one token that nobody sees. The model keeps the prompt's
        state (llama.cpp's prompt cache per slot, TensorRT-LLM's KV block reuse), so the request that
        extends this turn only computes its last words. Never shared, stored or counted as an answer.
        Returns how it ended: "done", or "skipped" (the prompt was blocked: nothing to warm)."""
        deadline = _Deadline(timeout)
        request = with_request_id(request)
        if self._router is not None:
            _, plan = self._router.plan(request, caller)
            model = _first_model(plan)
            if model is not None:
                request = _for_model(request, model.name)
        await self._stages.connected(deadline.remaining())
        prepared = await self._prepare(request, deadline)
        if prepared.blocked_category:
            return "skipped"
        infer_request = self._infer_request(request, prepared, caller)
        infer_request.sampling.max_tokens = 1
        infer_request.shareable = False
        infer_request.request_hash = ""
        infer_request.idempotency_key = ""
        infer_request.fresh = True
        answer = self._stages.infer.generate(infer_request, deadline.remaining())
        async with contextlib.aclosing(answer):
            async for _ in answer:
                pass  # the prefill is the point; its token is dropped
        return "done"

    async def _prepare(
        self, request: generation_pb2.GenerateRequest, deadline: _Deadline, defer_classifier: bool = False
    ) -> preprocess_pb2.PrepareResponse:
        def prepare(
            request: generation_pb2.GenerateRequest, timeout: float | None
        ) -> Awaitable[preprocess_pb2.PrepareResponse]:
            return self._stages.preprocess.prepare(request, timeout, defer_classifier)

        return await self._preprocess(prepare, request, deadline)

    @staticmethod
    async def _preprocess(
        call: Callable[[generation_pb2.GenerateRequest, float | None], Awaitable[_T]],
        request: generation_pb2.GenerateRequest,
        deadline: _Deadline,
    ) -> _T:
        """A call to preprocess within the deadline, once more if its replica was lost."""
        for attempt in (1, 2):
            remaining = deadline.remaining()
            try:
                async with asyncio.timeout(remaining):
                    return await call(request, remaining)
            except TimeoutError:
                raise DeadlineExceeded("deadline exceeded") from None
            except Unavailable as exc:
                if attempt == 2:
                    raise
                log.info("stage_retry", stage="preprocess", request_id=request.request_id, code=exc.code.name)
        raise AssertionError("unreachable")

    @staticmethod
    def _start(
        prepared: preprocess_pb2.PrepareResponse, infer: infer_pb2.InferRequest | None = None
    ) -> postprocess_pb2.Start:
        return postprocess_pb2.Start(
            request_id=prepared.request_id,
            model=prepared.model,
            stop=prepared.stop,
            chunking=prepared.chunking,
            infer=infer,
        )

    async def _pump(
        self,
        request: infer_pb2.InferRequest,
        prepared: preprocess_pb2.PrepareResponse,
        deadline: _Deadline,
        feed: _Feed,
        generation: _Generation,
        gate: _Gate | None = None,
        first_token_timeout: float | None = None,
    ) -> None:
        """Infer's token ids (or a text backend's text) into the feed, then End. Never raises (a failure is
        `generation.error`, and the feed then ends without End); cancelled, it closes infer's stream, which
        cancels the Triton request. With a `gate` (a cascade), the first tokens wait for its decision; with
        a `first_token_timeout` (a fallback), a model silent that long is Unavailable."""
        feed.put(postprocess_pb2.ProcessRequest(start=self._start(prepared)))
        reason = generation_pb2.FINISH_REASON_UNSPECIFIED
        completion_tokens = 0

        async def take(response: infer_pb2.InferResponse) -> None:
            nonlocal reason, completion_tokens
            if response.token_ids:
                feed.put(postprocess_pb2.ProcessRequest(tokens=postprocess_pb2.Tokens(ids=response.token_ids)))
                await feed.caught_up()
            elif response.text:
                feed.put(postprocess_pb2.ProcessRequest(text=postprocess_pb2.Text(text=response.text)))
                await feed.caught_up()
            if response.reuse:
                generation.reuse = response.reuse
            if response.finish_reason:
                reason = response.finish_reason
                completion_tokens = response.completion_tokens
                generation.prompt_tokens = response.prompt_tokens

        held: list[infer_pb2.InferResponse] = []

        async def release() -> None:
            assert gate is not None
            gate.decide()  # raises _Escalate: nothing held reaches postprocess
            for response in held:
                await take(response)
            held.clear()

        silent = False
        try:
            remaining = deadline.remaining()
            stream = generate_retried(self._stages.infer, request, deadline.remaining)
            # The deadline holds even for a stage that does not keep it (the pump is a task of its own).
            async with asyncio.timeout(remaining) as limit, contextlib.aclosing(stream):
                until = limit.when()
                if first_token_timeout is not None:
                    first_by = asyncio.get_running_loop().time() + first_token_timeout
                    if until is None or first_by < until:
                        silent = True
                        limit.reschedule(first_by)
                async for response in stream:
                    if silent:
                        silent = False
                        limit.reschedule(until)
                    if gate is not None and not gate.decided:
                        held.append(response)
                        gate.add(response)
                        if gate.full or response.finish_reason:
                            await release()
                        continue
                    await take(response)
                if gate is not None and not gate.decided:
                    await release()
            if not reason:
                raise Unavailable("infer ended the stream without a finish reason")
            end = postprocess_pb2.End(finish_reason=reason)
            if prepared.backend == "openai":
                end.completion_tokens = completion_tokens
            feed.put(postprocess_pb2.ProcessRequest(end=end))
        except TimeoutError:
            generation.error = (
                Unavailable(f"{prepared.model} sent no first token within {first_token_timeout:g} s")
                if silent
                else DeadlineExceeded("deadline exceeded while generating")
            )
        except Exception as exc:  # recorded for the reader, which raises it: a task group must not see it
            generation.error = exc
        finally:
            feed.close()


def _record(span: trace.Span, final: generation_pb2.Final, times: _Times, end: float, route: str, caller: str) -> None:
    """Metrics, span attributes and the one log line of a completed request (never its text)."""
    started, handed, first, first_speakable = times.started, times.handed, times.first_token, times.first_speakable
    reason = generation_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    model = final.model
    usage = final.usage
    metrics.REQUESTS.labels(model, reason).inc()
    metrics.PROMPT_TOKENS.labels(model).inc(usage.prompt_tokens)
    metrics.COMPLETION_TOKENS.labels(model).inc(usage.completion_tokens)
    who = caller or "anonymous"
    metrics.CALLER_TOKENS.labels(model, route, who, "prompt").inc(usage.prompt_tokens)
    metrics.CALLER_TOKENS.labels(model, route, who, "completion").inc(usage.completion_tokens)
    metrics.CALLER_COST.labels(model, route, who).inc(usage.cost)
    if route:
        metrics.ROUTE_DECISIONS.labels(route, model).inc()
    if final.reuse in _SAVED:
        # Shared or replayed: the model generated none of this for this request.
        metrics.REUSE_SAVED_TOKENS.labels(model, route, who).inc(usage.prompt_tokens + usage.completion_tokens)
        metrics.REUSE_SAVED_COST.labels(model, route, who).inc(usage.cost)
    metrics.QUEUE_TIME.labels(model).observe(handed - started)
    metrics.E2E_LATENCY.labels(model).observe(end - started)
    if first is not None:
        metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(first - started)
        if usage.completion_tokens > 1:
            metrics.INTER_TOKEN_LATENCY.labels(model).observe((end - first) / (usage.completion_tokens - 1))
    if first_speakable is not None:
        metrics.TIME_TO_FIRST_SPEAKABLE.labels(model).observe(first_speakable - started)
    set_attributes(
        span,
        {
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "gen_ai.response.finish_reasons": [reason],
            "gen_ai.response.model": model,
        },
    )
    log.info(
        "request_completed",
        request_id=final.request_id,
        model=model,
        route=final.route or None,
        cost=usage.cost,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        finish_reason=reason,
        filter_category=final.filter_category or None,
        reuse=generation_pb2.Reuse.Name(final.reuse).removeprefix("REUSE_").lower(),
        queue_ms=final.timings.queue_ms,
        time_to_first_token_ms=final.timings.time_to_first_token_ms,
        time_to_first_speakable_chunk_ms=final.timings.time_to_first_speakable_chunk_ms,
        total_ms=final.timings.total_ms,
    )
