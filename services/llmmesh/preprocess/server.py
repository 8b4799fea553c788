"""Preprocess: settings and server assembly."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from llmmesh.common.model_assets import load_registry_assets
from llmmesh.common.registry import load_registry
from llmmesh.common.safety import PolicyStore, StageClassifier, classifier_for
from llmmesh.common.server import Service, build_server
from llmmesh.common.settings import ServiceSettings
from llmmesh.preprocess.domain import Limits, Preparer
from llmmesh.preprocess.servicer import PreprocessServicer
from llmmesh.preprocess.stage import PreprocessStage
from llmmesh.stages.v1 import preprocess_pb2, preprocess_pb2_grpc

__all__ = ["PreprocessSettings", "build_servicer", "create_server"]


class PreprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_PREPROCESS_", frozen=True, extra="ignore")

    # The model registry (YAML, llmmesh.common.registry): every model's names, tokenizer and chat template,
    # context length; the same file infer and postprocess read. Empty = the one shipped with llmmesh.
    model_registry: str = ""
    # Inserted as the system turn when a request has none (SmolLM2's own default prompt derails it).
    default_system_prompt: str = "You are a helpful assistant."
    default_max_tokens: int = Field(default=256, gt=0)
    max_stop_strings: int = Field(default=16, ge=0)
    max_stop_chars: int = Field(default=256, gt=0)
    # Input limits (INVALID_ARGUMENT beyond them): max_tokens ceiling, prompt characters (all chat contents
    # together), chat messages, characters of one chat message.
    max_tokens_limit: int = Field(default=8192, gt=0)
    max_prompt_chars: int = Field(default=65536, gt=0)
    max_chat_messages: int = Field(default=256, gt=0)
    max_message_chars: int = Field(default=32768, gt=0)
    # The safety policy that checks prompts (same file as postprocess's); empty = the default policy.
    safety_policy_path: str = ""
    # Triton's gRPC address for the policy's classifier (`runs_in: triton`); empty = prompts are checked
    # without it (a policy with `runs_in: stage` scores them in this process, no Triton needed).
    triton_url: str = ""
    # The header ('<key>=<value>') that Triton's restricted protocols require (llmmesh.common.triton_auth);
    # empty = none sent. Never logged.
    triton_header: SecretStr = SecretStr("")


def build_servicer(settings: PreprocessSettings) -> tuple[PreprocessServicer, StageClassifier]:
    """The servicer (tokenizer loaded) and its classifier client (to close): served by `create_server`, or
    called in the gateway's own process (`llmmesh.preprocess.local`)."""
    registry = load_registry(settings.model_registry)
    preparer = Preparer(
        load_registry_assets(registry),
        registry.default.name,
        settings.default_system_prompt,
        Limits(
            settings.default_max_tokens,
            settings.max_stop_strings,
            settings.max_stop_chars,
            max_tokens_limit=settings.max_tokens_limit,
            max_prompt_chars=settings.max_prompt_chars,
            max_chat_messages=settings.max_chat_messages,
            max_message_chars=settings.max_message_chars,
        ),
        aliases=registry.aliases(),
        remote=[e.name for e in registry if e.backend == "openai"],
    )
    policies = PolicyStore(settings.safety_policy_path or None)
    policy = policies.current()
    classifier = classifier_for(
        settings.triton_url, policy.classifier.model, settings.triton_header.get_secret_value(), policy
    )
    return PreprocessServicer(PreprocessStage(preparer, policies, classifier)), classifier


async def create_server(settings: PreprocessSettings) -> Service:
    """Loads the tokenizer (warm-up), then builds the server; SERVING once loaded."""
    servicer, classifier = build_servicer(settings)
    name = preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name
    service = build_server(
        "preprocess",
        settings,
        [name],
        lambda server: preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, server),
    )
    service.closers.append(classifier.close)
    await service.set_serving(True)
    return service
