"""Routes: every route kind's decision (the router, pure), and the orchestrator carrying out fallback and
cascade plans against in-memory stages (the real postprocess stage; scripted preprocess and infer, fakes
for a unit test about their caller): skips before the first chunk only, escalation before any text,
Final.model, Final.route and Final.usage.cost."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from llmmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LlmmeshError,
    ResourceExhausted,
    StageError,
    Unavailable,
)
from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.registry import ModelRegistry, load_registry
from llmmesh.gateway.orchestrator import Orchestrator
from llmmesh.gateway.routing import Cascade, Fallback, Pick, Router, arm_position
from llmmesh.gateway.stages import Stages
from llmmesh.stages.v1 import infer_pb2, preprocess_pb2
from llmmesh.v1 import generation_pb2

from .test_orchestrator import ANSWER, _stage

MODELS = [
    {"name": "small", "default": True, "triton_model": "s", "prompt_price": 0.01, "completion_price": 0.02},
    {"name": "large", "triton_model": "l", "prompt_price": 0.1, "completion_price": 0.2},
    {"name": "remote", "backend": "openai", "openai": {"base_url": "http://127.0.0.1:9/v1"}},
]
ROUTES = [
    {
        "name": "tiers",
        "kind": "tiers",
        "tiers": [{"below": 0.3, "target": "small"}, {"below": 0.7, "target": "ab"}, {"target": "large"}],
    },
    {"name": "ab", "kind": "split", "arms": [{"target": "small", "weight": 1}, {"target": "safe", "weight": 3}]},
    {"name": "safe", "kind": "fallback", "targets": ["large", "small"], "first_token_timeout_s": 0.2},
    {"name": "careful", "kind": "cascade", "targets": ["small", "large"], "check_tokens": 4, "min_mean_logprob": -1.0},
]


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": MODELS, "routes": ROUTES}), encoding="utf-8")
    return load_registry(path, tokenizers=False)


def _request(model: str, prompt: str = "What is the capital of France?") -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id="r1", model=model, prompt=prompt)


def _router(registry: ModelRegistry, value: float = 0.5) -> Router:
    return Router(registry, scorer=lambda _request: value)


# The router: each kind's decision.


def test_a_model_name_is_picked_as_is_and_an_unknown_name_lists_models_and_routes(registry: ModelRegistry) -> None:
    route, plan = _router(registry).plan(_request("large"), "alice")
    assert route == "" and plan == Pick(registry.resolve("large"))
    assert _router(registry).plan(_request(""), "alice")[1] == Pick(registry.resolve("small"))
    with pytest.raises(InvalidArgument) as err:
        _router(registry).plan(_request("huge"), "alice")
    message = str(err.value)
    assert "'huge'" in message
    for name in ("small", "large", "remote", "tiers", "ab", "safe", "careful"):
        assert name in message


@pytest.mark.parametrize(("score", "model"), [(0.0, "small"), (0.29, "small"), (0.7, "large"), (0.99, "large")])
def test_tiers_pick_by_score_with_the_score_in_the_reason(registry: ModelRegistry, score: float, model: str) -> None:
    route, plan = _router(registry, score).plan(_request("tiers"), "alice")
    assert route == "tiers"
    assert isinstance(plan, Pick) and plan.model.name == model
    assert plan.why == (f"tiers: tiers: {model} (score {score:.2f})",)


def test_routes_nest_tiers_then_split_then_fallback(registry: ModelRegistry) -> None:
    """Score 0.5 -> the `ab` split; a caller placed in arm B gets the `safe` fallback."""
    caller = next(c for c in (f"caller-{i}" for i in range(100)) if arm_position(c, "ab") >= 0.25)
    _, plan = _router(registry, 0.5).plan(_request("tiers"), caller)
    assert isinstance(plan, Fallback) and plan.route.name == "safe"
    assert [o.model.name for o in plan.options if isinstance(o, Pick)] == ["large", "small"]
    assert plan.why == ("tiers: tiers: ab (score 0.50)", "ab: split: arm B safe")


def test_a_split_is_sticky_per_caller_and_follows_its_weights(registry: ModelRegistry) -> None:
    router = _router(registry)
    arms: Counter[str] = Counter()
    for i in range(2000):
        caller = f"key-{i}"
        first = router.plan(_request("ab"), caller)[1]
        # The same caller, any prompt, any time: the same arm.
        for prompt in ("hi", "prove it", "again"):
            assert router.plan(_request("ab", prompt), caller)[1] == first
        arms["A" if isinstance(first, Pick) else "B"] += 1
    # Weights 1:3 -> 25 % / 75 %, within sampling noise for 2,000 callers.
    assert 0.21 < arms["A"] / 2000 < 0.29


def test_a_cascade_runs_its_small_model_first_then_the_rest(registry: ModelRegistry) -> None:
    _, plan = _router(registry).plan(_request("careful"), "alice")
    assert isinstance(plan, Cascade)
    assert plan.first.name == "small" and plan.rest == Pick(registry.resolve("large"))


# The orchestrator carrying out plans.


@dataclass
class PerModelPreprocess:
    """Answers with the model the request names (as the real preprocess does after the router chose)."""

    models: list[str] = field(default_factory=list)

    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None, defer_classifier: bool = False
    ) -> preprocess_pb2.PrepareResponse:
        self.models.append(request.model)
        return preprocess_pb2.PrepareResponse(
            request_id=request.request_id,
            model=request.model,
            input_ids=[1, 2, 3, 4, 5],
            end_id=2,
            pad_id=2,
            sampling=preprocess_pb2.ResolvedSampling(max_tokens=64),
            request_hash=f"hash-{request.model}",
            shareable=True,
            backend="triton",
        )

    async def check_prompt(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.CheckPromptResponse:
        raise AssertionError("prepare never leaves a prompt check pending here")


@dataclass
class Behaviour:
    """How one model answers: its ids, their log-probability, or an error before its first token, or a
    silence before it."""

    ids: list[int]
    log_prob: float = -0.1
    error: LlmmeshError | None = None
    first_delay: float = 0.0


@dataclass
class PerModelInfer:
    behaviours: dict[str, Behaviour]
    calls: list[tuple[str, bool]] = field(default_factory=list)  # (model, asked for log-probabilities)
    endings: list[str] = field(default_factory=list)

    async def generate(
        self, request: infer_pb2.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        self.calls.append((request.model, request.return_log_probs))
        b = self.behaviours[request.model]
        sent = 0
        try:
            await asyncio.sleep(b.first_delay)
            if b.error is not None:
                raise b.error
            for token in b.ids:
                await asyncio.sleep(0.001)
                response = infer_pb2.InferResponse(token_ids=[token])
                if request.return_log_probs:
                    response.log_probs.append(b.log_prob)
                yield response
                sent += 1
            yield infer_pb2.InferResponse(finish_reason=generation_pb2.FINISH_REASON_STOP, completion_tokens=sent)
            self.endings.append(f"{request.model} completed")
        except (GeneratorExit, asyncio.CancelledError):
            self.endings.append(f"{request.model} closed after {sent}")
            raise

    async def forget(self, request_hash: str) -> None:
        pass


@pytest.fixture
def answer_ids(assets: ModelAssets) -> list[int]:
    return list(assets.encode_text(ANSWER))


def _mesh(
    registry: ModelRegistry, assets: ModelAssets, behaviours: dict[str, Behaviour], score: float = 0.5
) -> tuple[Orchestrator, PerModelPreprocess, PerModelInfer]:
    pre, infer = PerModelPreprocess(), PerModelInfer(behaviours)
    stages = Stages(preprocess=pre, infer=infer, postprocess=_stage(assets), channels={})
    return Orchestrator(stages, router=Router(registry, scorer=lambda _r: score)), pre, infer


async def _collect(orchestrator: Orchestrator, model: str, caller: str = "alice") -> tuple[str, generation_pb2.Final]:
    text, final = "", None
    async for response in orchestrator.generate(_request(model), timeout=10, caller=caller):
        if response.HasField("chunk"):
            text += response.chunk.text
        else:
            final = response.final
    assert final is not None
    return text, final


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("lost"),
        ResourceExhausted("queue full"),
        FailedPrecondition("model", "large is not loaded"),
        # As a remote infer answers it: a status with its code, not one of the domain's classes.
        StageError(grpc.StatusCode.FAILED_PRECONDITION, "triton model l is not ready"),
    ],
    ids=["unavailable", "overloaded", "not loaded", "not loaded, remote"],
)
async def test_a_fallback_skips_a_failed_model_before_the_first_chunk(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int], error: LlmmeshError
) -> None:
    orchestrator, pre, infer = _mesh(
        registry, assets, {"large": Behaviour(answer_ids, error=error), "small": Behaviour(answer_ids)}
    )
    text, final = await _collect(orchestrator, "safe")
    assert text == ANSWER
    assert final.model == "small"
    assert final.route == f"safe: fallback: large unavailable ({error.code.name.lower()}) -> small"
    assert pre.models[-1] == "small" and infer.calls[-1] == ("small", False)


async def test_a_fallback_skips_a_model_silent_past_its_first_token_timeout(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    orchestrator, _, infer = _mesh(
        registry,
        assets,
        {"large": Behaviour(answer_ids, first_delay=5.0), "small": Behaviour(answer_ids)},
    )
    text, final = await _collect(orchestrator, "safe")
    assert (text, final.model) == (ANSWER, "small")
    assert final.route == "safe: fallback: large unavailable (unavailable) -> small"
    assert "large closed after 0" in infer.endings  # the silent model's call was cancelled


async def test_a_fallback_never_switches_after_the_first_chunk(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    """A model lost mid-answer ends the stream UNAVAILABLE: a second answer could contradict the first."""

    @dataclass
    class LostMidAnswer(PerModelInfer):
        async def generate(
            self, request: infer_pb2.InferRequest, timeout: float | None = None
        ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
            self.calls.append((request.model, request.return_log_probs))
            for token in answer_ids[:10]:
                await asyncio.sleep(0.001)
                yield infer_pb2.InferResponse(token_ids=[token])
            raise Unavailable("infer lost")

    pre = PerModelPreprocess()
    infer = LostMidAnswer({})
    stages = Stages(preprocess=pre, infer=infer, postprocess=_stage(assets), channels={})
    orchestrator = Orchestrator(stages, router=Router(registry, scorer=lambda _r: 0.5))
    chunks = 0
    with pytest.raises(Unavailable):
        async for response in orchestrator.generate(_request("safe"), timeout=10, caller="alice"):
            chunks += response.HasField("chunk")
    assert chunks > 0
    assert [m for m, _ in infer.calls] == ["large"]


async def test_when_every_fallback_target_fails_the_last_error_is_the_answer(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    orchestrator, _, _ = _mesh(
        registry,
        assets,
        {
            "large": Behaviour(answer_ids, error=Unavailable("a")),
            "small": Behaviour(answer_ids, error=ResourceExhausted("b")),
        },
    )
    with pytest.raises(ResourceExhausted):
        await _collect(orchestrator, "safe")


async def test_a_request_error_is_not_skipped_by_a_fallback(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    orchestrator, _, infer = _mesh(
        registry,
        assets,
        {"large": Behaviour(answer_ids, error=InvalidArgument("sampling", "bad")), "small": Behaviour(answer_ids)},
    )
    with pytest.raises(InvalidArgument):
        await _collect(orchestrator, "safe")
    assert [m for m, _ in infer.calls] == ["large"]


async def test_a_confident_cascade_keeps_its_small_model(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    orchestrator, _, infer = _mesh(
        registry, assets, {"small": Behaviour(answer_ids, log_prob=-0.25), "large": Behaviour(answer_ids)}
    )
    text, final = await _collect(orchestrator, "careful")
    assert (text, final.model) == (ANSWER, "small")
    assert final.route == "careful: cascade: small kept (mean logprob -0.25 >= -1)"
    assert infer.calls == [("small", True)]


async def test_an_unsure_cascade_escalates_before_any_text_and_counts_both_costs(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    """Mean log-probability -2.5 < -1: the small model's first 4 tokens are dropped unseen, the large model
    answers; the request's cost includes the dropped attempt (5 prompt + 4 completion tokens of small)."""
    orchestrator, _, infer = _mesh(
        registry, assets, {"small": Behaviour(answer_ids, log_prob=-2.5), "large": Behaviour(answer_ids)}
    )
    responses = [r async for r in orchestrator.generate(_request("careful"), timeout=10, caller="alice")]
    text = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    final = responses[-1].final
    assert text == ANSWER  # one answer, the large model's, from its first token
    assert final.model == "large"
    assert final.route == "careful: cascade: escalated (mean logprob -2.50 < -1)"
    assert infer.calls == [("small", True), ("large", False)]
    # Closed at the decision: while its 4th token was being handed over (counted once the yield returns).
    assert "small closed after 3" in infer.endings
    usage = final.usage
    large_cost = (usage.prompt_tokens * 0.1 + usage.completion_tokens * 0.2) / 1000
    dropped = (5 * 0.01 + 4 * 0.02) / 1000
    assert final.usage.cost == pytest.approx(large_cost + dropped)


async def test_usage_carries_the_answering_models_cost(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    orchestrator, _, _ = _mesh(registry, assets, {"small": Behaviour(answer_ids), "large": Behaviour(answer_ids)})
    _, final = await _collect(orchestrator, "large")
    assert final.route == ""
    assert final.usage.prompt_tokens == 5 and final.usage.completion_tokens == len(answer_ids)
    assert final.usage.cost == pytest.approx((5 * 0.1 + len(answer_ids) * 0.2) / 1000)


async def test_a_cascade_whose_first_model_cannot_answer_goes_on_to_the_next(
    registry: ModelRegistry, assets: ModelAssets, answer_ids: list[int]
) -> None:
    orchestrator, _, infer = _mesh(
        registry,
        assets,
        {"small": Behaviour(answer_ids, error=ResourceExhausted("queue full")), "large": Behaviour(answer_ids)},
    )
    text, final = await _collect(orchestrator, "careful")
    assert (text, final.model) == (ANSWER, "large")
    assert final.route == "careful: cascade: small unavailable (resource_exhausted)"
    assert [m for m, _ in infer.calls] == ["small", "large"]
