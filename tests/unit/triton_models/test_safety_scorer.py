"""triton_models/safety_classifier/1/scorer.py: the classifier's probabilities without scikit-learn's per-call
overhead must be alt-profanity-check's own, text for text (loaded from its file, as Triton loads it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profanity_check import predict_prob
from profanity_check import profanity_check as package

from .conftest import load_model_module

LABELLED = Path(__file__).resolve().parents[3] / "loadtest" / "prompts" / "safety_labelled.jsonl"


def _load() -> ModuleType:
    return load_model_module("safety_classifier", "scorer")


SCORER = _load().Scorer(package.vectorizer, package.model)


def test_the_labelled_set_scores_exactly_as_the_package_scores_it() -> None:
    texts = [json.loads(line)["text"] for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts += ["", "Merci !", "You are a stupid idiot.", "Kill the process with SIGTERM."]
    assert np.allclose(SCORER(texts), predict_prob(texts), rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=8))
def test_any_text_scores_as_the_package_scores_it(texts: list[str]) -> None:
    assert np.allclose(SCORER(texts), predict_prob(texts), rtol=0, atol=1e-12)


def test_another_kind_of_model_is_refused() -> None:
    with pytest.raises(ValueError):
        _load().Scorer(package.vectorizer, object())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"binary": True},
        {"sublinear_tf": True, "norm": "l1"},
        {"use_idf": False, "norm": None, "ngram_range": (1, 2)},
        {"analyzer": "char_wb", "ngram_range": (2, 3), "lowercase": False},
    ],
)
def test_the_features_are_the_vectorizers_own(options: dict[str, object]) -> None:
    """The scorer's TF-IDF weights equal `TfidfVectorizer.transform`'s for the options it may meet."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    corpus = ["The cat sat on the mat.", "You stupid cat!", "Mats, cats and hats; the end.", "Idiot idiot idiot."]
    vectorizer = TfidfVectorizer(**options).fit(corpus)  # type: ignore[arg-type]
    features = _load()._Features(vectorizer)
    for text in [*corpus, "", "cat cat CAT mat unknown", "Ünïcödé, the cat."]:
        expected = vectorizer.transform([text]).toarray()[0]
        got = np.zeros_like(expected)
        indices, values = features(text)
        got[indices] = values
        assert np.allclose(got, expected, rtol=0, atol=1e-15), (options, text)
