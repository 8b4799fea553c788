"""TLS credentials from settings, in one place: server ports, channels between services, health probes.

- Server: TLS when `tls_cert_file` and `tls_key_file` are set. With `tls_ca_file` the server also requires
  a client certificate signed by that CA (mutual TLS); the gateway's public port asks for one only when
  `public_client_auth` is on (public callers authenticate with API keys, see `llmmesh.gateway.auth`).
- Channels to other services: TLS when `tls_ca_file` is set; the server is verified against that CA and the
  service presents its own certificate (`tls_cert_file`), so one certificate per service serves both ends.
- Nothing set: plaintext, as before.

Files are read once at start; rotating certificates means restarting the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    # Only a type here: the health probe imports this module and needs no settings machinery.
    from llmmesh.common.settings import ServiceSettings

__all__ = ["channel_credentials", "client_credentials", "server_credentials", "tls_enabled"]


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def tls_enabled(settings: ServiceSettings) -> bool:
    """True when the service's own port speaks TLS."""
    return bool(settings.tls_cert_file and settings.tls_key_file)


def server_credentials(
    settings: ServiceSettings, require_client_auth: bool = True, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """The port's credentials, or None for plaintext.

    `require_client_auth`: demand a client certificate when a CA is known (internal services always;
    the gateway per `public_client_auth`). `client_ca_file` overrides `tls_ca_file` as the CA that must
    have signed client certificates (the gateway's `public_ca_file`).
    """
    if not tls_enabled(settings):
        return None
    pair = (_read(settings.tls_key_file), _read(settings.tls_cert_file))
    ca_file = client_ca_file or settings.tls_ca_file
    if not (require_client_auth and ca_file):
        # gRPC then does not ask for a client certificate at all: the handshake authenticates the server only.
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read(ca_file), require_client_auth=True)


def channel_credentials(settings: ServiceSettings) -> grpc.ChannelCredentials | None:
    """Credentials for this service's channels to other services, or None for plaintext."""
    if not settings.tls_ca_file:
        return None
    return client_credentials(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)


def client_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM paths: servers verified against `ca_file` (empty = the system's
    roots), `cert_file` + `key_file` presented as client certificate (both empty = none)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        _read(ca_file) if ca_file else None,
        _read(key_file) if key_file else None,
        _read(cert_file) if cert_file else None,
    )
