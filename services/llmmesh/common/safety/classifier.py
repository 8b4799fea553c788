"""Layer 3: a trained classifier that scores text units, served by Triton or scored in the stage's process.

`Classifier` is what the safety stream needs: P(unsafe) for each of a list of texts. `TritonClassifier`
calls the Triton model `safety_classifier` (triton_models/safety_classifier: alt-profanity-check on CPU,
a Llama Guard-style model in the same slot on GPU). Each call is one ModelInfer request holding its
texts as a batch; Triton's dynamic batcher merges the requests of many concurrent streams into one
model execution. `LocalClassifier` scores with the same CPU model's `Scorer` (the Triton model's own
scorer.py) in this process: no hop to Triton and back, which a voice stream waits for at every clause.
`StageClassifier` hands each stream the one its policy names (`classifier.runs_in`).

A call waits at most the time its caller has left (the request's deadline) and never more than the
client's own `timeout`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from array import array
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.common.errors import DeadlineExceeded, Unavailable
from llmmesh.common.logging import get_logger
from llmmesh.common.safety.policy import SafetyPolicy
from llmmesh.common.telemetry import client_interceptors
from llmmesh.common.triton_auth import header_interceptors

__all__ = ["Classifier", "LocalClassifier", "StageClassifier", "TritonClassifier", "bytes_tensor", "classifier_for"]

log = get_logger(__name__)

INPUT = "TEXT"
OUTPUT = "PROBABILITY"


class Classifier(Protocol):
    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        """Probability that each text is unsafe, in order; `timeout` is the seconds the caller has left
        (None: no deadline of its own). Raises DeadlineExceeded when that is spent, Unavailable when the
        model cannot answer."""
        ...


def bytes_tensor(texts: Sequence[str]) -> bytes:
    """Triton's raw BYTES encoding: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for text in texts:
        data = text.encode("utf-8")
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


class TritonClassifier:
    """Scores texts with a Triton model that takes TEXT (BYTES [n, 1]) and returns PROBABILITY (FP32 [n, 1])."""

    def __init__(
        self,
        url: str,
        model: str = "safety_classifier",
        timeout: float = 5.0,
        max_batch: int = 32,
        header: str = "",
    ) -> None:
        self._url = url
        self._model = model
        self._timeout = timeout
        # At most the model's max_batch_size texts in one request; longer lists go as several requests.
        self._max_batch = max_batch
        # Reconnect within a second of Triton coming back (gRPC's default backoff grows to 120 s): the
        # health check that follows `ready()` must see a restarted Triton soon.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        # With `header` ('<key>=<value>', see llmmesh.common.triton_auth), every call opens Triton's restricted
        # protocols.
        interceptors = [*client_interceptors(), *header_interceptors(header)]
        self._channel = grpc.aio.insecure_channel(url, options=options, interceptors=interceptors)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    @property
    def model(self) -> str:
        return self._model

    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        if not texts:
            return []
        limit = self._timeout if timeout is None else min(timeout, self._timeout)
        if limit <= 0:
            raise DeadlineExceeded(f"safety classifier {self._model}: the request's deadline has passed")
        step = self._max_batch
        parts = await asyncio.gather(*(self._infer(texts[i : i + step], limit) for i in range(0, len(texts), step)))
        return [p for part in parts for p in part]

    async def _infer(self, texts: list[str], timeout: float) -> list[float]:
        request = service_pb2.ModelInferRequest(model_name=self._model)
        tensor = request.inputs.add()
        tensor.name = INPUT
        tensor.datatype = "BYTES"
        tensor.shape.extend([len(texts), 1])
        request.raw_input_contents.append(bytes_tensor(texts))
        request.outputs.add().name = OUTPUT
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"safety classifier {self._model}: no answer in {timeout:.3g} s") from exc
            raise Unavailable(
                f"safety classifier {self._model} at {self._url}: {exc.code().name}: {exc.details()}"
            ) from exc
        for i, out in enumerate(response.outputs):
            if out.name == OUTPUT:
                scores = array("f", response.raw_output_contents[i]).tolist()
                if len(scores) == len(texts):
                    return scores
                break
        raise Unavailable(f"safety classifier {self._model}: expected {len(texts)} {OUTPUT} values")

    async def ready(self) -> bool:
        try:
            reply = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self._model), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def close(self) -> None:
        await self._channel.close()


class LocalClassifier:
    """alt-profanity-check scored in this process with the Triton model's `Scorer`: ~0.05 ms for a clause,
    ~0.13 for a sentence, run on the event loop (handing that to a thread would cost more than it takes);
    texts of more than `INLINE_CHARS` in all (a long prompt: ~1.5 µs a character) are scored in a thread so
    that the loop's other streams do not wait. Loading the package takes ~2.5 s and ~80 MB: `load()` does
    it at start; otherwise the first `score` loads it in a thread while the event loop goes on."""

    INLINE_CHARS = 1000

    model = "alt-profanity-check (in process)"

    def __init__(self) -> None:
        self._scorer: Any = None
        self._loading: asyncio.Lock | None = None

    def load(self) -> None:
        if self._scorer is not None:
            return
        started = time.perf_counter()
        from profanity_check import profanity_check as package

        from llmmesh.common.safety.scorer import Scorer

        # ValueError when the installed package is not the model Scorer reads: the stage does not start.
        self._scorer = Scorer(package.vectorizer, package.model)
        log.info("safety_classifier_loaded", model=self.model, seconds=round(time.perf_counter() - started, 2))

    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        if not texts:
            return []
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"safety classifier {self.model}: the request's deadline has passed")
        if self._scorer is None:
            self._loading = self._loading or asyncio.Lock()
            async with self._loading:
                await asyncio.to_thread(self.load)
        if sum(map(len, texts)) > self.INLINE_CHARS:
            return [float(p) for p in await asyncio.to_thread(self._scorer, texts)]
        return [float(p) for p in self._scorer(texts)]

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class StageClassifier:
    """The classifier a policy names: Triton's model (`classifier.runs_in: triton`, the default) or the
    CPU model in this process (`stage`). A stream asks once, with the policy it keeps to its end."""

    def __init__(self, triton: TritonClassifier | None, local: LocalClassifier | None = None) -> None:
        self.triton = triton
        self.local = local or LocalClassifier()

    def pick(self, policy: SafetyPolicy, prompts: bool = False) -> Classifier | None:
        """None when the policy's classifier is off (for `prompts`: or does not score prompts), or when it
        runs in Triton and this stage has no Triton URL (the layer is skipped; logged at start)."""
        settings = policy.classifier
        if not settings.enabled or (prompts and not settings.check_prompts):
            return None
        return self.local if settings.runs_in == "stage" else self.triton

    @property
    def model(self) -> str:
        return self.triton.model if self.triton is not None else self.local.model

    async def ready(self, policy: SafetyPolicy) -> bool:
        """False while the policy's classifier runs in Triton and Triton does not serve its model."""
        settings = policy.classifier
        if not settings.enabled or settings.runs_in == "stage" or self.triton is None:
            return True
        return await self.triton.ready()

    async def close(self) -> None:
        if self.triton is not None:
            await self.triton.close()


def classifier_for(url: str, model: str, header: str = "", policy: SafetyPolicy | None = None) -> StageClassifier:
    """The stage's classifiers: Triton's model at `url` (none without a URL: that layer is then skipped
    while the policy runs it in Triton) and the in-process one, loaded now when `policy` runs it there."""
    stage = StageClassifier(TritonClassifier(url, model, header=header) if url else None)
    if policy is not None and stage.pick(policy) is stage.local:
        stage.local.load()
    return stage
