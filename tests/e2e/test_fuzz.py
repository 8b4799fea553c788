"""Fuzzing the public API end to end: whatever a client sends, the answer is OK or INVALID_ARGUMENT.

Hypothesis draws GenerateRequests over every field (prompt or chat, sampling values including NaN,
infinities, negative and huge numbers, stop lists, model, request_id, chunking and priority including
enum numbers out of range) and overlays raw bytes on string fields (invalid UTF-8, which python protobuf
cannot produce, so the request is sent as wire bytes). 250 examples of 8 concurrent requests = 2,000
requests against a mesh of real processes: Triton serving the benchmark instrument (no compute, so valid
requests are cheap; default max_tokens 4) and the four services. Each request has a deadline, so a hang
fails the test. Afterwards every service still reports SERVING and no process has exited.

`derandomize=True`: the same examples on every run (CI stays stable); no example database is written.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from llmmesh.launcher import SERVICES, Mesh
from llmmesh.v1 import generation_pb2

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from loadtest.harness import running_mesh  # noqa: E402 - loadtest/ is importable from the repository root only

pytestmark = pytest.mark.e2e

EXAMPLES = 250
CONCURRENCY = 8
DEADLINE_S = 20.0
METHOD = "/llmmesh.v1.GenerationService/Generate"
# A status message that names a field: "sampling.stop[3]: ...", "chat.messages[0].content: ...".
_FIELD_MESSAGE = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: \S")

# ---- raw wire encoding -------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _raw_string(path: str, data: bytes) -> bytes:
    """Bytes for one string field of GenerateRequest (nested paths as nested messages), appended to a request.

    Appending works because protobuf merges: a later scalar wins, repeated fields and messages extend.
    """
    if path == "request_id":
        return _len_field(1, data)
    if path == "prompt":
        return _len_field(2, data)
    if path == "model":
        return _len_field(5, data)
    if path == "sampling.stop":
        return _len_field(4, _len_field(6, data))
    if path == "chat.messages.content":
        return _len_field(3, _len_field(1, _len_field(1, b"user") + _len_field(2, data)))
    if path == "chat.messages.role":
        return _len_field(3, _len_field(1, _len_field(1, data) + _len_field(2, b"Hi")))
    raise ValueError(path)


RAW_PATHS = ["request_id", "prompt", "model", "sampling.stop", "chat.messages.content", "chat.messages.role"]

# ---- strategies --------------------------------------------------------------------------------------

_controls = st.characters(min_codepoint=0, max_codepoint=0x9F)
texts = st.one_of(
    st.sampled_from(["Hi", "What is the capital of France?", "", "   ", "\n", "mail me at a@b.co"]),
    st.text(max_size=30),
    st.text(alphabet=st.one_of(_controls, st.characters(codec="utf-8")), max_size=12),
)
floats = st.one_of(
    st.none(),
    st.floats(width=32),  # NaN, infinities, negative, huge and subnormal values included
    st.sampled_from([0.0, 0.5, 1.0, -0.0, math.nan, math.inf, -math.inf, 3.4e38]),
)
# Small or clearly out of range: a valid request never asks for more than 4 tokens.
max_tokens = st.one_of(st.none(), st.integers(-3, 4), st.sampled_from([-(2**31), 2**31 - 1, 8193, 10**6]))
enum_numbers = st.one_of(st.integers(-1, 5), st.sampled_from([2**31 - 1, -(2**31), 1000]))
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "robot", "", "USER"]), texts)


# Plausible values: most are valid, so the generation path (postprocess, stop strings, chunking) is fuzzed too.
_plain = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=30)
PLAUSIBLE = {
    "text": st.one_of(st.sampled_from(["Hi", "What is the capital of France?", "Count to three."]), _plain),
    "max_tokens": st.one_of(st.none(), st.integers(1, 4)),
    "temperature": st.one_of(st.none(), st.floats(0, 2, width=32)),
    "top_p": st.one_of(st.none(), st.floats(0.25, 1, width=32)),
    "top_k": st.one_of(st.none(), st.integers(0, 50)),
    "stop": st.lists(_plain, max_size=3),
    "model": st.sampled_from(["", "smollm2"]),
    "request_id": st.one_of(
        st.just(""), st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
    ),
    "enum": st.integers(0, 3),
    "role": st.sampled_from(["user", "system", "assistant"]),
    "raw": st.just([]),
}
WILD = {
    "text": texts,
    "max_tokens": max_tokens,
    "temperature": floats,
    "top_p": floats,
    "top_k": st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), st.integers(-2, 50)),
    "stop": st.lists(texts, max_size=18),
    "model": st.one_of(st.sampled_from(["", "", "smollm2", "gpt-9"]), texts),
    "request_id": st.one_of(
        st.just(""), texts, st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=140)
    ),
    "enum": enum_numbers,
    "role": roles,
    "raw": st.lists(st.tuples(st.sampled_from(RAW_PATHS), st.binary(max_size=12)), max_size=2),
}


@st.composite
def generate_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=64))  # not a GenerateRequest at all, most likely
    # Each field from the plausible or the wild strategies: requests range from valid to thoroughly broken.
    wildness = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3, 1.0]))

    def pick(name: str) -> object:
        wild = draw(st.floats(0, 1)) < wildness if 0 < wildness < 1 else wildness == 1.0
        return draw((WILD if wild else PLAUSIBLE)[name])

    req = generation_pb2.GenerateRequest()
    which = (
        draw(st.sampled_from(["prompt", "prompt", "chat", "none"]))
        if wildness
        else draw(st.sampled_from(["prompt", "chat"]))
    )
    if which == "prompt":
        req.prompt = pick("text")  # type: ignore[assignment]
    elif which == "chat":
        for _ in range(draw(st.integers(0 if wildness else 1, 4))):
            req.chat.messages.add(role=pick("role"), content=pick("text"))  # type: ignore[arg-type]
        if not req.chat.messages:
            req.chat.SetInParent()
    s = req.sampling
    if (n := pick("max_tokens")) is not None:
        s.max_tokens = n  # type: ignore[assignment]
    if (v := pick("temperature")) is not None:
        s.temperature = v  # type: ignore[assignment]
    if (v := pick("top_p")) is not None:
        s.top_p = v  # type: ignore[assignment]
    if (k := pick("top_k")) is not None:
        s.top_k = k  # type: ignore[assignment]
    if (seed := draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))) is not None:
        s.seed = seed
    s.stop.extend(pick("stop"))  # type: ignore[arg-type]
    req.model = pick("model")  # type: ignore[assignment]
    req.request_id = pick("request_id")  # type: ignore[assignment]
    req.chunking = pick("enum")  # type: ignore[assignment]
    req.priority = pick("enum")  # type: ignore[assignment]
    raw = req.SerializeToString()
    for path, data in pick("raw"):  # type: ignore[attr-defined]
        raw += _raw_string(path, data)
    return raw


# ---- the mesh and the calls --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_mesh() -> Iterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="llmmesh-fuzz-") as tmp:
        env = {"LLMMESH_PREPROCESS_DEFAULT_MAX_TOKENS": "4"}
        with running_mesh(ttft_ms=1, itl_ms=1, log_dir=Path(tmp), env=env, pii=True) as mesh:
            yield mesh


def _send(channel: grpc.Channel, raw: bytes) -> tuple[str, str]:
    """One call; returns (outcome, detail). Outcome is the status code name, or a protocol violation."""
    call = channel.unary_stream(
        METHOD, request_serializer=None, response_deserializer=generation_pb2.GenerateResponse.FromString
    )
    responses: list[generation_pb2.GenerateResponse] = []
    try:
        for response in call(raw, timeout=DEADLINE_S):
            responses.append(response)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
        details: str = err.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.INVALID_ARGUMENT and not _FIELD_MESSAGE.match(details):
            return "UNNAMED_INVALID_ARGUMENT", details
        return code.name, details
    finals = [i for i, r in enumerate(responses) if r.HasField("final")]
    if finals != [len(responses) - 1]:
        return "NO_FINAL", f"{len(responses)} messages, finals at {finals}"
    return "OK", ""


def _healthy(mesh: Mesh) -> dict[str, str]:
    states = {}
    for name in SERVICES:
        with grpc.insecure_channel(mesh.address(name)) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            states[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return states


def test_random_requests_get_ok_or_invalid_argument(fuzz_mesh: Mesh) -> None:
    """2,000 fuzzed requests: each ends OK (with one final) or INVALID_ARGUMENT naming a field; the mesh survives."""
    outcomes: Counter[str] = Counter()
    bad: list[tuple[str, str, bytes]] = []

    with grpc.insecure_channel(fuzz_mesh.address("gateway")) as channel, ThreadPoolExecutor(CONCURRENCY) as pool:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(generate_requests(), min_size=CONCURRENCY, max_size=CONCURRENCY))
        def run(batch: list[bytes]) -> None:
            for raw, (outcome, detail) in zip(batch, pool.map(lambda r: _send(channel, r), batch), strict=True):
                outcomes[outcome] += 1
                if outcome not in ("OK", "INVALID_ARGUMENT"):
                    bad.append((outcome, detail, raw))

        run()

    total = sum(outcomes.values())
    print(f"fuzz outcomes: {dict(outcomes)}")
    assert total >= EXAMPLES * CONCURRENCY
    assert not bad, f"{len(bad)} unexpected outcomes, first: {bad[:5]}"
    assert outcomes["OK"] > 100 and outcomes["INVALID_ARGUMENT"] > 100  # both paths were exercised
    exited = {name: proc.returncode for name, proc in fuzz_mesh.procs.items() if proc.poll() is not None}
    assert not exited, f"processes exited: {exited}"
    assert fuzz_mesh.triton is not None and fuzz_mesh.triton.pid is not None
    assert _healthy(fuzz_mesh) == dict.fromkeys(SERVICES, "SERVING")


def test_invalid_utf8_names_the_field(fuzz_mesh: Mesh) -> None:
    """Invalid UTF-8 in a string field is INVALID_ARGUMENT naming that field, not UNKNOWN."""
    valid = generation_pb2.GenerateRequest(prompt="Hi").SerializeToString()
    with grpc.insecure_channel(fuzz_mesh.address("gateway")) as channel:
        for path, field in [
            ("prompt", "prompt"),
            ("request_id", "request_id"),
            ("model", "model"),
            ("sampling.stop", "sampling.stop[0]"),
            ("chat.messages.content", "chat.messages[0].content"),
        ]:
            outcome, detail = _send(channel, valid + _raw_string(path, b"ok\xff\xfe"))
            assert outcome == "INVALID_ARGUMENT", (path, outcome, detail)
            assert detail.startswith(f"{field}: invalid UTF-8"), detail
        outcome, detail = _send(channel, b"\xff\xff\xff\xff")
        assert outcome == "INVALID_ARGUMENT" and detail.startswith("request: not a valid llmmesh.v1.GenerateRequest")


def test_out_of_range_enums_name_the_field(fuzz_mesh: Mesh) -> None:
    """Unknown chunking and priority numbers are refused naming the field."""
    with grpc.insecure_channel(fuzz_mesh.address("gateway")) as channel:
        for field in ("priority", "chunking"):
            raw = generation_pb2.GenerateRequest(prompt="Hi", **{field: 7}).SerializeToString()  # type: ignore[arg-type]
            outcome, detail = _send(channel, raw)
            assert outcome == "INVALID_ARGUMENT" and detail.startswith(f"{field}: "), detail
        # A varint wider than the enum's int32 (protobuf keeps its low 32 bits: 7).
        raw = generation_pb2.GenerateRequest(prompt="Hi").SerializeToString() + b"\x38" + _varint(2**32 + 7)
        outcome, detail = _send(channel, raw)
        assert outcome == "INVALID_ARGUMENT" and detail.startswith("priority: "), (outcome, detail)


CONVERSE = "/llmmesh.v1.GenerationService/Converse"


def _converse(channel: grpc.Channel, first: bytes) -> tuple[str, str]:
    call = channel.stream_stream(
        CONVERSE, request_serializer=None, response_deserializer=generation_pb2.ConverseResponse.FromString
    )
    try:
        responses = list(call(iter([first]), timeout=DEADLINE_S))
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""  # type: ignore[attr-defined]
    return ("OK", "") if responses and responses[-1].HasField("final") else ("NO_FINAL", str(len(responses)))


def test_converse_validates_its_first_message_too(fuzz_mesh: Mesh) -> None:
    """Converse: invalid UTF-8, unknown priority and bad request ids are INVALID_ARGUMENT naming the field."""
    ok = generation_pb2.GenerateRequest(prompt="Hi", sampling=generation_pb2.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(fuzz_mesh.address("gateway")) as channel:
        assert _converse(channel, generation_pb2.ConverseRequest(generate=ok).SerializeToString()) == ("OK", "")
        bad_utf8 = _len_field(1, ok.SerializeToString() + _raw_string("prompt", b"\xc3\x28"))
        code, detail = _converse(channel, bad_utf8)
        assert code == "INVALID_ARGUMENT" and detail.startswith("generate.prompt: invalid UTF-8"), detail
        for change, field in (({"priority": 9}, "priority"), ({"request_id": "a b"}, "request_id")):
            req = generation_pb2.GenerateRequest(prompt="Hi", **change)  # type: ignore[arg-type]
            code, detail = _converse(channel, generation_pb2.ConverseRequest(generate=req).SerializeToString())
            assert code == "INVALID_ARGUMENT" and detail.startswith(f"{field}: "), detail


def test_a_stop_string_before_any_text_never_hangs(fuzz_mesh: Mesh) -> None:
    """Found by this fuzz test: postprocess answers (stop string) and ends the stream while the gateway is still
    writing tokens; the failed writes must not re-open postprocess (which then waited for input forever)."""
    req = generation_pb2.GenerateRequest(
        prompt="What is the capital of France?",
        sampling=generation_pb2.SamplingParams(temperature=1.0, stop=["a", "e", "o"]),
        chunking=generation_pb2.CHUNKING_MODE_SENTENCE,
    )
    raw = req.SerializeToString()
    with grpc.insecure_channel(fuzz_mesh.address("gateway")) as channel:
        pool = ThreadPoolExecutor(CONCURRENCY)
        sent = [pool.submit(_send, channel, raw) for _ in range(400)]
        # Well inside pytest's 300 s: a mesh that stalls is reported with its logs, not killed silently.
        _, waiting = wait(sent, timeout=200)
        pool.shutdown(wait=True, cancel_futures=True)
    results = [f.result() for f in sent if f.done() and not f.cancelled()]
    outcomes = Counter(outcome for outcome, _ in results)
    # On a failure, what the statuses said and what the services logged last.
    said = Counter(f"{outcome}: {detail}" for outcome, detail in results if outcome != "OK")
    if waiting or outcomes != Counter({"OK": 400}):
        # A stage that crashed or hung explains a burst of UNAVAILABLE or a stall: whether each process still
        # runs, and what each one that runs is doing (SIGUSR1: every thread's stack into its log).
        running = {name: proc.poll() for name, proc in fuzz_mesh.procs.items()}
        for proc in fuzz_mesh.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        logs = f"exit codes (None = running): {running}\n" + "\n".join(
            f"--- {name}:\n{fuzz_mesh.log_tail(name, 60)}" for name in ("gateway", "postprocess", "infer", "triton")
        )
        pytest.fail(f"{len(waiting)} still waiting after 200 s; {said.most_common(5)}\n{logs}")
