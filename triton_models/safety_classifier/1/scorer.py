"""alt-profanity-check's probability, computed without scikit-learn's per-call overhead.

The package's `predict_prob` costs ~10 ms per call on this CPU whatever the number of texts (one text:
10 ms; 100 texts: 8 ms): nearly all of it is scikit-learn's input validation, repeated for each of the
five calibrated folds of its `CalibratedClassifierCV`. A voice stream waits for one such call per clause.
The model itself is linear: per fold a LinearSVC's decision value d = x·w + c, calibrated by a sigmoid
p = 1 / (1 + exp(a·d + b)), and the five folds' p averaged. `Scorer` reads those numbers from the fitted
objects once and computes the same expression. The features too: scikit-learn's `TfidfVectorizer.transform`
costs ~0.7 ms per call here, nearly all of it building and checking a sparse matrix for a text of a few
words, so a text's TF-IDF weights are computed from the vectorizer's own analyzer, vocabulary and idf as a
few (index, weight) pairs, and each fold's decision is their dot product with its weight rows (~0.05 ms
per short text instead of ~1.5 ms). `tests/unit/triton_models/test_safety_scorer.py` checks the result
equals `predict_prob`. Anything but that shape of model (another package version) raises ValueError, and
the Triton model then keeps `predict_prob`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Scorer"]


class Scorer:
    def __init__(self, vectorizer: Any, model: Any) -> None:
        folds = getattr(model, "calibrated_classifiers_", None)
        if not folds or list(getattr(model, "classes_", [])) != [0, 1]:
            raise ValueError("not a binary CalibratedClassifierCV")
        weights, intercepts, slopes, offsets = [], [], [], []
        for fold in folds:
            estimator, calibrators = fold.estimator, fold.calibrators
            if len(calibrators) != 1 or not hasattr(calibrators[0], "a_") or getattr(fold, "method", "") != "sigmoid":
                raise ValueError("a fold without one sigmoid calibrator")
            coef = np.asarray(estimator.coef_, dtype=np.float64)
            if coef.shape[0] != 1:
                raise ValueError("a fold that is not a binary linear model")
            weights.append(coef.ravel())
            intercepts.append(float(np.ravel(estimator.intercept_)[0]))
            slopes.append(float(calibrators[0].a_))
            offsets.append(float(calibrators[0].b_))
        self._features = _Features(vectorizer)
        self._weights_t = np.vstack(weights).T  # features x folds
        self._intercepts = np.asarray(intercepts)
        self._slopes = np.asarray(slopes)
        self._offsets = np.asarray(offsets)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """P(unsafe) per text, as `profanity_check.predict_prob` gives it."""
        decision = np.empty((len(texts), len(self._intercepts)))
        for row, text in enumerate(texts):
            indices, values = self._features(text)
            decision[row] = values @ self._weights_t[indices] if len(indices) else 0.0
        decision += self._intercepts
        return np.asarray((1.0 / (1.0 + np.exp(self._slopes * decision + self._offsets))).mean(axis=1))


class _Features:
    """`TfidfVectorizer.transform` of one text as (sorted feature indices, weights): the same tokens (its own
    analyzer: lowercasing, token pattern, stop words, n-grams), counts, idf, sublinear tf and norm."""

    def __init__(self, vectorizer: Any) -> None:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError as exc:
            raise ValueError("scikit-learn is not installed") from exc
        if not isinstance(vectorizer, TfidfVectorizer) or not hasattr(vectorizer, "vocabulary_"):
            raise ValueError("not a fitted TfidfVectorizer")
        if vectorizer.norm not in ("l1", "l2", None) or vectorizer.dtype not in (np.float64, "float64"):
            raise ValueError("a TfidfVectorizer with another norm or dtype")
        self._analyze = vectorizer.build_analyzer()
        self._vocabulary: dict[str, int] = vectorizer.vocabulary_
        self._idf = np.asarray(vectorizer.idf_, dtype=np.float64) if vectorizer.use_idf else None
        self._binary = bool(vectorizer.binary)
        self._sublinear = bool(vectorizer.sublinear_tf)
        self._norm = vectorizer.norm

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        counts: dict[int, int] = {}
        vocabulary = self._vocabulary
        for token in self._analyze(text):
            index = vocabulary.get(token)
            if index is not None:
                counts[index] = counts.get(index, 0) + 1
        indices = np.fromiter(sorted(counts), dtype=np.intp, count=len(counts))
        values = np.fromiter((counts[i] for i in indices), dtype=np.float64, count=len(counts))
        if self._binary:
            values[:] = 1.0
        elif self._sublinear:
            values = np.log(values) + 1.0
        if self._idf is not None:
            values *= self._idf[indices]
        if self._norm == "l2":
            norm = np.sqrt(np.dot(values, values))
        elif self._norm == "l1":
            norm = np.abs(values).sum()
        else:
            norm = 0.0
        if norm > 0:
            values /= norm
        return indices, values
