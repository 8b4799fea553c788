"""Gateway: settings and server assembly. SERVING while all three stages report SERVING."""

from __future__ import annotations

import asyncio

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.logging import get_logger
from llmmesh.common.server import Service, build_server, channel
from llmmesh.common.settings import ServiceSettings
from llmmesh.gateway.orchestrator import Orchestrator, Stages
from llmmesh.gateway.servicer import GatewayServicer
from llmmesh.stages.v1 import infer_pb2_grpc, postprocess_pb2_grpc, preprocess_pb2_grpc
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["GatewaySettings", "create_server"]

log = get_logger(__name__)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_GATEWAY_", frozen=True, extra="ignore")

    preprocess_url: str = "127.0.0.1:50052"
    infer_url: str = "127.0.0.1:50053"
    postprocess_url: str = "127.0.0.1:50054"
    health_interval_seconds: float = Field(default=1.0, gt=0)
    # A request waits at most this long for an unconnected stage before failing with UNAVAILABLE.
    stage_connect_timeout_seconds: float = Field(default=2.0, gt=0)


async def _stage_serving(channel_: grpc.aio.Channel) -> bool:
    try:
        reply = await health_pb2_grpc.HealthStub(channel_).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _watch(service: Service, channels: dict[str, grpc.aio.Channel], interval: float) -> None:
    serving: bool | None = None
    while True:
        states = dict(zip(channels, await asyncio.gather(*map(_stage_serving, channels.values())), strict=True))
        ready = all(states.values())
        if ready != serving:
            serving = ready
            log.info("stages_readiness", ready=ready, **states)
            await service.set_serving(ready)
        await asyncio.sleep(interval)


async def create_server(settings: GatewaySettings) -> Service:
    channels = {
        "preprocess": channel(settings.preprocess_url, settings),
        "infer": channel(settings.infer_url, settings),
        "postprocess": channel(settings.postprocess_url, settings),
    }
    stages = Stages(
        preprocess=preprocess_pb2_grpc.PreprocessServiceStub(channels["preprocess"]),
        infer=infer_pb2_grpc.InferServiceStub(channels["infer"]),
        postprocess=postprocess_pb2_grpc.PostprocessServiceStub(channels["postprocess"]),
        channels=channels,
        connect_timeout=settings.stage_connect_timeout_seconds,
    )
    name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
    service = build_server(
        "gateway",
        settings,
        [name],
        lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GatewayServicer(Orchestrator(stages)), server
        ),
    )
    service.tasks.append(asyncio.create_task(_watch(service, channels, settings.health_interval_seconds)))
    for ch in channels.values():
        service.closers.append(ch.close)
    return service
