"""A real OTLP trace receiver for tests: gRPC (our services) and HTTP with JSON or protobuf (Triton)."""

from __future__ import annotations

import base64
import json
import threading
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from llmmesh.launcher import free_ports


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0


def _any_value(v: Any) -> Any:
    if hasattr(v, "WhichOneof"):  # protobuf AnyValue
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [_any_value(x) for x in v.array_value.values]
        return getattr(v, kind) if kind else None
    for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if key in v:
            return int(v[key]) if key == "intValue" else v[key]
    if "arrayValue" in v:
        return [_any_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _json_id(value: str) -> str:
    """OTLP/JSON ids are hex; some exporters send base64: accept both."""
    if not value:
        return ""
    try:
        int(value, 16)
        if len(value) in (16, 32):
            return value.lower()
    except ValueError:
        pass
    return base64.b64decode(value).hex()


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self.grpc_port, self.http_port = free_ports(2)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcTraces(self), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), _http_handler(self))
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_traces_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    def start(self) -> None:
        self._grpc.start()
        self._thread.start()

    def stop(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def add_proto(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            Span(
                                service,
                                s.name,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                {a.key: _any_value(a.value) for a in s.attributes},
                                [e.name for e in s.events],
                                s.start_time_unix_nano,
                                s.end_time_unix_nano,
                            )
                        )

    def add_json(self, body: dict[str, Any]) -> None:
        with self._lock:
            for rs in body.get("resourceSpans", []):
                attrs = {a["key"]: _any_value(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
                service = str(attrs.get("service.name", "?"))
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        self.spans.append(
                            Span(
                                service,
                                s["name"],
                                _json_id(s.get("traceId", "")),
                                _json_id(s.get("spanId", "")),
                                _json_id(s.get("parentSpanId", "")),
                                {a["key"]: _any_value(a["value"]) for a in s.get("attributes", [])},
                                [e.get("name", "") for e in s.get("events", [])],
                                int(s.get("startTimeUnixNano", 0)),
                                int(s.get("endTimeUnixNano", 0)),
                            )
                        )

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)


class _GrpcTraces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add_proto(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if "json" in self.headers.get("Content-Type", ""):
                receiver.add_json(json.loads(body))
                reply, ctype = b"{}", "application/json"
            else:
                receiver.add_proto(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply, ctype = (
                    trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                    "application/x-protobuf",
                )
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
