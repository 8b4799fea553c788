"""alt-profanity-check served by Triton's python backend, batched across requests.

Triton's dynamic batcher hands `execute` several requests at once; the python backend does not merge
them, so this model does: it scores the texts of all requests in one call of the scikit-learn model
(a batch of 1,000 costs about as much as three single calls) and splits the probabilities back.

Scoring goes through `scorer.Scorer` (the same probabilities without scikit-learn's ~10 ms of per-call
validation) when it fits the installed package, else through the package's `predict_prob`.

Threads: the native libraries under numpy and scikit-learn (OpenBLAS, OpenMP) size their thread pools
by the host's cores. Scoring (a sparse vectorizer and a linear model) gains nothing from them, and on a
large host any call that used them would spread over every core: they are limited to `n_threads`
(config, default 1) when the model loads.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _texts(request: Any) -> list[str]:
    values = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _fast_or(predict_prob: Any) -> Any:
    """`scorer.Scorer` (the same probabilities, ~7x faster per call) when it fits the installed package and
    agrees with `predict_prob` on a few texts; else `predict_prob` itself."""
    try:
        from profanity_check import profanity_check as package

        from . import scorer

        fast = scorer.Scorer(package.vectorizer, package.model)
        probe = ["The capital of France is Paris.", "You are a stupid idiot.", "", "Merci !"]
        if np.allclose(fast(probe), predict_prob(probe), rtol=0, atol=1e-9):
            return fast
        pb_utils.Logger.log_warn("safety_classifier: the fast scorer disagrees with predict_prob; not used")
    except (ImportError, ValueError, AttributeError) as exc:
        pb_utils.Logger.log_warn(f"safety_classifier: the fast scorer does not fit ({exc!r}); predict_prob used")
    return predict_prob


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        # Imported here so that a missing package fails the model load with a clear error, not the stub.
        from profanity_check import predict_prob
        from threadpoolctl import threadpool_limits

        params = json.loads(args["model_config"]).get("parameters", {})
        n_threads = max(1, int(params.get("n_threads", {}).get("string_value", "1")))
        # Kept referenced: the limits hold for this process until they are restored.
        self._thread_limits = threadpool_limits(limits=n_threads)

        self._predict = predict_prob
        self._predict(["warm up"])  # the first call builds the vectorizer's caches
        self._predict = _fast_or(predict_prob)

    def execute(self, requests: list[Any]) -> list[Any]:
        batches: list[list[str] | pb_utils.TritonError] = []
        for request in requests:
            try:
                batches.append(_texts(request))
            except Exception as exc:  # one malformed request must not fail the others in its batch
                batches.append(pb_utils.TritonError(f"TEXT: {exc}"))
        texts = [t for b in batches if isinstance(b, list) for t in b]
        probs = np.asarray(self._predict(texts), dtype=np.float32) if texts else np.empty(0, np.float32)
        responses, at = [], 0
        for batch in batches:
            if not isinstance(batch, list):
                responses.append(pb_utils.InferenceResponse(error=batch))
                continue
            out = probs[at : at + len(batch)].reshape(-1, 1)
            at += len(batch)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROBABILITY", out)]))
        return responses
