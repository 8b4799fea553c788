"""structlog, configured once per process: JSON lines on stderr, context from contextvars.

Secrets and request text stay out of the logs: values under the keys in `REDACTED_KEYS` are replaced
(whatever the caller passed), and tracebacks carry no local variables (a frame's locals may hold a prompt
or a credential).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from structlog.tracebacks import ExceptionDictTransformer

__all__ = ["REDACTED_KEYS", "configure_logging", "get_logger", "redact_secrets"]

# Compared case-insensitively with '-' read as '_'. Exact names only: `prompt_tokens` is a count, not text.
REDACTED_KEYS = frozenset(
    {
        "api_key",
        "x_api_key",
        "authorization",
        "bearer_token",
        "token",
        "access_token",
        "refresh_token",
        "password",
        "secret",
        "client_secret",
        "private_key",
        "prompt",
        "chat",
        "messages",
        "text",
        "completion",
    }
)
_REDACTED = "[REDACTED]"


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replaces the value of every key named in `REDACTED_KEYS`; the key stays, so the line still says it was there."""
    for key in list(event):
        if isinstance(key, str) and key.lower().replace("-", "_") in REDACTED_KEYS:
            event[key] = _REDACTED
    return event


def _add_trace_context(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """trace_id and span_id of the current span, so a log line can be found from its trace and back."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def configure_logging(service: str, level: str = "info") -> None:
    """JSON logs with timestamp, level, service and any context bound with `bind_contextvars`."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            redact_secrets,
            _add_trace_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
