"""Prometheus metrics of the mesh: one place, `llmmesh_` prefix, base units (seconds, tokens, bytes).

Each process registers them all; a service only moves the ones it owns. Histogram buckets fit the
ranges they measure: sub-millisecond to seconds for token gaps, tens of milliseconds to minutes for
whole requests.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ADMISSION_QUEUE_DEPTH",
    "ADMISSION_QUEUE_WAIT",
    "ADMISSION_REJECTIONS",
    "CACHE_BYTES",
    "CACHE_BYTES_WRITTEN",
    "CACHE_LOOKUPS",
    "COMPLETION_TOKENS",
    "DEDUP_JOINS",
    "E2E_LATENCY",
    "INFLIGHT_STREAMS",
    "INTER_TOKEN_LATENCY",
    "PROMPT_TOKENS",
    "PROMPT_WARMS",
    "QUEUE_TIME",
    "REQUESTS",
    "RPCS",
    "SAFETY_BLOCKS",
    "STREAM_FRAMES",
    "STREAM_FRAME_ITEMS",
    "TIME_TO_FIRST_SPEAKABLE",
    "TIME_TO_FIRST_TOKEN",
]

_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
_TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Every RPC a service serves, by method and gRPC status code (the error table applies here too).
RPCS = Counter("llmmesh_rpc_requests", "RPCs served, by method and status code", ["method", "code"])
HTTP_REQUESTS = Counter(
    "llmmesh_http_requests",
    "Requests to the gateway's OpenAI-compatible HTTP front door, by path and status",
    ["path", "status"],
)
INFLIGHT_STREAMS = Gauge("llmmesh_inflight_streams", "RPCs in progress, by method", ["method"])
# The multiplexed stage calls (llmmesh.common.mux): frames, and the requests' ops or events they carried
# (items / frames = how many requests' messages one gRPC message carried), by stage and direction
# ("to_stage": the caller's ops, "from_stage": the stage's events), counted by each end of the call.
STREAM_FRAMES = Counter(
    "llmmesh_stream_frames", "Frames on the multiplexed stage calls, by stage and direction", ["stage", "direction"]
)
STREAM_FRAME_ITEMS = Counter(
    "llmmesh_stream_frame_items",
    "Requests' ops or events carried by those frames, by stage and direction",
    ["stage", "direction"],
)

# Gateway: the client's view of each generation.
REQUESTS = Counter("llmmesh_requests", "Completed generations, by model and finish reason", ["model", "finish_reason"])
TIME_TO_FIRST_TOKEN = Histogram(
    "llmmesh_time_to_first_token_seconds",
    "Request arrival to the first text sent",
    ["model"],
    buckets=_FIRST_TOKEN_BUCKETS,
)
TIME_TO_FIRST_SPEAKABLE = Histogram(
    "llmmesh_time_to_first_speakable_chunk_seconds",
    "Request arrival to the first chunk marked speakable (every chunk, in token chunking)",
    ["model"],
    buckets=_FIRST_TOKEN_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "llmmesh_inter_token_latency_seconds",
    "Per request: (end-to-end latency - time to first token) / (completion tokens - 1)",
    ["model"],
    buckets=_TOKEN_GAP_BUCKETS,
)
E2E_LATENCY = Histogram(
    "llmmesh_request_duration_seconds", "Request arrival to the final message", ["model"], buckets=_REQUEST_BUCKETS
)
QUEUE_TIME = Histogram(
    "llmmesh_queue_time_seconds",
    "Request arrival to hand-off to the model (validation, tokenization)",
    ["model"],
    buckets=_QUEUE_BUCKETS,
)
PROMPT_TOKENS = Counter("llmmesh_prompt_tokens", "Prompt tokens of completed generations", ["model"])
COMPLETION_TOKENS = Counter("llmmesh_completion_tokens", "Generated tokens of completed generations", ["model"])
# Spend per caller (the API key's name; the peer's host when authentication is off), at the model
# registry's prices. `route` is the route the request named ("" when it named a model).
CALLER_TOKENS = Counter(
    "llmmesh_caller_tokens",
    "Tokens of completed requests, by answering model, route, caller and kind (prompt, completion)",
    ["model", "route", "caller", "kind"],
)
CALLER_COST = Counter(
    "llmmesh_caller_cost", "Cost of completed requests at the registry's prices", ["model", "route", "caller"]
)
ROUTE_DECISIONS = Counter(
    "llmmesh_route_decisions", "Routed requests, by route and answering model", ["route", "model"]
)
REUSE_SAVED_TOKENS = Counter(
    "llmmesh_reuse_saved_tokens",
    "Prompt and completion tokens the model did not process: answers joined in flight or replayed from the cache",
    ["model", "route", "caller"],
)
REUSE_SAVED_COST = Counter(
    "llmmesh_reuse_saved_cost",
    "Cost of the answers joined in flight or replayed from the cache",
    ["model", "route", "caller"],
)
PROMPT_WARMS = Counter(
    "llmmesh_prompt_warms",
    "Interim turns of voice streams prefilled ahead of their request, by outcome "
    "(done, cancelled, skipped, invalid, failed)",
    ["outcome"],
)

# Postprocess: safety decisions.
SAFETY_BLOCKS = Counter("llmmesh_safety_blocks", "Streams ended by the safety filter, by category", ["category"])

# Infer: dedup and the result cache (issue 3).
DEDUP_JOINS = Counter(
    "llmmesh_dedup_joins",
    "Requests served by another request's generation: joined in flight (same request hash) or by request id",
    ["kind"],
)
CACHE_LOOKUPS = Counter("llmmesh_cache_lookups", "Result cache lookups of shareable requests", ["result"])
CACHE_BYTES = Gauge("llmmesh_cache_bytes", "Bytes held by the in-process result cache")
CACHE_BYTES_WRITTEN = Counter("llmmesh_cache_written_bytes", "Bytes written to the shared (Redis) result cache")

# Gateway: admission control (services/llmmesh/gateway/admission.py).
ADMISSION_QUEUE_DEPTH = Gauge(
    "llmmesh_admission_queue_depth", "Requests waiting for an in-flight slot, by priority", ["priority"]
)
ADMISSION_REJECTIONS = Counter(
    "llmmesh_admission_rejections",
    "Requests refused with RESOURCE_EXHAUSTED, by reason (capacity, rate_limited, shed)",
    ["reason"],
)
ADMISSION_QUEUE_WAIT = Histogram(
    "llmmesh_admission_queue_wait_seconds",
    "Time an admitted request waited for its in-flight slot, by priority",
    ["priority"],
    buckets=_QUEUE_BUCKETS,
)
