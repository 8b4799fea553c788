"""How a client reaches the mesh: address, TLS, credentials sent as metadata, default deadline, retries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from llmmesh.client.retry import RetryPolicy

__all__ = ["ClientConfig", "Credentials", "Metadata", "TlsConfig"]

Metadata = Sequence[tuple[str, str]]


def _read(source: str | Path | bytes | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True)
class TlsConfig:
    """PEM material for a TLS channel; all optional (no roots = the system's trust store).

    `private_key` and `certificate_chain` together are the client certificate for mutual TLS.
    `server_name` overrides the name checked against the server certificate (e.g. when dialling an IP).
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | bytes | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """From PEM file paths (or PEM bytes, passed through)."""
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both cert and key")
        return cls(_read(ca), _read(key), _read(cert), server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class Credentials:
    """Who is calling: sent as metadata on every call. Never printed (repr hides the secrets)."""

    api_key: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    # The header the gateway reads API keys from.
    api_key_header: str = "x-api-key"

    def metadata(self) -> list[tuple[str, str]]:
        out = []
        if self.api_key:
            out.append((self.api_key_header, self.api_key))
        if self.bearer_token:
            out.append(("authorization", f"Bearer {self.bearer_token}"))
        return out


@dataclass(frozen=True)
class ClientConfig:
    """Everything a sync or asyncio client needs to open its channel and make calls."""

    address: str = "127.0.0.1:50051"
    tls: TlsConfig | None = None
    credentials: Credentials | None = None
    # Extra metadata sent on every call, e.g. ("x-tenant", "a").
    metadata: Metadata = ()
    # Default deadline of a whole call (all attempts together), seconds; None = none.
    timeout: float | None = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Raw gRPC channel arguments, e.g. ("grpc.max_receive_message_length", 8 << 20).
    channel_options: Sequence[tuple[str, Any]] = ()

    def call_metadata(self, extra: Metadata | None = None) -> list[tuple[str, str]]:
        md = list(self.metadata)
        if self.credentials is not None:
            md.extend(self.credentials.metadata())
        md.extend(extra or ())
        return md

    def grpc_options(self) -> list[tuple[str, Any]]:
        options = list(self.channel_options)
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options
