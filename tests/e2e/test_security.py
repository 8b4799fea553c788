"""Security end to end: TLS on the public port, mutual TLS between services, API keys, logs, size limits.

The module starts its own mesh (Triton serving the benchmark instrument, the four services as processes)
with dev certificates from `llmmesh.common.devcerts` and two API keys: `alice:<key>` from a keys file and
an unnamed key from `LLMMESH_GATEWAY_API_KEYS`. Clients are the project's own client library.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmmesh.client import (
    NO_RETRY,
    Client,
    Credentials,
    FinishReason,
    ResourceExhaustedError,
    TlsConfig,
    UnauthenticatedError,
    UnavailableError,
)
from llmmesh.common.devcerts import DevCerts, issue, make_ca, write_dev_certs
from llmmesh.common.registry import registry_file
from llmmesh.common.tls import client_credentials
from llmmesh.gateway.auth import DENIED_MESSAGE
from llmmesh.healthcheck import check
from llmmesh.launcher import Mesh, MeshPorts

from .conftest import stop_cleanly

pytestmark = pytest.mark.e2e

ALICE_KEY = "sk-alice-5b1f0e9c27d84a36"
SERVICE_KEY = "sk-svc-c0ffee6d1e2a7b93"
WRONG_KEY = "sk-alice-5b1f0e9c27d84a37"
# A prompt that must never reach a log file.
SECRET_PROMPT = "Please remember my passphrase: tangerine-walrus-4471 and keep it safe."


@dataclass
class SecureMesh:
    mesh: Mesh
    certs: DevCerts
    log_dir: Path

    @property
    def gateway(self) -> str:
        return self.mesh.address("gateway")

    def client(self, credentials: Credentials | None = None) -> Client:
        """A TLS client of the gateway that trusts the internal CA (no client certificate)."""
        tls = TlsConfig.from_files(ca=self.certs.ca)
        return Client(self.gateway, tls=tls, credentials=credentials, timeout=30, retry=NO_RETRY)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMesh]:
    certs = write_dev_certs(tmp_path_factory.mktemp("certs"))
    keys_file = tmp_path_factory.mktemp("keys") / "api_keys"
    keys_file.write_text(f"# the mesh's callers\nalice:{ALICE_KEY}\n")
    log_dir = tmp_path_factory.mktemp("secure-logs")
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=log_dir,
        tls_dir=certs.directory,
        triton_models=("instrument",),
        model_registry=registry_file(tmp_path_factory.mktemp("models"), triton_model="instrument"),
        env={
            "LLMMESH_GATEWAY_API_KEYS_FILE": str(keys_file),
            "LLMMESH_GATEWAY_API_KEYS": json.dumps([SERVICE_KEY]),
        },
    )
    mesh.start()
    try:
        yield SecureMesh(mesh, certs, log_dir)
    finally:
        stop_cleanly(mesh)


def test_no_key_is_unauthenticated(secure: SecureMesh) -> None:
    """A TLS call without credentials gets UNAUTHENTICATED and the fixed message."""
    with secure.client() as client, pytest.raises(UnauthenticatedError) as err:
        client.complete("Hi", max_tokens=4)
    assert err.value.details == DENIED_MESSAGE


def test_wrong_key_is_unauthenticated_with_the_same_message(secure: SecureMesh) -> None:
    """A wrong API key or bearer token gets exactly what no key gets: nothing about the key."""
    for credentials in (Credentials(api_key=WRONG_KEY), Credentials(bearer_token=WRONG_KEY)):
        with secure.client(credentials) as client, pytest.raises(UnauthenticatedError) as err:
            client.complete("Hi", max_tokens=4)
        assert err.value.details == DENIED_MESSAGE


@pytest.mark.parametrize(
    "credentials",
    [Credentials(api_key=ALICE_KEY), Credentials(bearer_token=SERVICE_KEY)],
    ids=["x-api-key-from-file", "bearer-from-env"],
)
def test_right_key_over_tls_gets_a_full_answer(secure: SecureMesh, credentials: Credentials) -> None:
    """With a configured key (header or bearer token), the answer streams through all four services over (m)TLS."""
    with secure.client(credentials) as client:
        result = client.complete("What is the capital of France?", max_tokens=8, temperature=0.0)
    assert result.final.finish_reason == FinishReason.LENGTH
    assert result.final.usage.completion_tokens == 8
    assert result.text


def test_plaintext_client_cannot_reach_the_tls_gateway(secure: SecureMesh) -> None:
    """A plaintext channel to the TLS port fails (UNAVAILABLE), key or not."""
    with (
        Client(secure.gateway, credentials=Credentials(api_key=ALICE_KEY), timeout=5, retry=NO_RETRY) as client,
        pytest.raises(UnavailableError),
    ):
        client.complete("Hi", max_tokens=4)


def test_gateway_health_and_reflection_need_no_key(secure: SecureMesh) -> None:
    """Probes and reflection on the gateway answer over TLS without credentials."""
    assert check(secure.gateway, credentials=client_credentials(str(secure.certs.ca))) == "SERVING"
    with grpc.secure_channel(secure.gateway, client_credentials(str(secure.certs.ca))) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = [s.name for s in replies[0].list_services_response.service]
    assert "llmmesh.v1.GenerationService" in names


def test_internal_service_refuses_a_certificate_from_another_ca(secure: SecureMesh, tmp_path: Path) -> None:
    """preprocess refuses a client whose certificate an unrelated CA signed, even if it claims to be the gateway."""
    cert, key = issue(make_ca("rogue CA"), "gateway", ["gateway", "127.0.0.1"])
    (tmp_path / "rogue.pem").write_bytes(cert)
    (tmp_path / "rogue.key").write_bytes(key)
    rogue = client_credentials(str(secure.certs.ca), str(tmp_path / "rogue.pem"), str(tmp_path / "rogue.key"))
    assert check(secure.mesh.address("preprocess"), credentials=rogue) == "UNAVAILABLE"
    # Nor does the public client's certificate open an internal service: another CA signed it.
    public = client_credentials(str(secure.certs.ca), str(secure.certs.cert("client")), str(secure.certs.key("client")))
    assert check(secure.mesh.address("infer"), credentials=public) == "UNAVAILABLE"


def test_internal_service_refuses_a_client_without_certificate(secure: SecureMesh) -> None:
    """TLS without a client certificate, or plaintext, does not reach preprocess."""
    assert check(secure.mesh.address("preprocess"), credentials=client_credentials(str(secure.certs.ca))) == (
        "UNAVAILABLE"
    )
    assert check(secure.mesh.address("preprocess")) == "UNAVAILABLE"


def test_internal_service_answers_a_certificate_the_ca_signed(secure: SecureMesh) -> None:
    """With a certificate from the internal CA, every stage's health check answers SERVING."""
    certs = secure.certs
    creds = client_credentials(str(certs.ca), str(certs.cert("postprocess")), str(certs.key("postprocess")))
    for name in ("preprocess", "infer", "postprocess"):
        assert check(secure.mesh.address(name), credentials=creds) == "SERVING"


def test_logs_hold_neither_keys_nor_prompts(secure: SecureMesh) -> None:
    """After authenticated and refused calls with a secret prompt, no log holds a key or the prompt; the
    request line names the caller."""
    with secure.client(Credentials(api_key=ALICE_KEY)) as client:
        result = client.complete(SECRET_PROMPT, max_tokens=4)
    assert result.final.finish_reason == FinishReason.LENGTH
    with secure.client(Credentials(api_key=WRONG_KEY)) as client, pytest.raises(UnauthenticatedError):
        client.complete(SECRET_PROMPT, max_tokens=4)
    deadline = time.monotonic() + 10
    while f'"request_id": "{result.final.request_id}"' not in secure.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = secure.logs()
    completed = [json.loads(line) for line in logs.splitlines() if result.final.request_id in line]
    assert any(e.get("event") == "request_completed" and e.get("caller") == "alice" for e in completed)
    for secret in (ALICE_KEY, SERVICE_KEY, WRONG_KEY, "tangerine-walrus", "passphrase"):
        assert secret not in logs


def test_oversize_message_is_refused_and_the_gateway_keeps_serving(secure: SecureMesh) -> None:
    """A request over the 4 MiB limit gets RESOURCE_EXHAUSTED; the gateway stays SERVING and keeps answering."""
    with (
        secure.client(Credentials(api_key=ALICE_KEY)) as client,
        pytest.raises(ResourceExhaustedError) as err,
    ):
        client.complete("x" * (5 * 1024 * 1024), max_tokens=4)
    # The gateway's limit, not the client's: the server received and refused it.
    assert "Received message larger than max" in err.value.details
    assert check(secure.gateway, credentials=client_credentials(str(secure.certs.ca))) == "SERVING"
    with grpc.secure_channel(secure.gateway, client_credentials(str(secure.certs.ca))) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with secure.client(Credentials(api_key=ALICE_KEY)) as client:
        assert client.complete("Hi", max_tokens=4).final.finish_reason == FinishReason.LENGTH
