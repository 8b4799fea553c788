"""The OpenAI-compatible backend: a model of the registry with `backend: openai` is served by a
chat-completions endpoint (vLLM, TGI, Ollama, llama.cpp's server, a cloud API), streamed with the official
`openai` SDK. Infer yields the endpoint's text; postprocess treats it as it treats detokenized ids.

Mapping of one request (`TextGeneration`) onto `POST <base_url>/chat/completions`:
  - the conversation as is, a prompt as one user message (the endpoint applies its own chat template);
  - max_tokens, temperature, top_p, seed (when set); top_k only when > 0, as an extra body field: llama.cpp,
    vLLM, TGI and Ollama accept it, OpenAI's own API refuses unknown fields (400 -> INVALID_ARGUMENT, which
    is the honest answer to a request it cannot honour);
  - stop strings are NOT sent: an endpoint cuts its text before a stop string and reports a plain "stop"
    (llama.cpp, measured: nothing says which string, or that one matched), so the mesh could not report
    FINISH_REASON_STOP_STRING nor the matched string. Postprocess matches them on the text as for every
    backend, and the gateway then closes this stream, which aborts the upstream request (tens of ms);
  - `stream_options.include_usage`: the last chunk carries the endpoint's token counts. An endpoint that
    sends none: completion_tokens = the content deltas received (one token each on llama.cpp, vLLM and TGI)
    and prompt_tokens 0.

Errors (the message names the model and the endpoint, never the key): 400/413/422 INVALID_ARGUMENT; 401/403
FAILED_PRECONDITION (the endpoint refused the mesh's credentials); 404 FAILED_PRECONDITION (the model is
unknown there); 429 RESOURCE_EXHAUSTED with the endpoint's Retry-After; 408, 5xx, connection errors
UNAVAILABLE. No first token within `first_token_timeout_s`, or no end within `timeout_s`, is UNAVAILABLE:
those are the mesh's limits on an endpoint that is slow or stuck, a fault of the dependency (a fallback
route moves on to its next target, as for a lost Triton); DEADLINE_EXCEEDED stays what it means everywhere
else, the caller's own deadline running out first.

Cancellation: closing the generator (the gateway cancelled) closes the HTTP response, and with it the
connection; the endpoint sees the client go and aborts the request (llama.cpp frees the slot at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import openai
from opentelemetry import trace

from llmmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LlmmeshError,
    ModelFailed,
    ResourceExhausted,
    Unavailable,
)
from llmmesh.common.logging import get_logger
from llmmesh.common.registry import ModelEntry, OpenAIEndpoint

__all__ = ["OpenAIBackend", "TextGeneration", "TextPiece"]

log = get_logger(__name__)
_tracer = trace.get_tracer("llmmesh.infer")

# Characters of an endpoint's error text kept in a status message.
_MAX_DETAIL = 300


@dataclass(frozen=True)
class TextGeneration:
    """One generation for an OpenAI-compatible endpoint, already validated by preprocess."""

    request_id: str
    model: str
    # (role, content) turns, oldest first; a prompt is one user turn.
    messages: Sequence[tuple[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass(frozen=True)
class TextPiece:
    """New text; the last piece has `finish` and the endpoint's token counts (and maybe no text)."""

    text: str
    finish: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The endpoint's retry hint: `retry-after-ms` (OpenAI), else `Retry-After` in seconds or an HTTP date."""
    with contextlib.suppress(KeyError, ValueError):
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _detail(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, Mapping) else inner
        if isinstance(message, str) and message:
            return message[:_MAX_DETAIL]
    return exc.message[:_MAX_DETAIL]


def _scrub(message: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "[REDACTED]")
    return message


def api_error(model: str, endpoint: str, exc: openai.OpenAIError, secrets: Iterable[str] = ()) -> LlmmeshError:
    """The domain error for what the SDK raised; `secrets` (the key) are cut out of the endpoint's text."""
    error = _api_error(f"model {model!r} at {endpoint}", exc)
    error.args = (_scrub(str(error), secrets),)
    return error


def _api_error(where: str, exc: openai.OpenAIError) -> LlmmeshError:
    if isinstance(exc, openai.APIStatusError):
        status, detail = exc.status_code, _detail(exc)
        if status in (401, 403):
            return FailedPrecondition(f"{where}: the endpoint refused the mesh's credentials (HTTP {status}): {detail}")
        if status == 404:
            return FailedPrecondition(f"{where}: the endpoint does not know this model (HTTP 404): {detail}")
        if status == 429:
            return ResourceExhausted(
                f"{where}: the endpoint is overloaded or over quota (HTTP 429): {detail}",
                _retry_after(exc.response.headers),
            )
        if status in (400, 413, 422):
            return InvalidArgument("input", f"{where}: the endpoint refused the request (HTTP {status}): {detail}")
        if status == 408 or status >= 500:
            return Unavailable(f"{where}: the endpoint failed (HTTP {status}): {detail}")
        return ModelFailed(f"{where}: the endpoint answered HTTP {status}: {detail}")
    if isinstance(exc, openai.APITimeoutError):
        return Unavailable(f"{where}: the endpoint timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return Unavailable(f"{where}: cannot reach the endpoint{reason}"[: 2 * _MAX_DETAIL])
    if isinstance(exc, openai.APIError):
        # An error event inside the stream: the endpoint's own answer to this request.
        return ModelFailed(f"{where}: the endpoint reported an error mid-stream: {_detail(exc)}")
    return ModelFailed(f"{where}: {type(exc).__name__}: {str(exc)[:_MAX_DETAIL]}")


_FINISH: dict[str, Literal["stop", "length"]] = {"stop": "stop", "length": "length"}


class OpenAIBackend:
    """Streams generations from the OpenAI-compatible endpoints of the registry's `backend: openai` models.

    One SDK client per endpoint (its connection pool shared by all requests to it); the key is read from the
    entry (environment or file) on every request, so a rotated key is used without a restart.
    """

    def __init__(self, models: Iterable[ModelEntry]) -> None:
        self._entries: dict[str, ModelEntry] = {}
        for entry in models:
            if entry.backend == "openai" and entry.openai is not None:
                for name in entry.names:
                    self._entries[name] = entry
        # model name -> (key it was made with, client)
        self._clients: dict[str, tuple[str, openai.AsyncOpenAI]] = {}
        self._base: dict[str, openai.AsyncOpenAI] = {}

    def serves(self, model: str) -> bool:
        return model in self._entries

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def _client(self, entry: ModelEntry, key: str) -> openai.AsyncOpenAI:
        endpoint = entry.openai
        assert endpoint is not None
        cached = self._clients.get(entry.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        base = self._base.get(entry.name)
        if base is None:
            # Never the SDK's retries (the gateway decides what to retry) nor its environment defaults
            # (OPENAI_API_KEY must not reach a third-party endpoint): the key is always the entry's.
            base = openai.AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=key or "unused",
                max_retries=0,
                timeout=endpoint.timeout_s,
            )
            self._base[entry.name] = base
            client = base
        else:
            # A rotated key: a copy that shares the connection pool.
            client = base.with_options(api_key=key or "unused")
        self._clients[entry.name] = (key, client)
        return client

    def _entry(self, model: str) -> ModelEntry:
        try:
            return self._entries[model]
        except KeyError:
            raise InvalidArgument(
                "model", f"unknown model {model!r}; served by an OpenAI-compatible endpoint: {', '.join(self.models)}"
            ) from None

    @staticmethod
    def _body(gen: TextGeneration, endpoint: OpenAIEndpoint) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": endpoint.model,
            "messages": [{"role": role, "content": content} for role, content in gen.messages],
            "max_tokens": gen.max_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if gen.seed is not None:
            body["seed"] = gen.seed
        if gen.top_k > 0:
            body["extra_body"] = {"top_k": gen.top_k}
        return body

    async def generate(self, gen: TextGeneration, timeout: float | None = None) -> AsyncGenerator[TextPiece, None]:
        """Yields the endpoint's text as it comes, then a last piece with the finish and the token counts.
        `timeout` is the caller's time left; closing the iterator aborts the upstream request."""
        entry = self._entry(gen.model)
        endpoint = entry.openai
        assert endpoint is not None
        try:
            key = endpoint.api_key()
        except OSError as exc:
            raise FailedPrecondition(
                f"model {entry.name!r}: cannot read its API key file {endpoint.api_key_file}: {exc.strerror or exc}"
            ) from None
        started = time.monotonic()
        limit = endpoint.timeout_s
        caller_limited = timeout is not None and timeout < limit
        end_at = started + (min(timeout, limit) if timeout is not None else limit)
        first_at = min(end_at, started + endpoint.first_token_timeout_s)
        body = self._body(gen, endpoint)
        # No key: send no Authorization header at all (a per-request omission, never the key itself in the
        # request options, which the SDK's debug log prints).
        headers = None if key else {"Authorization": openai.Omit()}
        stream: Any = None
        prompt_tokens = completion_tokens = 0
        got_text = False
        deltas = 0
        finish: Literal["stop", "length"] | None = None
        usage: Any = None
        # Not the current span: this generator yields to its caller, whose code must not run inside it.
        span = _tracer.start_span(
            "openai_chat_completions",
            attributes={"gen_ai.request.model": endpoint.model, "server.address": endpoint.base_url},
        )
        when = first_at
        try:
            async with asyncio.timeout_at(_loop_time(when)):
                stream = await self._client(entry, key).chat.completions.create(**body, extra_headers=headers)
            chunks = aiter(stream)
            while True:
                when = end_at if got_text else first_at
                async with asyncio.timeout_at(_loop_time(when)):
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices[:1]:
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        got_text = True
                        deltas += 1
                        yield TextPiece(text)
                    if choice.finish_reason:
                        finish = _FINISH.get(choice.finish_reason, "stop")
                        if choice.finish_reason not in _FINISH:
                            log.info("openai_finish_reason", model=entry.name, reason=choice.finish_reason)
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else deltas
            span.set_attributes(
                {"gen_ai.usage.input_tokens": prompt_tokens, "gen_ai.usage.output_tokens": completion_tokens}
            )
        except TimeoutError:
            span.set_status(trace.StatusCode.ERROR, "timeout")
            raise _timeout_error(entry, endpoint, first=when < end_at, caller=caller_limited) from None
        except openai.OpenAIError as exc:
            span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
            raise api_error(entry.name, endpoint.base_url, exc, secrets=(key,)) from None
        finally:
            span.end()
            if stream is not None:
                # A stream left early (cancelled, closed, failed): closing the response drops the
                # connection, which is how an HTTP endpoint learns to abort the request.
                await stream.close()
        yield TextPiece("", finish or "stop", prompt_tokens, completion_tokens)

    async def ready(self) -> bool:
        """Always true: a remote endpoint's health is not infer's (a slow API must not take infer out of service);
        its failures are each request's status."""
        return True

    async def close(self) -> None:
        for client in self._base.values():
            await client.close()


def _loop_time(monotonic_at: float) -> float:
    """A time.monotonic() instant on the event loop's clock (asyncio.timeout_at's)."""
    return asyncio.get_running_loop().time() + (monotonic_at - time.monotonic())


def _timeout_error(entry: ModelEntry, endpoint: OpenAIEndpoint, *, first: bool, caller: bool) -> LlmmeshError:
    """`first`: the first-token limit fired; else the whole answer's (the caller's deadline when `caller`)."""
    where = f"model {entry.name!r} at {endpoint.base_url}"
    if first:
        return Unavailable(f"{where}: no first token within first_token_timeout_s={endpoint.first_token_timeout_s:g} s")
    if caller:
        return DeadlineExceeded("deadline exceeded while generating")
    return Unavailable(f"{where}: the endpoint did not finish within timeout_s={endpoint.timeout_s:g} s")
