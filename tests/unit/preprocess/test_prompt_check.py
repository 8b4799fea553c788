"""The prompt's classifier check, before the model starts or alongside it, as the policy says.

A scripted classifier (a fake, for a unit test about its caller, `PreprocessStage`) scores "moron" high."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import PolicyStore, StageClassifier
from llmmesh.common.safety.policy import DEFAULT_POLICY_PATH
from llmmesh.preprocess.domain import Limits, Preparer
from llmmesh.preprocess.stage import PreprocessStage
from llmmesh.v1 import generation_pb2

INSULT = "Tell me why you are such a stupid moron."


class ScriptedClassifier:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        self.calls.append(texts)
        return [0.99 if "moron" in text else 0.01 for text in texts]


def _stage(assets: ModelAssets, tmp_path: Path, prompt_check: str, classifier: ScriptedClassifier) -> PreprocessStage:
    policy = tmp_path / "policy.yaml"
    shipped = DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
    assert "  prompt_check: before\n" in shipped
    policy.write_text(shipped.replace("  prompt_check: before\n", f"  prompt_check: {prompt_check}\n"))
    preparer = Preparer({"smollm2": assets}, "smollm2", "You are a helpful assistant.", Limits(default_max_tokens=8))
    return PreprocessStage(preparer, PolicyStore(policy), StageClassifier(classifier))  # type: ignore[arg-type]


def _request(prompt: str) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id="r", prompt=prompt)


async def test_alongside_a_deferring_caller_gets_the_input_at_once_and_the_verdict_from_check_prompt(
    assets: ModelAssets, tmp_path: Path
) -> None:
    classifier = ScriptedClassifier()
    stage = _stage(assets, tmp_path, "alongside", classifier)
    prepared = await stage.prepare(_request(INSULT), 5.0, defer_classifier=True)
    assert prepared.prompt_check_pending and not prepared.blocked_category and prepared.input_ids
    assert classifier.calls == []  # the classifier is not on Prepare's path
    verdict = await stage.check_prompt(_request(INSULT), 5.0)
    assert verdict.blocked_category == "toxicity" and verdict.safety_policy_version == prepared.safety_policy_version
    assert (await stage.check_prompt(_request("What is the capital of France?"), 5.0)).blocked_category == ""


@pytest.mark.parametrize(
    ("prompt_check", "defer"), [("alongside", False), ("before", True), ("before", False)], ids=str
)
async def test_otherwise_prepare_scores_the_prompt_itself(
    assets: ModelAssets, tmp_path: Path, prompt_check: str, defer: bool
) -> None:
    """A caller that does not defer, or a policy that says "before": Prepare gives the verdict itself."""
    classifier = ScriptedClassifier()
    stage = _stage(assets, tmp_path, prompt_check, classifier)
    prepared = await stage.prepare(_request(INSULT), 5.0, defer_classifier=defer)
    assert prepared.blocked_category == "toxicity" and not prepared.prompt_check_pending
    assert len(classifier.calls) == 1


async def test_blocked_terms_are_checked_by_prepare_even_when_the_classifier_is_deferred(
    assets: ModelAssets, tmp_path: Path
) -> None:
    classifier = ScriptedClassifier()
    stage = _stage(assets, tmp_path, "alongside", classifier)
    prepared = await stage.prepare(_request("I will kill you"), 5.0, defer_classifier=True)
    assert prepared.blocked_category == "violence" and not prepared.prompt_check_pending
    assert classifier.calls == []
