"""The preprocess stage: validate, template, tokenize, hash for dedup, check the prompt's safety.

`PreprocessStage.prepare` is what the gateway calls, in its own process (this object) or over gRPC
(`llmmesh.gateway.stages.RemotePreprocess`, served by `PreprocessServicer`). It knows nothing of gRPC:
bad input raises the domain's `InvalidArgument`, a lost classifier `Unavailable` or `DeadlineExceeded`.

A model served by an OpenAI-compatible endpoint gets `backend = "openai"` and no input ids; its request
hash covers the model, the exact text of its messages, every sampling parameter, the stop strings and the
policy version, and it is never shareable (`REMOTE_NOT_SHAREABLE` says why).
"""

from __future__ import annotations

import struct

import xxhash
from opentelemetry import trace

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.safety import Classifier, PolicyStore, SafetyPolicy, StageClassifier, check_prompt
from llmmesh.preprocess.dedup import request_hash, shareability
from llmmesh.preprocess.domain import ChatTurn, Prepared, PrepareInput, Preparer, SamplingInput
from llmmesh.stages.v1 import preprocess_pb2
from llmmesh.v1 import generation_pb2

__all__ = ["REMOTE_NOT_SHAREABLE", "PreprocessStage"]

_tracer = trace.get_tracer("llmmesh.preprocess")

REMOTE_NOT_SHAREABLE = (
    "served by an OpenAI-compatible endpoint: its answers are not shared nor replayed (a remote endpoint "
    "does not promise the same text for the same request, even greedy or seeded, and the mesh's result "
    "cache holds token ids)"
)


def _input_from_proto(req: generation_pb2.GenerateRequest) -> PrepareInput:
    s = req.sampling
    sampling = SamplingInput(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
    )
    which = req.WhichOneof("input")
    return PrepareInput(
        request_id=req.request_id,
        model=req.model,
        prompt=req.prompt if which == "prompt" else None,
        chat=tuple(ChatTurn(m.role, m.content) for m in req.chat.messages) if which == "chat" else None,
        sampling=sampling,
    )


def _prepared_to_proto(p: Prepared) -> preprocess_pb2.PrepareResponse:
    sampling = preprocess_pb2.ResolvedSampling(
        max_tokens=p.sampling.max_tokens,
        temperature=p.sampling.temperature,
        top_p=p.sampling.top_p,
        top_k=p.sampling.top_k,
    )
    if p.sampling.seed is not None:
        sampling.seed = p.sampling.seed
    return preprocess_pb2.PrepareResponse(
        request_id=p.request_id,
        model=p.model,
        input_ids=p.input_ids,
        end_id=p.end_id,
        pad_id=p.pad_id,
        sampling=sampling,
        stop=p.stop,
        stop_token_ids=[preprocess_pb2.TokenIds(ids=ids) for ids in p.stop_token_ids],
        backend=p.backend,
    )


def _text_request_hash(prepared: Prepared, policy_version: str) -> str:
    """A text request's hash: dedup's (model, sampling, stop strings, policy; no ids) extended with the exact
    text of every turn, each tagged and length-prefixed so that no two conversations hash alike."""
    h = xxhash.xxh3_128()
    h.update(request_hash(prepared, policy_version).encode())
    for role, content in prepared.messages:
        for tag, value in ((b"role", role), (b"content", content)):
            data = value.encode()
            h.update(tag + struct.pack("<Q", len(data)) + data)
    return h.hexdigest()


def _prompt_text(req: generation_pb2.GenerateRequest) -> str:
    if req.WhichOneof("input") == "chat":
        return "\n".join(m.content for m in req.chat.messages)
    return req.prompt


class PreprocessStage:
    def __init__(self, preparer: Preparer, policies: PolicyStore, classifier: StageClassifier | None = None) -> None:
        self._preparer = preparer
        self._policies = policies
        self._classifier = classifier

    def _classifier_for(self, policy: SafetyPolicy) -> Classifier | None:
        return None if self._classifier is None else self._classifier.pick(policy, prompts=True)

    async def prepare(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None, defer_classifier: bool = False
    ) -> preprocess_pb2.PrepareResponse:
        """The model input for `request`; `timeout` bounds the prompt classifier's call (the request's time left).

        `defer_classifier`: the caller will get the classifier's verdict from `check_prompt` and release
        nothing before it; when the policy allows that (`classifier.prompt_check: alongside`) the classifier
        is left out here and the answer says `prompt_check_pending`. Blocked terms are checked here always."""
        if request.chunking not in generation_pb2.ChunkingMode.values():
            raise InvalidArgument("chunking", f"unknown chunking mode {request.chunking}")
        with _tracer.start_as_current_span("template_tokenize") as span:
            prepared = self._preparer.prepare(_input_from_proto(request))
            span.set_attribute("gen_ai.request.model", prepared.model)
            if prepared.backend == "triton":
                span.set_attribute("gen_ai.usage.input_tokens", len(prepared.input_ids))
        response = _prepared_to_proto(prepared)
        response.chunking = request.chunking
        policy = self._policies.current()
        response.safety_policy_version = policy.version
        if prepared.backend == "triton":
            response.request_hash = request_hash(prepared, policy.version)
            response.shareable, response.not_shareable_reason = shareability(prepared)
        else:
            response.request_hash = _text_request_hash(prepared, policy.version)
            response.shareable, response.not_shareable_reason = False, REMOTE_NOT_SHAREABLE
        classifier = self._classifier_for(policy)
        if classifier is not None and defer_classifier and policy.classifier.prompt_check == "alongside":
            response.prompt_check_pending = True
            classifier = None
        with _tracer.start_as_current_span("safety_check_prompt") as span:
            blocked = await check_prompt(policy, _prompt_text(request), classifier, timeout)
            span.set_attribute("llmmesh.safety.blocked", blocked or "")
        if blocked:
            response.blocked_category = blocked
            response.prompt_check_pending = False
        return response

    async def check_prompt(
        self, request: generation_pb2.GenerateRequest, timeout: float | None = None
    ) -> preprocess_pb2.CheckPromptResponse:
        """The verdict on the prompt of a request whose `prepare` deferred the classifier: the whole prompt
        check under the policy in force now (its blocked terms again: microseconds)."""
        policy = self._policies.current()
        with _tracer.start_as_current_span("safety_check_prompt") as span:
            blocked = await check_prompt(policy, _prompt_text(request), self._classifier_for(policy), timeout)
            span.set_attribute("llmmesh.safety.blocked", blocked or "")
        return preprocess_pb2.CheckPromptResponse(blocked_category=blocked or "", safety_policy_version=policy.version)
