"""Infer: settings and server assembly. SERVING only while Triton and every routed model are ready."""

from __future__ import annotations

import asyncio

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.logging import get_logger
from llmmesh.common.server import Service, build_server, grpc_options
from llmmesh.common.settings import ServiceSettings
from llmmesh.infer.backend import InferenceBackend, TritonBackend
from llmmesh.infer.servicer import InferServicer
from llmmesh.stages.v1 import infer_pb2, infer_pb2_grpc

__all__ = ["InferSettings", "create_server"]

log = get_logger(__name__)


class InferSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_INFER_", frozen=True, extra="ignore")

    # Triton's gRPC address.
    triton_url: str = "127.0.0.1:8001"
    # Model name (as clients say it) -> Triton model name. JSON in the environment.
    models: dict[str, str] = Field(default_factory=lambda: {"smollm2": "smollm2"})
    # How often Triton's readiness is checked for the health status.
    health_interval_seconds: float = Field(default=1.0, gt=0)


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
    backend = backend or TritonBackend(settings.triton_url, settings.models, grpc_options(settings))
    name = infer_pb2.DESCRIPTOR.services_by_name["InferService"].full_name
    service = build_server(
        "infer",
        settings,
        [name],
        lambda server: infer_pb2_grpc.add_InferServiceServicer_to_server(InferServicer(backend), server),
    )
    service.tasks.append(asyncio.create_task(_watch(service, backend, settings.health_interval_seconds)))
    service.closers.append(backend.close)
    return service
