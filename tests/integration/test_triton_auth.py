"""Triton's restricted-protocol header: the flags the launcher gives Triton, and the header infer's backend and
the safety classifier's client send on every call, seen by a gRPC server on a loopback port.

The server here records each call's metadata and answers like Triton; the real, restricted Triton (which
refuses calls without the header) is tested end to end in tests/e2e/test_side_doors.py.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import AsyncIterator

import grpc.aio
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.common.safety import TritonClassifier
from llmmesh.common.triton_auth import RESTRICTED, header_interceptors, new_header, triton_args
from llmmesh.infer.backend import Generation, TritonBackend
from llmmesh.launcher import Mesh

HEADER = "llmmesh-triton-key=sesame-3f9a"
SENT_AS = ("triton-grpc-protocol-llmmesh-triton-key", "sesame-3f9a")


class RecordingTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Records (method, metadata) of every call; one token and a final response per stream."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls.append((method, {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}))

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        self._record("ServerReady", context)
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        self._record("ModelReady", context)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self._record("ModelInfer", context)
        n = request.inputs[0].shape[0]
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="PROBABILITY", datatype="FP32", shape=[n, 1])
        response.raw_output_contents.append(array("f", [0.25] * n).tobytes())
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        self._record("ModelStreamInfer", context)
        async for request in request_iterator:
            reply = service_pb2.ModelStreamInferResponse()
            result = reply.infer_response
            result.model_name = request.model_name
            result.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1, 1])
            result.raw_output_contents.append(array("i", [42]).tobytes())
            result.parameters["triton_final_response"].bool_param = True
            yield reply


@contextlib.asynccontextmanager
async def recording_triton() -> AsyncIterator[tuple[RecordingTriton, str]]:
    servicer = RecordingTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _generation() -> Generation:
    return Generation("auth-test", "smollm2", [1, 2, 3], 4, 2, 2, 0.0, 1.0, 0, None)


async def test_infer_backend_sends_the_header_on_every_call() -> None:
    """Readiness (unary) and generation (bidirectional stream) calls all carry the header; the stream works."""
    async with recording_triton() as (triton, url):
        backend = TritonBackend(url, {"smollm2": "smollm2"}, header=HEADER)
        try:
            assert await backend.ready()
            assert [ids async for ids in backend.generate(_generation(), timeout=10)] == [[42]]
        finally:
            await backend.close()
    assert {method for method, _ in triton.calls} == {"ServerReady", "ModelReady", "ModelStreamInfer"}
    assert all(metadata.get(SENT_AS[0]) == SENT_AS[1] for _, metadata in triton.calls)


async def test_classifier_sends_the_header() -> None:
    """The safety classifier's ModelInfer carries the header and still gets its scores."""
    async with recording_triton() as (triton, url):
        classifier = TritonClassifier(url, header=HEADER)
        try:
            assert await classifier.score(["one", "two"]) == [0.25, 0.25]
        finally:
            await classifier.close()
    assert [(m, md.get(SENT_AS[0])) for m, md in triton.calls] == [("ModelInfer", SENT_AS[1])]


async def test_without_a_header_nothing_extra_is_sent() -> None:
    """An empty header (Triton open) adds no interceptor and no metadata."""
    assert header_interceptors("") == []
    async with recording_triton() as (triton, url):
        backend = TritonBackend(url, {"smollm2": "smollm2"})
        try:
            assert [ids async for ids in backend.generate(_generation(), timeout=10)] == [[42]]
        finally:
            await backend.close()
    assert all(not key.startswith("triton-grpc-protocol-") for _, md in triton.calls for key in md)


def test_triton_flags_restrict_what_generates_or_changes_the_server() -> None:
    """One flag for gRPC and one for HTTP, each `<protocols>:<key>=<value>`; health and reads stay open."""
    assert triton_args(HEADER) == [
        f"--grpc-restricted-protocol=inference,model-repository,shared-memory,trace,logging:{HEADER}",
        f"--http-restricted-api=inference,model-repository,shared-memory,trace,logging:{HEADER}",
    ]
    assert not {"health", "metadata", "model-config", "statistics"} & set(RESTRICTED)
    assert triton_args("") == []


def test_a_new_header_is_random_and_fits_tritons_flag_syntax() -> None:
    """Each mesh gets its own header; its value has no ':' or ',' (the flag's separators) and no '='."""
    first, second = new_header(), new_header()
    assert first != second
    key, _, value = first.partition("=")
    assert key == "llmmesh-triton-key" and len(value) >= 40
    assert not {":", ",", "="} & set(value)
    assert triton_args(first)  # accepted


@pytest.mark.parametrize("bad", ["no-equals", "=value", "key=", "key=a:b", "key=a,b"])
def test_a_malformed_header_is_refused(bad: str) -> None:
    """A header Triton's flag could not carry fails at once, not as refused calls later."""
    with pytest.raises(ValueError, match="<key>=<value>"):
        triton_args(bad)
    with pytest.raises(ValueError):
        header_interceptors(bad)


@pytest.mark.parametrize(
    "keys",
    [{"LLMMESH_GATEWAY_API_KEYS": '["sk-1"]'}, {"LLMMESH_GATEWAY_API_KEYS_FILE": "/run/secrets/keys"}],
    ids=["keys", "keys-file"],
)
def test_a_mesh_with_api_keys_restricts_triton(monkeypatch: pytest.MonkeyPatch, keys: dict[str, str]) -> None:
    """With gateway keys the launcher makes a header of its own for this mesh and gives it to Triton's callers."""
    for name in ("LLMMESH_GATEWAY_API_KEYS", "LLMMESH_GATEWAY_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    mesh, other = Mesh(env=keys), Mesh(env=keys)
    header = mesh.triton_header
    assert header and triton_args(header) and header != other.triton_header
    env = mesh._service_env()
    assert [env.get(f"LLMMESH_{name}_TRITON_HEADER") for name in ("PREPROCESS", "INFER", "POSTPROCESS")] == [header] * 3
    assert "LLMMESH_GATEWAY_TRITON_HEADER" not in env
    assert header not in repr(mesh)


def test_a_mesh_without_api_keys_leaves_triton_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """No gateway keys (or an empty list): no header, no flags; anyone may call Triton, as the gateway."""
    for name in ("LLMMESH_GATEWAY_API_KEYS", "LLMMESH_GATEWAY_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for env in ({}, {"LLMMESH_GATEWAY_API_KEYS": "[]"}):
        mesh = Mesh(env=env)
        assert mesh.triton_header == ""
        assert not any(k.endswith("_TRITON_HEADER") for k in mesh._service_env())
