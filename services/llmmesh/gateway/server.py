"""Gateway: settings and server assembly. SERVING while every stage it calls over gRPC reports SERVING."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Self

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from llmmesh.common.logging import get_logger
from llmmesh.common.registry import load_registry
from llmmesh.common.server import Service, build_server, channel
from llmmesh.common.settings import ServiceSettings
from llmmesh.gateway.admission import AdmissionController, AdmissionLimits
from llmmesh.gateway.auth import AuthInterceptor, KeyTable
from llmmesh.gateway.openai_http import HttpServer, OpenAIFrontDoor
from llmmesh.gateway.orchestrator import Orchestrator
from llmmesh.gateway.routing import Router
from llmmesh.gateway.servicer import GatewayServicer, list_models
from llmmesh.gateway.stages import (
    Postprocess,
    Preprocess,
    RemoteInfer,
    RemotePostprocess,
    RemotePreprocess,
    Stages,
)
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["INPROCESS", "GatewaySettings", "create_server"]

INPROCESS = "inprocess"

log = get_logger(__name__)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_GATEWAY_", frozen=True, extra="ignore")

    # "inprocess" for preprocess or postprocess: that stage runs in this process (llmmesh.<stage>.stage, the
    # stage itself), configured by its own LLMMESH_<STAGE>_* settings; no process to deploy for it.
    # Preprocess: no Prepare round trip before the first token. Postprocess: two gRPC messages less per token.
    preprocess_url: str = "127.0.0.1:50052"
    infer_url: str = "127.0.0.1:50053"
    postprocess_url: str = "127.0.0.1:50054"
    health_interval_seconds: float = Field(default=1.0, gt=0)
    # A request waits at most this long for an unconnected stage before failing with UNAVAILABLE.
    stage_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    # Requests go to infer and postprocess as streams on a few long-lived calls per stage (llmmesh.common.mux):
    # this many calls per stage, each taking new requests for `stage_call_seconds` before a new call (over
    # the round-robin channel: maybe to another replica) takes its place.
    stage_calls: int = Field(default=2, ge=1)
    # Who reads infer's token ids: "postprocess" (a remote postprocess reads plain answers from infer itself,
    # with its LLMMESH_POSTPROCESS_INFER_URL: token ids cross the gateway not at all, text once) or "gateway"
    # (it relays infer's ids to postprocess). Cascades and fallbacks with a first-token timeout, and a
    # postprocess in this process, always take the gateway's order.
    hop_order: Literal["gateway", "postprocess"] = "postprocess"
    stage_call_seconds: float = Field(default=30.0, gt=0)

    # Admission control (admission.py): generations in flight, requests waiting for a slot (interactive
    # ahead of batch), and a per-client token bucket (requests a second, burst; 0 = no rate limit).
    max_inflight: int = Field(default=256, ge=1)
    max_queued: int = Field(default=1024, ge=0)
    rate_limit_per_second: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=0, ge=0)

    # Security: callers' API keys (llmmesh.gateway.auth) and the public port's client certificates
    # (llmmesh.common.tls). API keys from a file (one `name:key` or `key` per line) and/or a JSON list of
    # the same strings; none at all = authentication off.
    api_keys_file: str = ""
    api_keys: tuple[SecretStr, ...] = ()
    # Require a client certificate on the public port, signed by `public_ca_file` (empty = `tls_ca_file`).
    public_client_auth: bool = False
    public_ca_file: str = ""
    # Who may share a generation (in-flight joining, the result cache): "caller" (the same API key's
    # name, or the same peer host when auth is off), "global" (every caller), or "" = "caller" when API
    # keys are configured, else "global". Idempotency keys are always scoped by caller.
    sharing_scope: Literal["", "caller", "global"] = ""
    # The model registry (YAML; empty = the shipped one): the models and routes a request's `model` may
    # name. Read without tokenizers (the gateway never tokenizes).
    model_registry: str = ""
    # The OpenAI-compatible HTTP front door (openai_http.py) on this port of `host`, with the same API keys
    # (bearer tokens), TLS certificate and client-certificate rule as the gRPC port; 0 = none.
    http_port: int = Field(default=8080, ge=0, le=65535)

    @model_validator(mode="after")
    def _public_client_auth_needs_tls(self) -> Self:
        if self.public_client_auth and not (self.tls_cert_file and (self.public_ca_file or self.tls_ca_file)):
            raise ValueError("public_client_auth needs tls_cert_file, tls_key_file and a CA to check clients against")
        return self


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


def _keys(settings: GatewaySettings) -> KeyTable:
    keys = KeyTable.from_sources(settings.api_keys_file, [k.get_secret_value() for k in settings.api_keys])
    log.info("caller_auth", enabled=bool(len(keys)), keys=len(keys))
    return keys


def _http_ssl(settings: GatewaySettings) -> dict[str, Any]:
    """uvicorn's TLS settings: the gRPC port's certificate, and its client-certificate rule."""
    if not settings.tls_cert_file:
        return {}
    ssl: dict[str, Any] = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
    if settings.public_client_auth:
        ssl["ssl_ca_certs"] = settings.public_ca_file or settings.tls_ca_file
        ssl["ssl_cert_reqs"] = ssl_module.CERT_REQUIRED
    return ssl


def _local_preprocess() -> tuple[Preprocess, Callable[[], Awaitable[None]] | None]:
    """Preprocess in this process: the stage itself, configured by its own LLMMESH_PREPROCESS_* settings.
    Imported here, only then: a gateway that calls a remote preprocess loads no tokenizer."""
    from llmmesh.preprocess.server import PreprocessSettings, build_servicer

    servicer, classifier = build_servicer(PreprocessSettings())
    return servicer.stage, classifier.close


def _local_postprocess() -> tuple[Postprocess, Callable[[], Awaitable[None]] | None]:
    """Postprocess in this process (as `_local_preprocess`): no hyperscan, tokenizer or GGUF reader otherwise."""
    from llmmesh.postprocess.server import PostprocessSettings, build_servicer

    servicer, classifier = build_servicer(PostprocessSettings())
    return servicer.stage, classifier.close


async def create_server(settings: GatewaySettings) -> Service:
    channels: dict[str, grpc.aio.Channel] = {"infer": channel(settings.infer_url, settings)}
    closers: list[Callable[[], Awaitable[None]]] = []

    def muxed(adapter: Callable[..., Any]) -> Callable[[grpc.aio.Channel], Any]:
        return lambda ch: adapter(ch, settings.stage_calls, settings.stage_call_seconds)

    def stage(name: str, url: str, build_local: Callable[[], tuple[Any, Any]], remote: Callable[[Any], Any]) -> Any:
        """The stage's interface: the stage itself when `url` is "inprocess", else its gRPC adapter."""
        if url == INPROCESS:
            local, close = build_local()
            if close is not None:
                closers.append(close)
            return local
        channels[name] = channel(url, settings)
        return remote(channels[name])

    preprocess: Preprocess = stage("preprocess", settings.preprocess_url, _local_preprocess, RemotePreprocess)
    postprocess: Postprocess = stage(
        "postprocess", settings.postprocess_url, _local_postprocess, muxed(RemotePostprocess)
    )
    log.info(
        "stages",
        preprocess=settings.preprocess_url,
        infer=settings.infer_url,
        postprocess=settings.postprocess_url,
    )
    stages = Stages(
        preprocess=preprocess,
        infer=muxed(RemoteInfer)(channels["infer"]),
        postprocess=postprocess,
        channels=channels,
        connect_timeout=settings.stage_connect_timeout_seconds,
    )
    admission = AdmissionController(
        AdmissionLimits(
            settings.max_inflight, settings.max_queued, settings.rate_limit_per_second, settings.rate_limit_burst
        )
    )
    name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
    keys = _keys(settings)
    interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(keys)] if len(keys) else []
    registry = load_registry(settings.model_registry, tokenizers=False)
    router = Router(registry)
    log.info("model_registry", path=str(registry.path), models=len(registry.models), routes=len(registry.routes))
    scope = settings.sharing_scope or ("caller" if interceptors else "global")
    log.info("sharing_scope", scope=scope)
    orchestrator = Orchestrator(stages, scope, router, settings.hop_order)
    service = build_server(
        "gateway",
        settings,
        [name],
        lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GatewayServicer(orchestrator, admission, registry), server
        ),
        interceptors=interceptors,
        require_client_auth=settings.public_client_auth,
        client_ca_file=settings.public_ca_file,
    )
    if settings.http_port:
        # The same orchestrator, admission and keys as the gRPC servicer: one mesh behind two doors.
        front = OpenAIFrontDoor(orchestrator, admission, keys, list_models(registry), lambda: service.serving)
        app = OpenTelemetryMiddleware(front.app, exclude_spans=["receive", "send"])
        service.companions.append(HttpServer(app, settings.host, settings.http_port, _http_ssl(settings)))
    service.tasks.append(asyncio.create_task(_watch(service, channels, settings.health_interval_seconds)))
    for ch in channels.values():
        service.closers.append(ch.close)
    service.closers.extend(closers)
    return service
