"""The in-process classifier and the choice between it and Triton's (`classifier.runs_in`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmmesh.common.errors import DeadlineExceeded
from llmmesh.common.safety import LocalClassifier, StageClassifier, load_policy

TEXTS = ["The capital of France is Paris.", "You are a stupid idiot.", "Merci !", "Kill the process with SIGTERM."]


class Remote:
    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        return [0.5] * len(texts)


async def test_the_in_process_scores_are_alt_profanity_checks_own() -> None:
    """Loaded on first use (no load() first), it gives predict_prob's probabilities."""
    from profanity_check import predict_prob

    scores = await LocalClassifier().score(TEXTS)
    assert np.allclose(scores, predict_prob(TEXTS), rtol=0, atol=1e-9)
    assert scores[1] > 0.9 > 0.1 > scores[0]


async def test_a_long_prompt_is_scored_the_same_off_the_event_loop() -> None:
    """More than INLINE_CHARS in all goes to a thread: the same probabilities."""
    from profanity_check import predict_prob

    texts = [" ".join(TEXTS)] * 12
    assert sum(map(len, texts)) > LocalClassifier.INLINE_CHARS
    assert np.allclose(await LocalClassifier().score(texts), predict_prob(texts), rtol=0, atol=1e-9)


async def test_no_texts_or_no_time_left() -> None:
    classifier = LocalClassifier()
    assert await classifier.score([]) == []
    with pytest.raises(DeadlineExceeded):
        await classifier.score(["one"], timeout=0.0)


def _policy(tmp_path: Path, classifier: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    path.write_text(f'version: "v"\nclassifier: {classifier}\n', encoding="utf-8")
    return load_policy(path)


def test_each_policy_gets_the_classifier_it_names(tmp_path: Path) -> None:
    remote, local = Remote(), LocalClassifier()
    both = StageClassifier(remote, local)  # type: ignore[arg-type]
    assert both.pick(_policy(tmp_path, "{runs_in: triton}")) is remote
    assert both.pick(_policy(tmp_path, "{runs_in: stage}")) is local
    assert both.pick(_policy(tmp_path, "{enabled: false, runs_in: stage}")) is None
    no_prompts = _policy(tmp_path, "{runs_in: stage, check_prompts: false}")
    assert both.pick(no_prompts) is local and both.pick(no_prompts, prompts=True) is None
    # No Triton address: the Triton layer is skipped, the in-process one is not.
    alone = StageClassifier(None, local)
    assert alone.pick(_policy(tmp_path, "{runs_in: triton}")) is None
    assert alone.pick(_policy(tmp_path, "{runs_in: stage}")) is local
