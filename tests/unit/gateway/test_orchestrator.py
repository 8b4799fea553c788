"""The orchestrator against in-memory stages: the real postprocess stage (SmolLM2's vocabulary, the default
safety policy's blocklist and PII layers) and scripted preprocess and infer stages (fakes, for a unit test
about their caller). Covers completion, stop strings, filters, cancels and deadlines at each point, and
lost stages before and after the first chunk."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from llmmesh.common.errors import DeadlineExceeded, InvalidArgument, LlmmeshError, Unavailable
from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import BlockedTerm, SafetyStream, load_policy
from llmmesh.gateway.orchestrator import Orchestrator
from llmmesh.gateway.stages import Stages
from llmmesh.postprocess.chunker import ChunkingMode
from llmmesh.postprocess.domain import TextPipeline
from llmmesh.postprocess.server import StreamSafety
from llmmesh.postprocess.stage import PostprocessStage
from llmmesh.stages.v1 import infer_pb2, postprocess_pb2, preprocess_pb2
from llmmesh.v1 import generation_pb2

ANSWER = "The capital of France is Paris. It is known for the Eiffel Tower and for its museums."


@dataclass
class ScriptedPreprocess:
    """Answers every request with the same prepared input; fails the first `fail` calls with `error`.
    `verdict` (a category, "" to pass, None: no deferred check): a deferring caller gets
    prompt_check_pending, and check_prompt answers that after `verdict_delay` seconds (or raises
    `verdict_error`), noting how many generations had started by then."""

    stop: tuple[str, ...] = ()
    fail: int = 0
    error: LlmmeshError = field(default_factory=lambda: Unavailable("preprocess replica lost"))
    delay: float = 0.0
    calls: int = 0
    verdict: str | None = None
    verdict_delay: float = 0.0
    verdict_error: LlmmeshError | None = None
    infer: ScriptedInfer | None = None
    checks: list[int] = field(default_factory=list)  # infer's calls when each verdict was given

    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None, defer_classifier: bool = False
    ) -> preprocess_pb2.PrepareResponse:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.calls <= self.fail:
            raise self.error
        return preprocess_pb2.PrepareResponse(
            prompt_check_pending=defer_classifier and self.verdict is not None,
            request_id=request.request_id,
            model="smollm2",
            input_ids=[1, 2, 3],
            end_id=2,
            pad_id=2,
            sampling=preprocess_pb2.ResolvedSampling(max_tokens=64, temperature=0.0, top_p=1.0),
            stop=list(self.stop or request.sampling.stop),
            request_hash="hash",
            shareable=True,
        )

    async def check_prompt(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.CheckPromptResponse:
        await asyncio.sleep(self.verdict_delay)
        self.checks.append(self.infer.calls if self.infer is not None else -1)
        if self.verdict_error is not None:
            raise self.verdict_error
        return preprocess_pb2.CheckPromptResponse(blocked_category=self.verdict or "")


@dataclass
class ScriptedInfer:
    """Streams `ids` one per `gap` seconds. `fail_at`: raise `error` before sending the id at that index,
    on the first `fail_calls` calls. Records every call and how it ended."""

    ids: list[int]
    gap: float = 0.002
    first_delay: float = 0.0
    fail_at: int | None = None
    fail_calls: int = 1
    error: LlmmeshError = field(default_factory=lambda: Unavailable("infer replica lost"))
    calls: int = 0
    endings: list[str] = field(default_factory=list)  # "completed" | "closed after N" | "failed"
    forgotten: list[str] = field(default_factory=list)

    async def generate(
        self, request: infer_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        self.calls += 1
        sent = 0
        try:
            await asyncio.sleep(self.first_delay)
            for i, token in enumerate(self.ids):
                if self.fail_at == i and self.calls <= self.fail_calls:
                    self.endings.append("failed")
                    raise self.error
                await asyncio.sleep(self.gap)
                yield infer_pb2.InferResponse(token_ids=[token], reuse=generation_pb2.REUSE_NONE if i == 0 else 0)
                sent += 1
            yield infer_pb2.InferResponse(
                finish_reason=generation_pb2.FINISH_REASON_STOP, completion_tokens=sent, reuse=generation_pb2.REUSE_NONE
            )
            self.endings.append("completed")
        except (GeneratorExit, asyncio.CancelledError):
            self.endings.append(f"closed after {sent}")
            raise

    async def forget(self, request_hash: str) -> None:
        self.forgotten.append(request_hash)


class FlakyPostprocess:
    """The real postprocess stage; its first `fail` streams are lost after reading `after` messages."""

    def __init__(self, stage: PostprocessStage, fail: int = 0, after: int = 3) -> None:
        self._stage, self._fail, self._after = stage, fail, after
        self.calls = 0

    async def process(
        self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        self.calls += 1
        if self.calls > self._fail:
            async for response in self._stage.process(requests, timeout):
                yield response
            return
        seen = 0
        async for _ in requests:
            seen += 1
            if seen == self._after:
                raise Unavailable("postprocess replica lost")


def _stage(assets: ModelAssets, blocked: tuple[str, ...] = ()) -> PostprocessStage:
    policy = load_policy(extra_terms=[BlockedTerm(t, "custom") for t in blocked])

    def make(start: postprocess_pb2.Start, deadline: float | None) -> TextPipeline:
        return TextPipeline(
            assets.token_bytes, list(start.stop), StreamSafety(SafetyStream(policy)), ChunkingMode.TOKEN
        )

    return PostprocessStage(make)


def _orchestrator(
    preprocess: ScriptedPreprocess, infer: ScriptedInfer, postprocess: FlakyPostprocess | PostprocessStage
) -> Orchestrator:
    return Orchestrator(Stages(preprocess=preprocess, infer=infer, postprocess=postprocess, channels={}))


@dataclass
class Result:
    text: str = ""
    chunks: int = 0
    final: generation_pb2.Final | None = None


async def _run(orchestrator: Orchestrator, timeout: float | None = 10.0, **fields: object) -> Result:
    request = generation_pb2.GenerateRequest(prompt="What is the capital of France?", **fields)  # type: ignore[arg-type]
    result = Result()
    async with contextlib.aclosing(orchestrator.generate(request, timeout)) as stream:
        async for response in stream:
            if response.HasField("chunk"):
                result.text += response.chunk.text
                result.chunks += 1
            else:
                result.final = response.final
    return result


def _no_tasks_left() -> bool:
    left = [t for t in asyncio.all_tasks() if not t.done() and t is not asyncio.current_task()]
    assert not left, left
    return True


@pytest.fixture
def ids(assets: ModelAssets) -> list[int]:
    return assets.encode(ANSWER)


async def test_a_generation_streams_to_its_end(assets: ModelAssets, ids: list[int]) -> None:
    """Every token's text arrives in order, then one final with the reason, usage and reuse."""
    infer = ScriptedInfer(ids)
    result = await _run(_orchestrator(ScriptedPreprocess(), infer, _stage(assets)))
    assert result.text == ANSWER and result.chunks > 1
    assert result.final is not None and result.final.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert result.final.usage.completion_tokens == len(ids) and result.final.usage.prompt_tokens == 3
    assert result.final.reuse == generation_pb2.REUSE_NONE and result.final.request_id
    assert infer.endings == ["completed"] and _no_tasks_left()


async def test_a_stop_string_ends_the_answer_and_cancels_the_generation(assets: ModelAssets, ids: list[int]) -> None:
    """Postprocess ends early at the stop string: the text stops before it and infer is closed at once."""
    infer = ScriptedInfer(ids, gap=0.005)
    result = await _run(_orchestrator(ScriptedPreprocess(stop=("Paris",)), infer, _stage(assets)))
    assert result.text == "The capital of France is "
    assert result.final is not None and result.final.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
    assert result.final.matched_stop == "Paris"
    assert len(infer.endings) == 1 and infer.endings[0].startswith("closed after")
    assert int(infer.endings[0].split()[-1]) < len(ids)
    assert _no_tasks_left()


async def test_a_content_filter_ends_the_answer_cancels_and_forgets_the_result(
    assets: ModelAssets, ids: list[int]
) -> None:
    """A blocked term ends the stream with CONTENT_FILTER, infer is closed, and the cached result dropped."""
    infer = ScriptedInfer(ids, gap=0.005)
    result = await _run(_orchestrator(ScriptedPreprocess(), infer, _stage(assets, blocked=("Eiffel",))))
    assert result.final is not None and result.final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert "Eiffel" not in result.text and result.final.filter_category == "custom"
    assert infer.endings[0].startswith("closed after") and infer.forgotten == ["hash"]


async def test_a_prompt_checked_alongside_starts_the_model_before_its_verdict(
    assets: ModelAssets, ids: list[int]
) -> None:
    """The classifier's verdict on the prompt comes after the generation started; a passing verdict lets
    the whole answer through."""
    infer = ScriptedInfer(ids)
    preprocess = ScriptedPreprocess(verdict="", verdict_delay=0.05, infer=infer)
    result = await _run(_orchestrator(preprocess, infer, _stage(assets)))
    assert preprocess.checks == [1]  # the generation had started when the verdict came
    assert result.text == ANSWER
    assert result.final is not None and result.final.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert infer.endings == ["completed"] and _no_tasks_left()


@pytest.mark.parametrize("verdict_delay", [0.0, 0.1], ids=["before the first token", "after tokens arrived"])
async def test_a_prompt_blocked_alongside_releases_nothing_and_cancels_the_generation(
    assets: ModelAssets, ids: list[int], verdict_delay: float
) -> None:
    """Tokens that arrived before a blocking verdict are never passed on: the answer is CONTENT_FILTER
    with the classifier's category, the generation is closed and its shared result forgotten. A verdict
    that comes before the first token stops the generation then, without waiting for that token."""
    infer = ScriptedInfer(ids, gap=0.005, first_delay=0.2 if verdict_delay == 0.0 else 0.0)
    preprocess = ScriptedPreprocess(verdict="toxicity", verdict_delay=verdict_delay, infer=infer)
    result = await _run(_orchestrator(preprocess, infer, _stage(assets)))
    assert result.chunks == 0 and result.text == ""
    assert result.final is not None and result.final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert result.final.filter_category == "toxicity" and result.final.usage.completion_tokens == 0
    assert len(infer.endings) == 1 and infer.endings[0].startswith("closed after")
    assert int(infer.endings[0].split()[-1]) < len(ids)
    assert infer.forgotten == ["hash"] and _no_tasks_left()
    if verdict_delay == 0.0:
        assert infer.endings == ["closed after 0"]  # stopped while its first token was still 0.2 s away


async def test_an_answer_that_ends_before_a_passing_verdict_is_held_then_passed_on(
    assets: ModelAssets, ids: list[int]
) -> None:
    """The whole answer, its end included, waits for the verdict, then goes out unchanged."""
    infer = ScriptedInfer(ids[:3], gap=0.001)
    preprocess = ScriptedPreprocess(verdict="", verdict_delay=0.2, infer=infer)
    result = await _run(_orchestrator(preprocess, infer, _stage(assets)))
    assert infer.endings == ["completed"] and preprocess.checks == [1]
    assert result.text == assets.decode(ids[:3])
    assert result.final is not None and result.final.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert _no_tasks_left()


async def test_a_prompt_check_that_fails_fails_the_request_without_a_postprocess_retry(
    assets: ModelAssets, ids: list[int]
) -> None:
    """The classifier unreachable (preprocess answered UNAVAILABLE twice): the request fails UNAVAILABLE,
    nothing released, the generation closed, postprocess not asked again."""
    infer = ScriptedInfer(ids, gap=0.005)
    preprocess = ScriptedPreprocess(
        verdict="", verdict_delay=0.02, verdict_error=Unavailable("safety classifier: UNAVAILABLE"), infer=infer
    )
    postprocess = FlakyPostprocess(_stage(assets))
    result = Result()
    with pytest.raises(Unavailable, match="safety classifier"):
        request = generation_pb2.GenerateRequest(prompt="What is the capital of France?")
        async for response in _orchestrator(preprocess, infer, postprocess).generate(request, 10.0):
            result.chunks += response.HasField("chunk")
    assert result.chunks == 0 and len(preprocess.checks) == 2 and postprocess.calls == 1
    assert infer.endings[0].startswith("closed after") and _no_tasks_left()


@pytest.mark.parametrize("point", ["preparing", "before the first token", "mid-stream"])
async def test_a_caller_that_goes_away_cancels_everything_at_each_point(
    assets: ModelAssets, ids: list[int], point: str
) -> None:
    """Cancelling the caller's task stops the generation wherever it is; no task is left behind."""
    preprocess = ScriptedPreprocess(delay=0.5 if point == "preparing" else 0.0)
    infer = ScriptedInfer(ids, gap=0.05, first_delay=0.5 if point == "before the first token" else 0.0)
    orchestrator = _orchestrator(preprocess, infer, _stage(assets))
    chunks: list[str] = []

    async def consume() -> None:
        async for response in orchestrator.generate(generation_pb2.GenerateRequest(prompt="Hi"), 10.0):
            chunks.append(response.chunk.text)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    if point == "preparing":
        assert infer.calls == 0
    else:
        assert infer.endings == ["closed after " + str(len(chunks) if point == "mid-stream" else 0)] or (
            infer.endings and infer.endings[0].startswith("closed after")
        )
    assert (point == "mid-stream") == bool(chunks)
    assert _no_tasks_left()


async def test_closing_the_stream_mid_answer_stops_the_generation_at_once(assets: ModelAssets, ids: list[int]) -> None:
    """A Converse interrupt closes the generator: infer is closed before aclose returns."""
    infer = ScriptedInfer(ids, gap=0.01)
    stream = _orchestrator(ScriptedPreprocess(), infer, _stage(assets)).generate(
        generation_pb2.GenerateRequest(prompt="Hi"), 10.0
    )
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    assert len(infer.endings) == 1 and infer.endings[0].startswith("closed after")
    assert _no_tasks_left()


@pytest.mark.parametrize("hop", ["preprocess", "infer before the first token", "infer mid-stream"])
async def test_the_deadline_holds_at_each_hop(assets: ModelAssets, ids: list[int], hop: str) -> None:
    """A deadline that expires in any hop ends the request with DEADLINE_EXCEEDED, and infer is closed."""
    preprocess = ScriptedPreprocess(delay=1.0 if hop == "preprocess" else 0.0)
    infer = ScriptedInfer(
        ids,
        gap=0.05 if hop == "infer mid-stream" else 0.0,
        first_delay=1.0 if hop == "infer before the first token" else 0.0,
    )
    with pytest.raises(DeadlineExceeded):
        await _run(_orchestrator(preprocess, infer, _stage(assets)), timeout=0.3)
    assert all(e.startswith("closed after") for e in infer.endings)
    assert _no_tasks_left()


async def test_a_lost_preprocess_is_asked_once_more(assets: ModelAssets, ids: list[int]) -> None:
    """Prepare that fails UNAVAILABLE is made once more; twice is the caller's UNAVAILABLE."""
    preprocess = ScriptedPreprocess(fail=1)
    result = await _run(_orchestrator(preprocess, ScriptedInfer(ids), _stage(assets)))
    assert result.text == ANSWER and preprocess.calls == 2
    with pytest.raises(Unavailable):
        await _run(_orchestrator(ScriptedPreprocess(fail=2), ScriptedInfer(ids), _stage(assets)))


async def test_a_request_error_is_never_retried(assets: ModelAssets, ids: list[int]) -> None:
    """A status that is the request's own answer (INVALID_ARGUMENT) reaches the caller after one call."""
    preprocess = ScriptedPreprocess(fail=5, error=InvalidArgument("prompt", "must not be empty"))
    with pytest.raises(InvalidArgument):
        await _run(_orchestrator(preprocess, ScriptedInfer(ids), _stage(assets)))
    assert preprocess.calls == 1
    infer = ScriptedInfer(ids, fail_at=0, fail_calls=5, error=InvalidArgument("input", "refused by the model"))
    with pytest.raises(InvalidArgument):
        await _run(_orchestrator(ScriptedPreprocess(), infer, _stage(assets)))
    assert infer.calls == 1


async def test_infer_lost_before_its_first_response_is_started_once_more(assets: ModelAssets, ids: list[int]) -> None:
    """Nothing of the generation existed yet: the second call's answer is the caller's, whole."""
    infer = ScriptedInfer(ids, fail_at=0)
    result = await _run(_orchestrator(ScriptedPreprocess(), infer, _stage(assets)))
    assert result.text == ANSWER and infer.calls == 2 and infer.endings == ["failed", "completed"]


async def test_infer_lost_after_the_first_chunk_is_unavailable(assets: ModelAssets, ids: list[int]) -> None:
    """Once the caller has text nothing is retried: the stream ends UNAVAILABLE, infer was called once."""
    infer = ScriptedInfer(ids, fail_at=5)
    chunks = 0
    with pytest.raises(Unavailable):
        async for response in _orchestrator(ScriptedPreprocess(), infer, _stage(assets)).generate(
            generation_pb2.GenerateRequest(prompt="Hi"), 10.0
        ):
            chunks += response.HasField("chunk")
    assert chunks > 0 and infer.calls == 1
    assert _no_tasks_left()


async def test_postprocess_lost_before_the_first_chunk_is_replayed_on_a_new_stream(
    assets: ModelAssets, ids: list[int]
) -> None:
    """The feed is replayed from Start on the second stream: the caller gets the exact answer."""
    postprocess = FlakyPostprocess(_stage(assets), fail=1, after=3)
    infer = ScriptedInfer(ids)
    result = await _run(_orchestrator(ScriptedPreprocess(), infer, postprocess))
    assert result.text == ANSWER and postprocess.calls == 2 and infer.calls == 1


async def test_postprocess_lost_while_the_prompt_verdict_is_pending_is_replayed_too(
    assets: ModelAssets, ids: list[int]
) -> None:
    """The stream lost before the verdict came: once the verdict passes, the retry gets the exact answer;
    the prompt is checked once."""
    postprocess = FlakyPostprocess(_stage(assets), fail=1, after=3)
    infer = ScriptedInfer(ids)
    preprocess = ScriptedPreprocess(verdict="", verdict_delay=0.1, infer=infer)
    result = await _run(_orchestrator(preprocess, infer, postprocess))
    assert result.text == ANSWER and postprocess.calls == 2 and len(preprocess.checks) == 1
    assert _no_tasks_left()


async def test_postprocess_lost_twice_is_unavailable(assets: ModelAssets, ids: list[int]) -> None:
    """A second loss is the caller's UNAVAILABLE, and the generation is stopped."""
    postprocess = FlakyPostprocess(_stage(assets), fail=2, after=3)
    infer = ScriptedInfer(ids, gap=0.01)
    with pytest.raises(Unavailable):
        await _run(_orchestrator(ScriptedPreprocess(), infer, postprocess))
    assert postprocess.calls == 2 and infer.endings[0].startswith("closed after")
    assert _no_tasks_left()


async def test_retry_statuses_name_the_lost_stage_only(assets: ModelAssets) -> None:
    """Unavailable is the one status the orchestrator retries (grpc's code, for the status table)."""
    assert Unavailable("x").code == grpc.StatusCode.UNAVAILABLE
    assert InvalidArgument("f", "x").code != grpc.StatusCode.UNAVAILABLE


async def test_the_pump_reads_infer_no_faster_than_postprocess_takes_tokens(ids: list[int]) -> None:
    """Backpressure: with a slow postprocess the pump stays at most one message ahead, so infer (whose hub
    coalesces for a lagging reader) is read when postprocess can take more, not into a backlog."""
    infer = ScriptedInfer(ids, gap=0.0)
    lead: list[int] = []

    class SlowPostprocess:
        async def process(
            self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
        ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
            taken = 0
            async for message in requests:
                if message.HasField("tokens"):
                    taken += 1
                    await asyncio.sleep(0.005)
                    lead.append(sent[0] - taken)
            yield postprocess_pb2.ProcessResponse(
                done=postprocess_pb2.Done(finish_reason=generation_pb2.FINISH_REASON_STOP, completion_tokens=taken)
            )

    sent = [0]
    original = infer.generate

    async def counting(request: infer_pb2.InferRequest, timeout: float | None = None) -> AsyncGenerator[Any, None]:
        async for response in original(request, timeout):
            sent[0] += len(response.token_ids)
            yield response

    infer.generate = counting  # type: ignore[method-assign]
    result = await _run(_orchestrator(ScriptedPreprocess(), infer, SlowPostprocess()))  # type: ignore[arg-type]
    assert result.final is not None and result.final.usage.completion_tokens == len(ids)
    assert max(lead) <= 2, lead


async def test_a_feed_listener_gets_every_message_in_order_then_none_and_counts_as_caught_up() -> None:
    """What a multiplexed postprocess stream reads instead of iterating: the messages already put, then each
    one as it is put (no task in between), then None at close; the pump's backpressure sees it as a reader."""
    from llmmesh.gateway.orchestrator import _Feed

    def msg(i: int) -> postprocess_pb2.ProcessRequest:
        return postprocess_pb2.ProcessRequest(tokens=postprocess_pb2.Tokens(ids=[i]))

    feed = _Feed()
    feed.put(msg(1))
    feed.put(msg(2))
    got: list[int | None] = []
    stop = feed.reader().listen(lambda m: got.append(None if m is None else m.tokens.ids[0]))
    assert got == [1, 2]
    feed.put(msg(3))
    assert got == [1, 2, 3]
    await asyncio.wait_for(feed.caught_up(), 1)  # taken as put: nothing for the pump to wait on
    stop()
    feed.put(msg(4))
    assert got == [1, 2, 3]  # stopped listening
    other: list[int | None] = []
    feed.reader().listen(lambda m: other.append(None if m is None else m.tokens.ids[0]))
    feed.close()
    assert other == [1, 2, 3, 4, None]  # a second reader (a retry) replays from the start
