"""Postprocess: settings and server assembly."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.model_assets import load_model_assets
from llmmesh.common.safety import BlockedTerm, PolicyStore, SafetyStream, TritonClassifier
from llmmesh.common.server import Service, build_server
from llmmesh.common.settings import ServiceSettings
from llmmesh.postprocess.chunker import ChunkingMode
from llmmesh.postprocess.domain import TextPipeline
from llmmesh.postprocess.servicer import PostprocessServicer
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

__all__ = ["PostprocessSettings", "StreamSafety", "build_servicer", "create_server"]

CHUNKING_FROM_PROTO = {
    generation_pb2.CHUNKING_MODE_UNSPECIFIED: ChunkingMode.TOKEN,
    generation_pb2.CHUNKING_MODE_TOKEN: ChunkingMode.TOKEN,
    generation_pb2.CHUNKING_MODE_CLAUSE: ChunkingMode.CLAUSE,
    generation_pb2.CHUNKING_MODE_SENTENCE: ChunkingMode.SENTENCE,
}


class PostprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_POSTPROCESS_", frozen=True, extra="ignore")

    default_model: str = "smollm2"
    # More model names with the same vocabulary (see preprocess's MODEL_ALIASES). JSON list.
    model_aliases: list[str] = Field(default_factory=list)
    gguf_path: str = ""
    # The safety policy file (YAML); empty = services/common/safety/policies/default.yaml. Reloaded on change.
    safety_policy_path: str = ""
    # More blocked terms (category "custom"), JSON list in the environment.
    extra_blocked_terms: list[str] = Field(default_factory=list)
    # Triton's gRPC address for the policy's classifier; empty = the classifier layer is off.
    triton_url: str = ""


class StreamSafety:
    """The safety library's stream as the pipeline's safety stage."""

    def __init__(self, stream: SafetyStream) -> None:
        self._stream = stream

    async def push(self, text: str, final: bool = False) -> tuple[str, str | None]:
        verdict = await self._stream.push(text, final=final)
        return verdict.text, verdict.blocked


def build_servicer(settings: PostprocessSettings) -> tuple[PostprocessServicer, TritonClassifier | None]:
    """The servicer and its classifier client (to close): served by `create_server`, or called in the
    gateway's own process (`llmmesh.postprocess.local`)."""
    assets = load_model_assets(settings.gguf_path or None)
    policies = PolicyStore(
        settings.safety_policy_path or None,
        extra_terms=[BlockedTerm(t, "custom") for t in settings.extra_blocked_terms],
    )
    classifier = (
        TritonClassifier(settings.triton_url, policies.current().classifier.model) if settings.triton_url else None
    )
    models = (settings.default_model, *settings.model_aliases)

    def make_pipeline(start: postprocess_pb2.Start) -> TextPipeline:
        if start.model and start.model not in models:
            raise InvalidArgument("start.model", f"unknown model {start.model!r}")
        chunking = CHUNKING_FROM_PROTO.get(start.chunking)
        if chunking is None:
            raise InvalidArgument("start.chunking", f"unknown chunking mode {start.chunking}")
        policy = policies.current()
        use_classifier = classifier if policy.classifier.enabled else None
        return TextPipeline(
            assets.token_bytes, list(start.stop), StreamSafety(SafetyStream(policy, use_classifier)), chunking
        )

    return PostprocessServicer(make_pipeline), classifier


async def create_server(settings: PostprocessSettings) -> Service:
    servicer, classifier = build_servicer(settings)
    name = postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name
    service = build_server(
        "postprocess",
        settings,
        [name],
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server),
    )
    if classifier is not None:
        service.closers.append(classifier.close)
    await service.set_serving(True)
    return service
