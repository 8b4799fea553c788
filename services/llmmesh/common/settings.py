"""Settings shared by every service, read once from the environment at start.

Each service subclasses `ServiceSettings` with its own prefix (`LLMMESH_GATEWAY_`, ...). Nothing reads
the environment at import time: `Settings()` is called by the entry point and passed down.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServiceSettings"]


class ServiceSettings(BaseSettings):
    """What every llmmesh service understands, under its own prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    # 0 picks a free port; the bound port is logged in the `serving` event.
    port: int = Field(default=0, ge=0, le=65535)
    log_level: str = "info"
    # In-flight streams get this long to finish after SIGTERM; keep it below the orchestrator's stop period.
    grace_seconds: float = Field(default=10.0, ge=0)
    # Largest gRPC message accepted or sent, in bytes.
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Prometheus metrics over HTTP on this port (path /metrics); unset = no metrics endpoint.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # OTLP traces: collector endpoint (grpc: "http://host:4317", http/protobuf: "http://host:4318");
    # empty = tracing off (no provider, no interceptors: no cost).
    otlp_endpoint: str = ""
    otlp_protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    # Share of new traces recorded; a request that arrives with a sampled parent is always recorded.
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    # TLS (see services/llmmesh/common/tls.py): PEM files; all empty = plaintext. This service's certificate serves
    # its port and is also presented as client certificate on its outgoing channels.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # The CA that signs the mesh's peers. Set: the server requires client certificates it signed (mutual
    # TLS; the gateway's public port only with `public_client_auth`) and outgoing channels use TLS,
    # verifying servers against it. Empty: no client certificates asked for, outgoing channels plaintext.
    tls_ca_file: str = ""

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return self
