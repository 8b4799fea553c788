"""TLS from settings: dev certificates, server and channel credentials, mutual TLS on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from llmmesh.common.devcerts import MESH_SERVICES, DevCerts, issue, main, make_ca, write_dev_certs
from llmmesh.common.server import Service, build_server, channel
from llmmesh.common.settings import ServiceSettings
from llmmesh.common.tls import channel_credentials, client_credentials, server_credentials, tls_enabled
from llmmesh.healthcheck import check
from llmmesh.healthcheck import main as health_main


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return write_dev_certs(tmp_path_factory.mktemp("certs"))


def _settings(certs: DevCerts, name: str = "preprocess", ca: bool = True) -> ServiceSettings:
    return ServiceSettings(
        tls_cert_file=str(certs.cert(name)),
        tls_key_file=str(certs.key(name)),
        tls_ca_file=str(certs.ca) if ca else "",
    )


def test_dev_certs_hold_every_service_and_the_public_client(certs: DevCerts) -> None:
    """Each service's certificate is signed by the internal CA and names the service, localhost and 127.0.0.1."""
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    for name in MESH_SERVICES:
        cert = x509.load_pem_x509_certificate(certs.cert(name).read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        assert stat.S_IMODE(certs.key(name).stat().st_mode) == 0o600
    client = x509.load_pem_x509_certificate(certs.cert("client").read_bytes())
    client.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.public_ca.read_bytes()))
    with pytest.raises(ValueError):
        client.verify_directly_issued_by(ca)


def test_devcerts_command_adds_extra_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--san` names land in every service certificate."""
    assert main([str(tmp_path), "--san", "gateway.example.com", "--san", "10.0.0.5"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "infer.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gateway.example.com" in sans.get_values_for_type(x509.DNSName)
    assert "10.0.0.5" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert str(tmp_path) in capsys.readouterr().out


def test_no_tls_settings_mean_plaintext() -> None:
    """Empty settings (the default) give no credentials at all."""
    settings = ServiceSettings()
    assert not tls_enabled(settings)
    assert server_credentials(settings) is None
    assert channel_credentials(settings) is None


def test_certificate_and_key_go_together(certs: DevCerts) -> None:
    """A certificate without its key (or the reverse) is refused at start."""
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        ServiceSettings(tls_cert_file=str(certs.cert("infer")))
    with pytest.raises(ValueError, match="both"):
        client_credentials(str(certs.ca), cert_file=str(certs.cert("infer")))


@pytest.fixture
async def mtls_service(certs: DevCerts) -> AsyncIterator[Service]:
    """A real server built by `build_server` with the preprocess certificate and the internal CA: mutual TLS."""
    service = build_server("test", _settings(certs), [], lambda _server: None)
    await service.start()
    await service.set_serving(True)
    yield service
    await service.server.stop(0)


async def _check(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    # The probe is blocking: run it off the loop that serves.
    return await asyncio.to_thread(check, f"127.0.0.1:{port}", "", 3.0, credentials)


async def test_mutual_tls_accepts_a_certificate_the_ca_signed(mtls_service: Service, certs: DevCerts) -> None:
    """A client with a certificate from the internal CA gets its health answer."""
    creds = client_credentials(str(certs.ca), str(certs.cert("gateway")), str(certs.key("gateway")))
    assert await _check(mtls_service.port, creds) == "SERVING"


async def test_mutual_tls_refuses_a_client_without_certificate(mtls_service: Service, certs: DevCerts) -> None:
    """TLS without a client certificate fails the handshake."""
    assert await _check(mtls_service.port, client_credentials(str(certs.ca))) == "UNAVAILABLE"


async def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mtls_service: Service, certs: DevCerts, tmp_path: Path
) -> None:
    """A certificate signed by an unrelated CA (or by the public-client CA) fails the handshake."""
    cert, key = issue(make_ca("rogue CA"), "gateway", ["gateway", "127.0.0.1"])
    (tmp_path / "rogue.pem").write_bytes(cert)
    (tmp_path / "rogue.key").write_bytes(key)
    rogue = client_credentials(str(certs.ca), str(tmp_path / "rogue.pem"), str(tmp_path / "rogue.key"))
    assert await _check(mtls_service.port, rogue) == "UNAVAILABLE"
    public = client_credentials(str(certs.ca), str(certs.cert("client")), str(certs.key("client")))
    assert await _check(mtls_service.port, public) == "UNAVAILABLE"


async def test_plaintext_client_fails_against_tls(mtls_service: Service) -> None:
    """A plaintext client cannot talk to a TLS port."""
    assert await _check(mtls_service.port, None) == "UNAVAILABLE"


async def test_channel_uses_the_services_certificate(mtls_service: Service, certs: DevCerts) -> None:
    """`channel()` with TLS settings (what the gateway uses for the stages) passes mutual TLS."""
    ch = channel(f"127.0.0.1:{mtls_service.port}", _settings(certs, "gateway"))
    try:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await ch.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_optional_client_auth_takes_callers_without_certificate(certs: DevCerts) -> None:
    """The gateway's public port (require_client_auth=False) serves TLS clients that have no certificate."""
    service = build_server("gw", _settings(certs, "gateway"), [], lambda _server: None, require_client_auth=False)
    await service.start()
    await service.set_serving(True)
    try:
        assert await _check(service.port, client_credentials(str(certs.ca))) == "SERVING"
    finally:
        await service.server.stop(0)


async def test_health_probe_command_speaks_mutual_tls(
    mtls_service: Service, certs: DevCerts, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llmmesh-health` takes its CA and client certificate from flags or LLMMESH_HEALTH_TLS_* variables."""
    address = f"127.0.0.1:{mtls_service.port}"
    flags = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.cert("infer")), "--tls-key", str(certs.key("infer"))]
    assert await asyncio.to_thread(health_main, [address, *flags]) == 0
    monkeypatch.setenv("LLMMESH_HEALTH_TLS_CA_FILE", str(certs.ca))
    monkeypatch.setenv("LLMMESH_HEALTH_TLS_CERT_FILE", str(certs.cert("infer")))
    monkeypatch.setenv("LLMMESH_HEALTH_TLS_KEY_FILE", str(certs.key("infer")))
    assert await asyncio.to_thread(health_main, [address]) == 0
    assert "SERVING" in capsys.readouterr().out
