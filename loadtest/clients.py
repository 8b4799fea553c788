"""The paths under test, one streaming request at a time, timed at the client.

`MeshClient` calls the gateway's public API (`GenerationService.Generate`); `DirectClient` calls
Triton's `ModelStreamInfer` with the request infer would send; `InferStageClient` calls the infer
stage alone, as the gateway does (Triton + one hop: no preprocess, postprocess or gateway). Each
records, per request, the start, the first response that carries a token, the response that completes
the stream, the output token count, when each chunk arrived and how many tokens it carried (a chunk: a
response that carries text on the mesh, one that carries tokens on the paths without text), and the
failure (a gRPC status name, or INCOMPLETE / MODEL_ERROR / WRONG_OUTPUT), and keeps running totals of
tokens and messages received, which the runner samples to measure steady-state throughput and how many
tokens each message carried.

The per-response work is kept small (no decoding, no per-token Python objects beyond what the gRPC
library makes) so that the load generator, which shares the machine's two cores, costs little.
"""

from __future__ import annotations

import json
from time import perf_counter
from typing import Protocol

import grpc
import grpc.aio
import httpx2
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2_grpc

from llmmesh.stages.v1 import infer_pb2_grpc
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .metrics import RequestRecord
from .workload import BuiltWorkload

__all__ = ["CHANNEL_OPTIONS", "Client", "DirectClient", "HttpClient", "InferStageClient", "MeshClient"]

# Large messages allowed, no compression (the default), no keepalive pings: a benchmark's connections
# are never idle for long, and pings a server finds too frequent end with GOAWAY too_many_pings.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Client(Protocol):
    name: str
    # Running totals over every request: output tokens, and the stream messages that carried them.
    tokens_received: int
    messages_received: int

    async def run(self, index: int, record: RequestRecord) -> None:
        """Sends request number `index` and fills `record`; never raises for a failed request."""
        ...

    async def close(self) -> None: ...


class _StreamClient:
    """What the three clients share: a channel, the running totals, and counting a response's tokens."""

    def __init__(self, url: str, timeout: float) -> None:
        self._channel = grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
        self._timeout = timeout
        self.tokens_received = 0
        self.messages_received = 0

    def _received(self, record: RequestRecord, n: int, chunk: bool = True) -> None:
        """A response carrying `n` tokens arrived now; `chunk`: it counts as a chunk (see the module's doc)."""
        now = perf_counter()
        if chunk:
            record.chunk_times.append(now)
            record.chunk_tokens.append(n)
        if n:
            if record.first_token is None:
                record.first_token = now
            record.output_tokens += n
            self.tokens_received += n
            self.messages_received += 1

    async def close(self) -> None:
        await self._channel.close()


class DirectClient(_StreamClient):
    """Triton's ModelStreamInfer, one call per request (so a cancel is per request, as infer does)."""

    name = "direct"

    def __init__(self, url: str, workload: BuiltWorkload, timeout: float = 60.0) -> None:
        super().__init__(url, timeout)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._requests = workload.direct_requests
        self._expected = workload.expected_bytes

    async def run(self, index: int, record: RequestRecord) -> None:
        request = self._requests[index % len(self._requests)]
        call = self._stub.ModelStreamInfer(iter((request,)), timeout=self._timeout)
        parts: list[bytes] = []
        final = False
        try:
            async for response in call:
                if response.error_message:
                    record.error = "MODEL_ERROR"
                    break
                result = response.infer_response
                for i, out in enumerate(result.outputs):
                    if out.name == "output_ids":
                        raw = result.raw_output_contents[i]
                        n = len(raw) // 4
                        if n:
                            self._received(record, n)
                            parts.append(raw)
                        break
                if result.parameters["triton_final_response"].bool_param:
                    record.end = perf_counter()
                    final = True
                    break
        except grpc.aio.AioRpcError as exc:
            record.error = exc.code().name
            return
        finally:
            if not final:
                call.cancel()
        if record.error is None:
            if not final:
                record.error = "INCOMPLETE"
            elif self._expected is not None and b"".join(parts) != self._expected:
                record.error = "WRONG_OUTPUT"


class MeshClient(_StreamClient):
    """The gateway's public API: chunks (text + token ids), then one final message."""

    name = "mesh"

    def __init__(self, url: str, workload: BuiltWorkload, timeout: float = 60.0) -> None:
        super().__init__(url, timeout)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._requests = workload.mesh_requests
        self._expected = list(workload.expected_ids) if workload.expected_ids is not None else None

    async def run(self, index: int, record: RequestRecord) -> None:
        request = self._requests[index % len(self._requests)]
        call = self._stub.Generate(request, timeout=self._timeout)
        ids: list[int] = []
        final = None
        try:
            async for response in call:
                if response.HasField("chunk"):
                    chunk = response.chunk
                    chunk_ids = chunk.token_ids
                    if chunk_ids or chunk.text:
                        self._received(record, len(chunk_ids), chunk=bool(chunk.text))
                        ids.extend(chunk_ids)
                else:
                    record.end = perf_counter()
                    final = response.final
                    record.gateway_queue = final.timings.queue_ms / 1000.0
                    record.gateway_ttft = final.timings.time_to_first_token_ms / 1000.0
        except grpc.aio.AioRpcError as exc:
            record.error = exc.code().name
            return
        if final is None:
            record.error = "INCOMPLETE"
        elif final.usage.completion_tokens != record.output_tokens or (
            self._expected is not None and ids != self._expected
        ):
            record.error = "WRONG_OUTPUT"


class InferStageClient(_StreamClient):
    """The infer stage alone (`InferService.Generate`), with the request the gateway would send it."""

    name = "infer"

    def __init__(self, url: str, workload: BuiltWorkload, timeout: float = 60.0) -> None:
        super().__init__(url, timeout)
        self._stub = infer_pb2_grpc.InferServiceStub(self._channel)
        self._requests = workload.infer_requests
        self._expected = list(workload.expected_ids) if workload.expected_ids is not None else None

    async def run(self, index: int, record: RequestRecord) -> None:
        request = self._requests[index % len(self._requests)]
        call = self._stub.Generate(request, timeout=self._timeout)
        ids: list[int] = []
        finished = False
        try:
            async for response in call:
                if response.token_ids:
                    self._received(record, len(response.token_ids))
                    ids.extend(response.token_ids)
                if response.finish_reason:
                    record.end = perf_counter()
                    finished = True
        except grpc.aio.AioRpcError as exc:
            record.error = exc.code().name
            return
        if not finished:
            record.error = "INCOMPLETE"
        elif self._expected is not None and ids != self._expected:
            record.error = "WRONG_OUTPUT"


class HttpClient:
    """The gateway's OpenAI-compatible port (`POST /v1/chat/completions`, `stream: true` with usage), with
    the mesh client's requests as OpenAI bodies: the same mesh behind the other door. A chunk is an event
    that carries text; tokens are counted from the usage the stream ends with (OpenAI's chunks carry no
    token ids), so the per-chunk token counts are 0 and the running total moves at the end of a stream."""

    name = "http"

    def __init__(self, url: str, workload: BuiltWorkload, timeout: float = 60.0) -> None:
        self._client = httpx2.AsyncClient(base_url=url, timeout=timeout, limits=httpx2.Limits(max_connections=1024))
        self._bodies = [_openai_body(r) for r in workload.mesh_requests]
        self.tokens_received = 0
        self.messages_received = 0

    async def run(self, index: int, record: RequestRecord) -> None:
        body = self._bodies[index % len(self._bodies)]
        usage = None
        try:
            async with self._client.stream("POST", "/v1/chat/completions", content=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP_{response.status_code}"
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        record.end = perf_counter()
                        break
                    event = json.loads(data)
                    if "error" in event:
                        record.error = "STREAM_ERROR"
                        return
                    if event["choices"] and event["choices"][0]["delta"].get("content"):
                        now = perf_counter()
                        if record.first_token is None:
                            record.first_token = now
                        record.chunk_times.append(now)
                        record.chunk_tokens.append(0)
                        self.messages_received += 1
                    if event.get("usage"):
                        usage = event["usage"]
        except httpx2.HTTPError as exc:
            record.error = type(exc).__name__
            return
        if record.end is None or usage is None:
            record.error = "INCOMPLETE"
            return
        record.output_tokens = usage["completion_tokens"]
        self.tokens_received += record.output_tokens

    async def close(self) -> None:
        await self._client.aclose()


_OPENAI_SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop")


def _openai_body(request: generation_pb2.GenerateRequest) -> bytes:
    """The OpenAI chat request for a mesh request (chat turns, model, sampling)."""
    sampling = MessageToDict(request.sampling, preserving_proto_field_name=True)
    sampling["seed"] = int(sampling["seed"]) if "seed" in sampling else None
    body = {
        "model": request.model,
        "messages": [{"role": m.role, "content": m.content} for m in request.chat.messages]
        or [{"role": "user", "content": request.prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **{k: v for k, v in sampling.items() if k in _OPENAI_SAMPLING and v is not None},
    }
    return json.dumps(body).encode()
