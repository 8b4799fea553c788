"""Postprocess: settings and server assembly.

Health: SERVING while the current safety policy can be applied. A policy that enables the classifier needs
Triton to serve its model; while Triton does not (model not loaded, Triton unreachable), postprocess is
NOT_SERVING, whatever started it (`llmmesh up`, compose, Kubernetes). Checked every
`health_interval_seconds`, so a reloaded policy or a classifier that comes back flips it again.
"""

from __future__ import annotations

import asyncio

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.logging import get_logger
from llmmesh.common.model_assets import load_registry_assets
from llmmesh.common.registry import UnknownModel, load_registry
from llmmesh.common.safety import BlockedTerm, PolicyStore, SafetyStream, StageClassifier, classifier_for
from llmmesh.common.server import Service, build_server
from llmmesh.common.settings import ServiceSettings
from llmmesh.postprocess.chunker import Chunker, ChunkingMode
from llmmesh.postprocess.domain import TextPipeline
from llmmesh.postprocess.servicer import PostprocessServicer
from llmmesh.postprocess.stage import PostprocessStage
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

__all__ = ["PostprocessSettings", "StreamSafety", "build_servicer", "create_server"]

log = get_logger(__name__)

CHUNKING_FROM_PROTO = {
    generation_pb2.CHUNKING_MODE_UNSPECIFIED: ChunkingMode.TOKEN,
    generation_pb2.CHUNKING_MODE_TOKEN: ChunkingMode.TOKEN,
    generation_pb2.CHUNKING_MODE_CLAUSE: ChunkingMode.CLAUSE,
    generation_pb2.CHUNKING_MODE_SENTENCE: ChunkingMode.SENTENCE,
}


class PostprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_POSTPROCESS_", frozen=True, extra="ignore")

    # The model registry (YAML, llmmesh.common.registry): the vocabulary of each model a stream names; the
    # same file preprocess and infer read. Empty = the one shipped with llmmesh.
    model_registry: str = ""
    # The safety policy file (YAML); empty = services/llmmesh/common/safety/policies/default.yaml. Reloaded on change.
    safety_policy_path: str = ""
    # More blocked terms (category "custom"), JSON list in the environment.
    extra_blocked_terms: list[str] = Field(default_factory=list)
    # Triton's gRPC address for the policy's classifier (`runs_in: triton`); empty = that layer is off (a
    # policy with `runs_in: stage` scores in this process, no Triton needed).
    triton_url: str = ""
    # The header ('<key>=<value>') that Triton's restricted protocols require (llmmesh.common.triton_auth);
    # empty = none sent. Never logged.
    triton_header: SecretStr = SecretStr("")
    # How often the classifier's readiness is checked for the health status (with `triton_url`).
    health_interval_seconds: float = Field(default=1.0, gt=0)
    # Infer's address: with the gateway's hop order "postprocess" (its default) this stage reads each plain
    # answer's tokens from infer itself. Empty = it cannot (the gateway must use LLMMESH_GATEWAY_HOP_ORDER=gateway).
    infer_url: str = "127.0.0.1:50053"
    # Its requests to infer go as streams on this many long-lived calls, each taking new requests for
    # `stage_call_seconds` (over a round-robin channel a new call may go to another replica): as the gateway's.
    stage_calls: int = Field(default=2, ge=1)
    stage_call_seconds: float = Field(default=30.0, gt=0)
    # A request waits at most this long for infer's channel to connect (a restarted infer, a channel in
    # reconnect backoff) before failing with UNAVAILABLE: as the gateway's.
    stage_connect_timeout_seconds: float = Field(default=2.0, gt=0)


class StreamSafety:
    """The safety library's stream as the pipeline's safety stage."""

    def __init__(self, stream: SafetyStream) -> None:
        self._stream = stream

    async def push(self, text: str, final: bool = False) -> tuple[list[str], str | None]:
        verdict = await self._stream.push(text, final=final)
        if verdict.pieces:
            return list(verdict.pieces), verdict.blocked
        return ([verdict.text] if verdict.text else []), verdict.blocked

    @property
    def chunks(self) -> bool:
        return self._stream.chunks

    @property
    def held_chars(self) -> int:
        return self._stream.held_chars


def build_servicer(settings: PostprocessSettings) -> tuple[PostprocessServicer, StageClassifier]:
    """The servicer and its classifier client (to close): served by `create_server`, or called in the
    gateway's own process (`llmmesh.postprocess.local`)."""
    servicer, classifier, _ = _build(settings)
    return servicer, classifier


def _build(settings: PostprocessSettings) -> tuple[PostprocessServicer, StageClassifier, PolicyStore]:
    registry = load_registry(settings.model_registry)
    assets = load_registry_assets(registry)
    policies = PolicyStore(
        settings.safety_policy_path or None,
        extra_terms=[BlockedTerm(t, "custom") for t in settings.extra_blocked_terms],
    )
    policy = policies.current()
    classifier = classifier_for(
        settings.triton_url, policy.classifier.model, settings.triton_header.get_secret_value(), policy
    )

    def make_pipeline(start: postprocess_pb2.Start, deadline: float | None) -> TextPipeline:
        try:
            model = registry.resolve(start.model)
        except UnknownModel:
            raise InvalidArgument("start.model", f"unknown model {start.model!r}") from None
        chunking = CHUNKING_FROM_PROTO.get(start.chunking)
        if chunking is None:
            raise InvalidArgument("start.chunking", f"unknown chunking mode {start.chunking}")
        policy = policies.current()
        use_classifier = classifier.pick(policy)
        # A model served by an OpenAI-compatible endpoint streams text: no vocabulary.
        return TextPipeline(
            assets[model.name].token_bytes if model.backend == "triton" else None,
            list(start.stop),
            # CLAUSE chunking: the safety layer may release clause by clause (the policy's classifier.release).
            StreamSafety(
                SafetyStream(
                    policy,
                    use_classifier,
                    deadline,
                    clauses=Chunker(ChunkingMode.CLAUSE) if chunking is ChunkingMode.CLAUSE else None,
                )
            ),
            chunking,
        )

    return PostprocessServicer(PostprocessStage(make_pipeline)), classifier, policies


async def _watch(service: Service, policies: PolicyStore, classifier: StageClassifier, interval: float) -> None:
    serving: bool | None = None
    while True:
        usable = await classifier.ready(policies.current())
        if usable != serving:
            serving = usable
            log.info("safety_classifier_readiness", serving=usable, model=classifier.model)
            await service.set_serving(usable)
        await asyncio.sleep(interval)


async def create_server(settings: PostprocessSettings) -> Service:
    servicer, classifier, policies = _build(settings)
    infer_channel = None
    if settings.infer_url:
        from llmmesh.common.server import channel
        from llmmesh.gateway.stages import RemoteInfer

        infer_channel = channel(settings.infer_url, settings)
        servicer.infer = RemoteInfer(
            infer_channel, settings.stage_calls, settings.stage_call_seconds, settings.stage_connect_timeout_seconds
        )
    name = postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name
    service = build_server(
        "postprocess",
        settings,
        [name],
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server),
    )
    service.companions.append(servicer.mux)
    if infer_channel is not None:
        service.closers.append(infer_channel.close)
    service.closers.append(classifier.close)
    if classifier.triton is None:
        if classifier.pick(policies.current()) is None and policies.current().classifier.enabled:
            log.warning("safety_classifier_off", reason="no triton_url: the policy's classifier layer is skipped")
        await service.set_serving(True)
        return service
    # Health reads SERVING until set (grpc's default): NOT_SERVING until the first check says otherwise.
    await service.set_serving(False)
    service.tasks.append(asyncio.create_task(_watch(service, policies, classifier, settings.health_interval_seconds)))
    return service
