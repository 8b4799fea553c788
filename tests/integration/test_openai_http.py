"""The HTTP front door's own behaviour over real HTTP (uvicorn on a loopback port, the official `openai` SDK
and urllib as clients), in front of a scripted orchestrator: a fake only of what it calls, so that the
statuses a real mesh produces rarely (overload, a lost stage, a deadline, a failure mid-stream) and the
drain can be driven exactly. The real mesh behind it: tests/e2e/test_openai_http.py."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from llmmesh.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from llmmesh.gateway.admission import AdmissionController, AdmissionLimits
from llmmesh.gateway.auth import DENIED_MESSAGE, KeyTable
from llmmesh.gateway.openai_http import HttpServer, OpenAIFrontDoor
from llmmesh.v1 import generation_pb2

KEY = "sk-alice-0123456789"


def chunk(text: str) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(text=text, token_ids=[1]))


def final(n: int, reason: int = generation_pb2.FINISH_REASON_STOP) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        final=generation_pb2.Final(
            finish_reason=reason, model="m", usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=n)
        )
    )


@dataclass
class Script:
    """What the scripted orchestrator does for the next request: yield these, with `pause` s between items,
    or raise `error` after them."""

    items: list[generation_pb2.GenerateResponse] = field(default_factory=list)
    error: Exception | None = None
    pause: float = 0.0


class ScriptedOrchestrator:
    def __init__(self) -> None:
        self.script = Script([chunk("Hello"), chunk(" there."), final(2)])
        self.requests: list[tuple[generation_pb2.GenerateRequest, str]] = []
        self.closed = threading.Event()

    async def generate(
        self, request: generation_pb2.GenerateRequest, timeout: float | None, arrived: float, caller: str
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        self.requests.append((request, caller))
        script = self.script
        try:
            for item in script.items:
                if script.pause:
                    await asyncio.sleep(script.pause)
                yield item
            if script.error is not None:
                raise script.error
        finally:
            self.closed.set()


@dataclass
class Door:
    url: str
    orchestrator: ScriptedOrchestrator
    ready: list[bool]
    loop: asyncio.AbstractEventLoop
    server: HttpServer

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture
def door() -> Iterator[Door]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    orchestrator = ScriptedOrchestrator()
    ready = [True]
    models = generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(name="m", aliases=["mm"])])
    admission = AdmissionController(AdmissionLimits(max_inflight=1, max_queued=0))
    front = OpenAIFrontDoor(orchestrator, admission, KeyTable([f"alice:{KEY}"]), models, lambda: ready[0])  # type: ignore[arg-type]
    server = HttpServer(front.app, "127.0.0.1", 0, {})
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield Door(f"http://127.0.0.1:{server.port}", orchestrator, ready, loop, server)
    finally:
        asyncio.run_coroutine_threadsafe(server.drain(1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def http(door: Door, path: str, body: dict[str, Any] | None = None, key: str | None = KEY) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(door.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_requests_become_the_meshs_generate_requests(door: Door) -> None:
    reply = door.client().chat.completions.create(
        model="m",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=42,
        stop="END",
        user="end-user-1",
    )
    assert reply.choices[0].message.content == "Hello there."
    request, caller = door.orchestrator.requests[-1]
    assert caller == "alice"
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "Be brief."), ("user", "Hi there")]
    s = request.sampling
    assert (s.max_tokens, round(s.temperature, 3), round(s.top_p, 3), s.seed, list(s.stop)) == (
        7,
        0.5,
        0.9,
        42,
        ["END"],
    )
    assert reply.id == f"chatcmpl-{request.request_id}" and request.request_id


def test_no_key_or_a_wrong_key_is_401_with_the_fixed_message_and_health_needs_none(door: Door) -> None:
    for key in (None, "sk-wrong"):
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/models", None)):
            status, headers, payload = http(door, path, body, key=key)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            assert payload["error"]["message"] == DENIED_MESSAGE
    assert not door.orchestrator.requests
    assert http(door, "/health", key=None)[:3:2] == (200, {"status": "ok"})
    door.ready[0] = False
    assert http(door, "/health", key=None)[0] == 503


def test_models_lists_names_and_aliases(door: Door) -> None:
    assert [m.id for m in door.client().models.list()] == ["m", "mm"]


def test_overload_is_429_with_retry_after(door: Door) -> None:
    """One generation in flight fills admission (max_inflight 1, no queue): the next is refused at once."""
    door.orchestrator.script = Script([chunk("a"), chunk("b"), final(2)], pause=1.0)
    first = door.client().chat.completions.create(stream=True, **CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.RateLimitError) as err:
        door.client().chat.completions.create(**CHAT)
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert err.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert [c.choices[0].finish_reason for c in first if c.choices][-1] == "stop"


@pytest.mark.parametrize(
    ("error", "status", "sdk_error"),
    [
        (Unavailable("infer: connection lost"), 503, openai.InternalServerError),
        (FailedPrecondition("model gemma3 is not loaded"), 503, openai.InternalServerError),
        (DeadlineExceeded("deadline exceeded"), 504, openai.InternalServerError),
        (InvalidArgument("sampling.top_p", "must be in (0, 1], got 2"), 400, openai.BadRequestError),
        (InvalidArgument("model", "unknown model or route 'x'; known: m"), 404, openai.NotFoundError),
    ],
    ids=["unavailable", "failed-precondition", "deadline", "invalid", "unknown-model"],
)
def test_a_failure_before_the_first_token_gets_its_status(
    door: Door, error: Exception, status: int, sdk_error: type[openai.APIStatusError]
) -> None:
    door.orchestrator.script = Script([], error=error)
    for stream in (False, True):
        with pytest.raises(sdk_error) as err:
            door.client().chat.completions.create(stream=stream, **CHAT)  # type: ignore[call-overload]
        assert err.value.status_code == status
        assert str(error).split(": ", 1)[-1] in err.value.message
    if status == 400:
        assert err.value.body["param"] == "top_p"  # type: ignore[index]


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event(door: Door) -> None:
    door.orchestrator.script = Script([chunk("Hello")], error=Unavailable("infer: connection lost"))
    stream = door.client().chat.completions.create(stream=True, **CHAT)  # type: ignore[call-overload]
    received = []
    with pytest.raises(openai.APIError) as err:
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                received.append(c.choices[0].delta.content)
    assert received == ["Hello"]
    assert "connection lost" in str(err.value)


def test_a_client_that_goes_away_closes_the_generation(door: Door) -> None:
    for streamed in (True, False):
        door.orchestrator.closed.clear()
        door.orchestrator.script = Script([chunk(str(i)) for i in range(1000)] + [final(1000)], pause=0.05)
        if streamed:
            stream = door.client().chat.completions.create(stream=True, **CHAT)  # type: ignore[call-overload]
            next(iter(stream))
            stream.close()
        else:
            with pytest.raises(openai.APITimeoutError):
                door.client().with_options(timeout=1.0).chat.completions.create(**CHAT)
        assert door.orchestrator.closed.wait(5), f"streamed={streamed}: the generation was not closed"


def test_drain_lets_a_stream_in_flight_finish(door: Door) -> None:
    door.orchestrator.script = Script([chunk("a"), chunk("b"), chunk("c"), final(3)], pause=0.4)
    stream = door.client().chat.completions.create(stream=True, **CHAT)  # type: ignore[call-overload]
    iterator = iter(stream)
    next(iterator)
    drained = asyncio.run_coroutine_threadsafe(door.server.drain(10), door.loop)
    rest = list(iterator)
    drained.result(15)
    text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text == "abc"
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "stop"
