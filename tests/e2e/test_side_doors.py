"""No side doors: a mesh with API keys has no port that generates without credentials.

The module starts its own mesh as `llmmesh up` does (Triton serving SmolLM2 on llama.cpp and the safety
classifier, the four services as processes) with TLS, mutual TLS between services and an API key. It
lists every TCP socket that the mesh's processes (and their children: Triton's model stubs, whose
llama.cpp engine used to open an HTTP server of its own) listen on, from /proc, and calls each port
without credentials the way a local caller could:

- gateway: TLS, no API key -> UNAUTHENTICATED;
- preprocess, infer, postprocess: plaintext, or TLS without a client certificate of the internal CA ->
  the handshake fails (UNAVAILABLE);
- Triton gRPC and HTTP: no header of the mesh -> "This protocol is restricted" (UNAVAILABLE / 403),
  while health stays open for probes;
- metrics endpoints (the four services', Triton's): Prometheus text only, no inference API.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import urllib.error
import urllib.request
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.client import NO_RETRY, Client, Credentials, FinishReason, TlsConfig, UnauthenticatedError
from llmmesh.common.devcerts import DevCerts, write_dev_certs
from llmmesh.common.tls import client_credentials
from llmmesh.infer.backend import Generation, build_request
from llmmesh.launcher import SERVICES, Mesh, MeshPorts
from llmmesh.stages.v1 import (
    infer_pb2,
    infer_pb2_grpc,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from llmmesh.v1 import generation_pb2

from .conftest import stop_cleanly
from .sockets import listening_tcp, listening_unix, mesh_processes

pytestmark = pytest.mark.e2e

API_KEY = "sk-side-doors-7c41d0e2b95a"
RESTRICTED = "This protocol is restricted"
STAGES = ("preprocess", "infer", "postprocess")


@dataclass
class ClosedMesh:
    mesh: Mesh
    certs: DevCerts

    def client(self, credentials: Credentials | None = None) -> Client:
        tls = TlsConfig.from_files(ca=self.certs.ca)
        return Client(self.mesh.address("gateway"), tls=tls, credentials=credentials, timeout=60, retry=NO_RETRY)

    @property
    def triton_http(self) -> str:
        assert self.mesh.triton is not None
        return self.mesh.triton.http_url


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClosedMesh]:
    certs = write_dev_certs(tmp_path_factory.mktemp("certs"))
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=tmp_path_factory.mktemp("side-door-logs"),
        tls_dir=certs.directory,
        env={"LLMMESH_GATEWAY_API_KEYS": json.dumps([API_KEY])},
    )
    assert mesh.served_triton_models == ("smollm2", "gemma3", "safety_classifier")  # what `llmmesh up` serves
    mesh.start()
    try:
        yield ClosedMesh(mesh, certs)
    finally:
        stop_cleanly(mesh)


def _roots(mesh: Mesh) -> set[int]:
    assert mesh.triton is not None and mesh.triton.pid is not None
    return {mesh.triton.pid, *(proc.pid for proc in mesh.procs.values())}


def test_every_listening_socket_is_a_documented_port(closed: ClosedMesh) -> None:
    """The mesh's processes and their children listen on the documented ports, on loopback, and on nothing
    else: no llama.cpp HTTP server, no socket file or abstract name another process could connect to."""
    processes = mesh_processes(_roots(closed.mesh))
    assert len(processes) > len(SERVICES) + 1  # Triton's model stubs are among them
    sockets = listening_tcp(processes)
    documented = set(dataclasses.asdict(closed.mesh.ports).values())
    assert {port for _, port in sockets} == documented
    assert {host for host, _ in sockets} == {closed.mesh.host}
    reachable = [path for path in listening_unix(processes) if path.startswith("@") or Path(path).exists()]
    assert not reachable


def test_gateway_refuses_a_generation_without_an_api_key(closed: ClosedMesh) -> None:
    """TLS to the public port without a key: UNAUTHENTICATED."""
    with closed.client() as client, pytest.raises(UnauthenticatedError):
        client.complete("Hi", max_tokens=4)


@pytest.mark.parametrize("stage", STAGES)
def test_stages_refuse_callers_without_the_mesh_certificate(closed: ClosedMesh, stage: str) -> None:
    """Plaintext, and TLS without a client certificate of the internal CA, never reach a stage's handler."""
    address = closed.mesh.address(stage)
    tls_only = client_credentials(str(closed.certs.ca))
    for channel in (grpc.insecure_channel(address), grpc.secure_channel(address, tls_only)):
        with channel, pytest.raises(grpc.RpcError) as err:
            _call_stage(channel, stage)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _call_stage(channel: grpc.Channel, stage: str) -> None:
    """Calls the stage's own RPC: infer's generation, preprocess's Prepare, postprocess's Process stream."""
    if stage == "infer":
        request = infer_pb2.InferRequest(request_id="side-door", model="smollm2", input_ids=[1, 2, 3], end_id=2)
        request.sampling.max_tokens = 4
        list(infer_pb2_grpc.InferServiceStub(channel).Generate(request, timeout=10))
    elif stage == "preprocess":
        prepare = preprocess_pb2.PrepareRequest(request=generation_pb2.GenerateRequest(prompt="Hi"))
        preprocess_pb2_grpc.PreprocessServiceStub(channel).Prepare(prepare, timeout=10)
    else:
        list(postprocess_pb2_grpc.PostprocessServiceStub(channel).Process(iter([]), timeout=10))


def _generate_on_triton(closed: ClosedMesh, metadata: tuple[tuple[str, str], ...] = ()) -> list[int]:
    assert closed.mesh.triton is not None
    gen = Generation("side-door", "smollm2", [1, 9690, 198], 4, 2, 2, 0.0, 1.0, 0, None)
    ids: list[int] = []
    with grpc.insecure_channel(closed.mesh.triton.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for response in stub.ModelStreamInfer(iter([build_request(gen, "smollm2")]), timeout=30, metadata=metadata):
            assert not response.error_message, response.error_message
            result = response.infer_response
            for i, out in enumerate(result.outputs):
                if out.name == "output_ids":
                    ids += array("i", result.raw_output_contents[i]).tolist()
            if result.parameters["triton_final_response"].bool_param:
                break
    return ids


def test_triton_grpc_refuses_inference_and_model_control_without_the_mesh_header(closed: ClosedMesh) -> None:
    """ModelStreamInfer, ModelInfer and unloading a model end UNAVAILABLE ("restricted"); a made-up header
    does not help; readiness still answers (probes need no secret)."""
    for metadata in ((), (("triton-grpc-protocol-llmmesh-triton-key", "guess"),)):
        with pytest.raises(grpc.RpcError) as err:
            _generate_on_triton(closed, metadata)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and RESTRICTED in (err.value.details() or "")
    assert closed.mesh.triton is not None
    with grpc.insecure_channel(closed.mesh.triton.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        classify = service_pb2.ModelInferRequest(model_name="safety_classifier")
        for call in (
            lambda: stub.ModelInfer(classify, timeout=10),
            lambda: stub.RepositoryModelUnload(
                service_pb2.RepositoryModelUnloadRequest(model_name="smollm2"), timeout=10
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert RESTRICTED in (err.value.details() or "")
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="smollm2"), timeout=10).ready


def _http(url: str, body: dict[str, object] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_triton_http_refuses_inference_and_model_control_without_the_mesh_header(closed: ClosedMesh) -> None:
    """HTTP infer, generate and repository calls get 403; health answers 200."""
    http = closed.triton_http
    text = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["hello"]}]}
    assert _http(f"{http}/v2/models/safety_classifier/infer", text) == 403
    assert _http(f"{http}/v2/models/smollm2/generate", {"input_ids": [1, 2, 3], "request_output_len": 4}) == 403
    assert _http(f"{http}/v2/repository/models/smollm2/unload", {}) == 403
    assert _http(f"{http}/v2/health/ready") == 200


def test_the_http_front_door_refuses_generations_without_the_key(closed: ClosedMesh) -> None:
    """The gateway's OpenAI-compatible port speaks TLS with the gRPC port's certificate and demands the
    same key: without it every generation and the model list are 401, the model never runs; with it the
    answer comes. Only /health answers without a key (probes carry none)."""
    ctx = ssl.create_default_context(cafile=str(closed.certs.ca))
    base = closed.mesh.http_url
    assert base.startswith("https://")
    before = _generated_tokens(closed)
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "Hi"}), ("/v1/models", None)):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            assert _https(f"{base}{path}", ctx, body, headers) == 401, (path, headers)
    assert _https(f"{base}/health", ctx) == 200
    assert _generated_tokens(closed) == before
    assert _https(f"{base}/v1/chat/completions", ctx, chat, {"Authorization": f"Bearer {API_KEY}"}) == 200
    # Plaintext HTTP to the TLS port gets no answer (the connection is closed).
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(base.replace("https://", "http://") + "/health", timeout=10)


def _https(url: str, ctx: ssl.SSLContext, body: object = None, headers: dict[str, str] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60, context=ctx) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _generated_tokens(closed: ClosedMesh) -> float:
    assert closed.mesh.triton is not None
    with urllib.request.urlopen(closed.mesh.triton.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("llmmesh_model_generated_tokens")
    )


def test_metrics_ports_serve_no_inference(closed: ClosedMesh) -> None:
    """The services' and Triton's metrics ports answer Prometheus text; an inference call there fails."""
    ports = closed.mesh.ports
    for port in (*(getattr(ports, f"{name}_metrics") for name in SERVICES), ports.triton_metrics):
        base = f"http://{closed.mesh.host}:{port}"
        assert _http(f"{base}/metrics") == 200
        assert _http(f"{base}/v2/models/smollm2/generate", {"input_ids": [1, 2, 3], "request_output_len": 4}) != 200


def _classifier_inferences(closed: ClosedMesh) -> int:
    with urllib.request.urlopen(f"{closed.triton_http}/v2/models/safety_classifier/stats", timeout=10) as reply:
        stats = json.load(reply)
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats["model_stats"])


def test_with_the_key_a_generation_goes_through_triton_and_the_classifier(closed: ClosedMesh) -> None:
    """The mesh's own callers carry Triton's header: infer generates, and the safety classifier (preprocess,
    postprocess) scores the prompt and the answer on the restricted Triton."""
    before = _classifier_inferences(closed)
    with closed.client(Credentials(api_key=API_KEY)) as client:
        result = client.complete("What is the capital of France?", max_tokens=8, temperature=0.0)
    assert result.final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert result.final.usage.completion_tokens > 0 and result.text
    assert _classifier_inferences(closed) > before


def test_no_log_holds_the_triton_header(closed: ClosedMesh) -> None:
    """The mesh's secret for Triton reaches Triton's command line and its callers' settings, never a log."""
    secret = closed.mesh.triton_header.partition("=")[2]
    assert secret
    logs = list(closed.mesh.log_dir.glob("*.log"))
    assert {path.stem for path in logs} >= {"triton", *SERVICES}
    assert not [path.name for path in logs if secret in path.read_text(errors="replace")]
