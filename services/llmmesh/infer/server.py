"""Infer: settings and server assembly. SERVING while Triton and at least one routed model are ready.

Routes come from the model registry (llmmesh.common.registry): each model's name and aliases -> its
`triton_model`, or, for `backend: openai`, its OpenAI-compatible endpoint (infer/openai_backend.py). Infer
never reads a tokenizer, so it loads the registry without them (its image has none).

Readiness is Triton's alone: a remote endpoint that is slow or down fails its own requests (UNAVAILABLE),
it never takes infer, and so the Triton models, out of service. A registry with no Triton model needs no
Triton: infer is SERVING once started.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from llmmesh.common.logging import get_logger
from llmmesh.common.registry import load_registry
from llmmesh.common.server import Service, build_server, grpc_options
from llmmesh.common.settings import ServiceSettings
from llmmesh.infer.backend import InferenceBackend, TritonBackend
from llmmesh.infer.openai_backend import OpenAIBackend
from llmmesh.infer.result_store import MemoryStore, RedisStore, ResultStore
from llmmesh.infer.servicer import InferServicer
from llmmesh.infer.sharing import SharingHub, SharingPolicy
from llmmesh.stages.v1 import infer_pb2, infer_pb2_grpc

__all__ = ["InferSettings", "create_server"]

log = get_logger(__name__)


class InferSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_INFER_", frozen=True, extra="ignore")

    # Triton's gRPC address.
    triton_url: str = "127.0.0.1:8001"
    # The header ('<key>=<value>') that Triton's restricted protocols require (llmmesh.common.triton_auth);
    # empty = none sent. Never logged.
    triton_header: SecretStr = SecretStr("")
    # The model registry (YAML): which Triton model serves each model name and alias; the same file
    # preprocess and postprocess read. Empty = the one shipped with llmmesh.
    model_registry: str = ""
    # How often Triton's readiness is checked for the health status.
    health_interval_seconds: float = Field(default=1.0, gt=0)
    # Requests go to Triton over this many shared ModelStreamInfer calls (each cancelled on its own with
    # TensorRT-LLM's stop request; llmmesh.infer.backend.TritonBackend); 0 = a call per request.
    triton_shared_calls: int = Field(default=0, ge=0)

    # Dedup (see infer/sharing.py): identical deterministic requests share one generation, completed ones
    # are replayed from the result cache, client request ids are idempotent. False: every request generates.
    dedup: bool = True
    # Where results and request ids are kept: "memory" (this process) or "redis" (shared by replicas).
    cache_backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Completed shareable results are replayed for this long; the in-process cache holds at most this many bytes.
    cache_ttl_seconds: float = Field(default=300.0, gt=0)
    cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # A client's request id, resent within this window, attaches to or replays its first request.
    idempotency_window_seconds: float = Field(default=600.0, gt=0)


def _policy(settings: InferSettings) -> SharingPolicy:
    return SharingPolicy(
        enabled=settings.dedup,
        cache_ttl_seconds=settings.cache_ttl_seconds,
        idempotency_window_seconds=settings.idempotency_window_seconds,
    )


def _store(settings: InferSettings) -> ResultStore | None:
    if not settings.dedup:
        return None
    if settings.cache_backend == "redis":
        log.info("result_store", backend="redis", url=settings.redis_url.split("@")[-1])
        return RedisStore(settings.redis_url)
    return MemoryStore(settings.cache_max_bytes, settings.cache_ttl_seconds, settings.idempotency_window_seconds)


async def _watch(service: Service, backend: InferenceBackend, interval: float) -> None:
    serving: bool | None = None
    while True:
        ready = await backend.ready()
        if ready != serving:
            serving = ready
            log.info("triton_readiness", ready=ready)
            await service.set_serving(ready)
        await asyncio.sleep(interval)


async def create_server(settings: InferSettings, backend: InferenceBackend | None = None) -> Service:
    # Reconnect to a restarted Triton within a second (gRPC's default backoff grows to 120 s): readiness,
    # and so SERVING, comes back as soon as Triton does, without restarting infer.
    options = [
        *grpc_options(settings),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    registry = load_registry(settings.model_registry, tokenizers=False)
    routes = registry.triton_models()
    backend = backend or TritonBackend(
        settings.triton_url,
        routes,
        options,
        settings.triton_header.get_secret_value(),
        shared_calls=settings.triton_shared_calls,
    )
    hub = SharingHub(backend, _store(settings), _policy(settings))
    text = OpenAIBackend(registry.models)
    servicer = InferServicer(hub, text if text.models else None)
    if text.models:
        log.info("openai_models", models=list(text.models))
    name = infer_pb2.DESCRIPTOR.services_by_name["InferService"].full_name
    service = build_server(
        "infer",
        settings,
        [name],
        lambda server: infer_pb2_grpc.add_InferServiceServicer_to_server(servicer, server),
    )
    service.companions.append(servicer.mux)
    if routes:
        service.tasks.append(asyncio.create_task(_watch(service, backend, settings.health_interval_seconds)))
    else:
        await service.set_serving(True)
    service.closers.append(hub.close)
    service.closers.append(backend.close)
    service.closers.append(text.close)
    return service
