"""The OpenAI-compatible HTTP front door, in the gateway's process: `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health`.

A request here goes exactly where a gRPC `Generate` goes: the same API keys (as bearer tokens), the same
admission (priority, bounds, per-caller rate limits), then the orchestrator (preprocess, routing, dedup,
infer, postprocess with the safety policy), traced as one server span continuing the caller's W3C
`traceparent`. Starlette routes and parses, pydantic validates (an unknown or unsupported parameter is a
400 naming it), sse-starlette frames the server-sent events, uvicorn serves, on the gateway's event loop.

Errors use OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status of
the gRPC status the mesh would have answered: INVALID_ARGUMENT 400 (an unknown model 404),
UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429 with `Retry-After`, UNAVAILABLE and FAILED_PRECONDITION 503,
DEADLINE_EXCEEDED 504, anything else 500. A streamed request is admitted and its first message awaited
before the response starts, so everything that fails before the first token gets its status; a failure
after that ends the stream with an `error` event. A client that disconnects cancels the generation at the
model, streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import grpc
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmmesh.common.errors import LlmmeshError, status_of
from llmmesh.common.logging import get_logger
from llmmesh.common.metrics import HTTP_REQUESTS
from llmmesh.gateway.admission import AdmissionController, Priority
from llmmesh.gateway.auth import DENIED_MESSAGE, KeyTable
from llmmesh.gateway.orchestrator import Orchestrator, with_request_id
from llmmesh.v1 import generation_pb2

__all__ = ["ChatCompletionRequest", "CompletionRequest", "HttpError", "HttpServer", "OpenAIFrontDoor"]

log = get_logger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}
_FINISH_REASON = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_STOP_STRING: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, retry_after: float = 0.0
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPE.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.status == 429 else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def http_error(exc: BaseException) -> HttpError:
    """The HTTP error for what the mesh raised (the same mapping as its gRPC statuses)."""
    mapped = status_of(exc)
    if mapped is None:
        log.exception("http_internal_error", exc_info=exc)
        return HttpError(500, "internal error")
    code, message = mapped
    status = _HTTP_STATUS.get(code, 500)
    field = message.partition(":")[0] if code == grpc.StatusCode.INVALID_ARGUMENT else ""
    param = _PARAM_OF_FIELD.get(field, field.removeprefix("sampling.")) or None
    if field == "model" and "unknown" in message:
        return HttpError(404, message, "model", "model_not_found")
    retry_after = getattr(exc, "retry_after", None) or 0.0
    return HttpError(status, message, param if status == 400 else None, code.name.lower(), retry_after)


# Fields of the mesh's messages named by their OpenAI parameter.
_PARAM_OF_FIELD = {"chat": "messages", "chat.messages": "messages", "prompt": "prompt", "sampling.stop": "stop"}


# ---- the request bodies -------------------------------------------------------------------------------
class _Strict(BaseModel):
    # Anything not modelled here is refused by name, never ignored: a caller must not believe that a
    # parameter (tools, logprobs, response_format, ...) had an effect it did not have.
    model_config = ConfigDict(extra="forbid")


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = ""
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    n: Literal[1] = 1
    user: str | None = None
    # Neutral values only: the engines apply no presence or frequency penalty.
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    def sampling(self, max_tokens: int | None) -> generation_pb2.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = generation_pb2.SamplingParams(stop=stop)
        if max_tokens is not None:
            params.max_tokens = max_tokens
        if self.temperature is not None:
            params.temperature = self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self.seed is not None:
            params.seed = self.seed
        return params


class ChatCompletionRequest(_Common):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def to_proto(self) -> generation_pb2.GenerateRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise HttpError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        turns = [
            # "developer" is OpenAI's newer name for the system turn.
            generation_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
            for m in self.messages
        ]
        return generation_pb2.GenerateRequest(
            chat=generation_pb2.Chat(messages=turns),
            model=self.model,
            sampling=self.sampling(
                self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
            ),
        )


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False

    def to_proto(self) -> generation_pb2.GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise HttpError(400, f"one prompt per request is supported, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        return generation_pb2.GenerateRequest(prompt=prompt, model=self.model, sampling=self.sampling(self.max_tokens))


def _validation_error(exc: ValidationError) -> HttpError:
    error = exc.errors()[0]
    param = ".".join(str(p) for p in error["loc"]) or None
    top = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "extra_forbidden":
        return HttpError(400, f"unsupported parameter: {top!r} (llmmesh does not implement it)", top)
    if top in ("n", "presence_penalty", "frequency_penalty", "echo"):
        return HttpError(400, f"unsupported value for {top!r}: only {error['ctx']['expected']} is supported", top)
    return HttpError(400, f"{param}: {error['msg']}", param)


# ---- the app --------------------------------------------------------------------------------------------
class OpenAIFrontDoor:
    """The ASGI app; `app` is what uvicorn serves."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        admission: AdmissionController,
        keys: KeyTable,
        models: generation_pb2.ListModelsResponse,
        ready: Callable[[], bool],
    ) -> None:
        self._orchestrator = orchestrator
        self._admission = admission
        self._keys = keys
        self._models = models
        self._ready = ready
        self._created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HttpError: self._error, 404: self._not_found, 405: self._not_allowed},
        )

    # -- plumbing ---------------------------------------------------------------------------------------
    async def _error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HttpError)
        HTTP_REQUESTS.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return HttpError(404, f"no route {request.method} {request.url.path}").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return HttpError(405, f"{request.method} is not allowed on {request.url.path}").response()

    def _caller(self, request: Request) -> str:
        """The caller's identity: the API key's name (bearer token or x-api-key) when keys are configured,
        else the peer's host, as for gRPC callers."""
        if not len(self._keys):
            host = request.client.host if request.client else "unknown"
            return f"ipv6:{host}" if ":" in host else f"ipv4:{host}"
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        identity = self._keys.authenticate(headers)
        if identity is None:
            log.info("unauthenticated", path=request.url.path)
            raise HttpError(401, DENIED_MESSAGE, code="invalid_api_key")
        return identity

    @staticmethod
    async def _body(request: Request, model: type[_Common]) -> Any:
        try:
            raw = json.loads(await request.body())
        except ValueError as e:
            raise HttpError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise HttpError(400, "the body must be a JSON object")
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            raise _validation_error(e) from None

    # -- routes -----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        ready = self._ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    async def models(self, request: Request) -> Response:
        self._caller(request)
        names = [name for m in self._models.models for name in (m.name, *m.aliases)]
        names += [r.name for r in self._models.routes]
        data = [{"id": n, "object": "model", "created": self._created, "owned_by": "llmmesh"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, chat=False)

    async def _generate(self, request: Request, model: type[_Common], chat: bool) -> Response:
        arrived = time.monotonic()
        caller = self._caller(request)
        body = await self._body(request, model)
        proto = with_request_id(body.to_proto())
        if body.user:
            # OpenAI's end-user id: the caller's own user, recorded on the request's span (not a credential).
            trace.get_current_span().set_attribute("enduser.id", body.user)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{proto.request_id}"
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self._admission.admit(caller, Priority.INTERACTIVE, None))
            stream = self._orchestrator.generate(proto, None, arrived, caller)
            await stack.enter_async_context(contextlib.aclosing(stream))
            # The first message before the response starts: whatever fails before the first token gets
            # its own HTTP status. A client gone meanwhile cancels this task (the disconnect watch).
            first = await self._until_disconnect(request, anext(stream))
        except BaseException as e:
            await stack.aclose()
            if isinstance(e, HttpError | asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            if isinstance(e, StopAsyncIteration):
                raise HttpError(500, "the generation ended without an answer") from None
            raise http_error(e) from None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(stack, stream, first, ident, chat, include_usage, body.model)
            HTTP_REQUESTS.labels(request.url.path, "200").inc()
            return EventSourceResponse(events, ping=15, send_timeout=30)
        async with stack:
            try:
                responses = [first, *await self._until_disconnect(request, _collect(stream))]
            except HttpError:
                raise
            except Exception as e:
                raise http_error(e) from None
        HTTP_REQUESTS.labels(request.url.path, "200").inc()
        return JSONResponse(self._complete(responses, chat, ident))

    @staticmethod
    async def _until_disconnect(request: Request, work: Any) -> Any:
        """Awaits `work`, cancelling it if the client disconnects first (then raises CancelledError)."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            log.info("http_client_disconnected", path=request.url.path)
            raise HttpError(499, "the client disconnected")
        return task.result()

    def _complete(self, responses: list[generation_pb2.GenerateResponse], chat: bool, ident: str) -> dict[str, Any]:
        text = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
        final = responses[-1].final
        reason = _FINISH_REASON.get(final.finish_reason, "stop")
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        )
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": final.model,
            "choices": [choice],
            "usage": _usage(final.usage),
        }

    async def _events(
        self,
        stack: contextlib.AsyncExitStack,
        stream: AsyncIterator[generation_pb2.GenerateResponse],
        first: generation_pb2.GenerateResponse,
        ident: str,
        chat: bool,
        include_usage: bool,
        requested_model: str,
    ) -> AsyncIterator[str]:
        """The SSE `data:` payloads. Closing this generator (the client went away, the server drains past its
        grace) closes the generation, which cancels it at the model."""
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], model: str, usage: dict[str, Any] | None = None) -> str:
            payload: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": model}
            payload["choices"] = choices
            if include_usage:
                payload["usage"] = usage
            return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)

        def choice(text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": reason}

        async with stack:
            response: generation_pb2.GenerateResponse | None = first
            model = requested_model
            if chat:
                yield event([choice("", None, role=True)], model)
            try:
                while response is not None:
                    if response.HasField("chunk"):
                        if response.chunk.text:
                            yield event([choice(response.chunk.text, None)], model)
                    else:
                        final = response.final
                        model = final.model
                        reason = _FINISH_REASON.get(final.finish_reason, "stop")
                        yield event([choice(None if chat else "", reason)], model)
                        if include_usage:
                            yield event([], model, _usage(final.usage))
                        yield "[DONE]"
                        return
                    response = await anext(stream, None)
            except LlmmeshError as e:
                # After the first token the status line is sent: the error travels in the stream.
                yield json.dumps(http_error(e).body())
            except Exception as e:
                if status_of(e) is None:
                    raise
                yield json.dumps(http_error(e).body())


async def _collect(stream: AsyncIterator[generation_pb2.GenerateResponse]) -> list[generation_pb2.GenerateResponse]:
    return [r async for r in stream]


def _usage(usage: generation_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class HttpServer:
    """uvicorn serving the front door on the gateway's event loop, started and drained with the gRPC server
    (uvicorn's own `serve()` would install signal handlers; the gateway's process has its own)."""

    def __init__(self, app: Any, host: str, port: int, ssl: dict[str, Any]) -> None:
        import uvicorn

        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            **ssl,
        )
        self._server = uvicorn.Server(self._config)
        self._loop: asyncio.Task[None] | None = None
        self.port = port

    async def start(self) -> None:
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup()
        if not self._server.started:
            raise OSError(f"gateway: cannot serve HTTP on {self._config.host}:{self._config.port}")
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        self._loop = asyncio.create_task(self._server.main_loop())
        log.info("http_listening", port=self.port)

    async def drain(self, grace: float) -> None:
        """Stops accepting, lets streams in flight finish for up to `grace` seconds, then cancels them."""
        self._config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        self._server.should_exit = True
        if self._loop is not None:
            await self._loop
        await self._server.shutdown()
