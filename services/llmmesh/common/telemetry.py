"""Tracing and metrics, set up once per process from the service's settings.

Tracing is off unless an OTLP endpoint is configured: then there is no tracer provider, no grpc
instrumentation interceptor and no propagation header, so it costs nothing. When on, OpenTelemetry's own
grpc instrumentation makes a server span for every RPC and a client span for every outbound call (health
checks and readiness polls excepted; context travels in the grpc metadata, bidirectional streams
included), sampling is parent-based with a ratio, and spans leave over OTLP (gRPC or HTTP/protobuf).
Prompt and output text never go on spans.

Metrics are Prometheus, served over HTTP on the service's metrics port when one is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc.aio
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from llmmesh.common.settings import ServiceSettings

__all__ = [
    "Telemetry",
    "client_interceptors",
    "server_interceptors",
    "set_attributes",
    "setup_telemetry",
    "tracing_enabled",
]

_provider: TracerProvider | None = None


class Telemetry:
    """What a service holds on to: the tracer provider to flush at shutdown, and the metrics server."""

    def __init__(self, provider: TracerProvider | None, metrics_server: Any | None) -> None:
        self.provider = provider
        self.metrics_server = metrics_server

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes the batch processor
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def _exporter(settings: ServiceSettings) -> Any:
    endpoint = settings.otlp_endpoint.rstrip("/")
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=f"{endpoint}/v1/traces")


def setup_telemetry(service: str, settings: ServiceSettings) -> Telemetry:
    """Installs the tracer provider (only when an OTLP endpoint is set) and starts the metrics server."""
    global _provider
    provider = None
    if settings.otlp_endpoint:
        provider = TracerProvider(
            resource=Resource.create({"service.name": f"llmmesh-{service}", "service.namespace": "llmmesh"}),
            sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(_exporter(settings), schedule_delay_millis=200))
        trace.set_tracer_provider(provider)
        _provider = provider
    metrics_server = None
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_server, _thread = start_http_server(settings.metrics_port, addr=settings.host)
    return Telemetry(provider, metrics_server)


def tracing_enabled() -> bool:
    return _provider is not None


def _traced() -> Any:
    """Which calls get spans: all but health checks, Triton readiness polls, reflection and the stages'
    multiplexed calls.

    Probes and the services' own watchers make those every few seconds; traced, they would bury the
    requests' traces in one-span traces (hundreds a minute on a mesh at rest). A multiplexed call lives for
    minutes and carries many requests: each request gets its own client and server span instead
    (llmmesh.common.mux), in its own trace.
    """
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(
        filters.any_of(
            filters.health_check(),
            filters.service_prefix("grpc.reflection."),
            filters.full_method_name("/inference.GRPCInferenceService/ServerReady"),
            filters.full_method_name("/inference.GRPCInferenceService/ModelReady"),
            filters.full_method_name("/llmmesh.stages.v1.InferService/GenerateStreams"),
            filters.full_method_name("/llmmesh.stages.v1.PostprocessService/ProcessStreams"),
        )
    )


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced())]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider, filter_=_traced()))


def set_attributes(span: trace.Span, attributes: Mapping[str, Any]) -> None:
    if span.is_recording():
        span.set_attributes(dict(attributes))
