"""What a listener waits for: first token, first speakable chunk, first audio, and barge-in to engine stop.

    .venv/bin/python -m loadtest.voice_bench --sessions 1 4 16 --modes CLAUSE SENTENCE --rounds 3 --max-tokens 64

(those are the defaults: `python -m loadtest.voice_bench` alone runs the same). Starts the real mesh
(Triton serving the registry's models, SmolLM2 the default, and the safety classifier; the four services;
classifier on, dedup off) unless `--address` names a running gateway: then `--triton-metrics URL` (Triton's
metrics endpoint) enables the barge-in part and `--triton-grpc HOST:PORT` the model floor; each is skipped,
saying so, without its option. Every request asks `fresh` (no joined generation, no cached replay).

Answers. For each level of `--sessions`, each round runs that many concurrent voice sessions in every mode
in turn (the order reversed every other round), so the modes see the same machine. Each session is one
listener: its own reference front end (`llmmesh.voice.VoiceFrontEnd`) over `Converse`, eSpeak NG
synthesizing every chunk as it arrives, greedy, `--max-tokens`. One warm-up session per mode is not
counted. Measured by the client from just before the call opens: first token = first chunk with text, first
speakable chunk = first chunk marked speakable, first audio = first PCM bytes espeak-ng produced for the
first chunk. Playback is not paced (`realtime=False`): pacing changes when audio is heard, not when the
first audio is ready.

Barge-in to engine stop. Each round then runs as many barge-in sessions per mode (up to
`--barge-in-max-tokens`, so that the answer is still being generated): the front end barges in
`--barge-in-after-ms` after its first audio (its `interrupt` event: the Converse interrupt) and notes when
(`VoiceRun.interrupted_at`). Meanwhile a thread polls Triton's metrics endpoint every 5 ms and notes when
each increment of the model's `llmmesh_model_requests_total{outcome="cancelled"}` is first seen: the model
counts a cancel once its engine task has returned, so that is when the engine stopped, seen late by at most
one poll and one scrape. The k-th cancel is paired with the k-th acknowledged interrupt, both in time order
(a cancel seen before the next unpaired interrupt is skipped): with concurrent barge-ins the pairing is by
order, not by request, which keeps the distribution but not which session each figure belongs to. That the
engine stopped is checked on `llmmesh_model_generated_tokens_total`: it must not grow after a batch's last
stop (250 ms of polling after it). The counter is model-wide: at 1 session the check is per barge-in, with
concurrent sessions per batch. A generation that completed instead of being cancelled (the barge-in came
too late) is counted apart; the mesh's acknowledgement of each barge-in is timed too (barge-in to ack).

Model floor (1 session). Each round's prompt first goes to the model directly (so the round's answers and
the floor all find it in llama.cpp's prompt cache, and what is compared is everything but the prefill);
after the answers the same prompt, tokenized by preprocess's own `Preparer` (same chat
template, same default system prompt), goes straight to Triton through infer's own `TritonBackend`
(ModelStreamInfer, TensorRT-LLM tensors, a call of its own, greedy, same max tokens), and each token's
arrival is noted. An answer's floor is the arrival of the token that completes its first speakable chunk's
text (the fewest of the answer's tokens whose bytes cover its text through that chunk), + 20 ms: the model's
TTFT, plus the time of that chunk's other tokens, plus the issue's allowance. Targets at 1 session: first
speakable chunk p50 <= floor p50; barge-in to engine stop p99 <= 100 ms.

Results go to loadtest/results/voice_bench.json; a markdown table and the targets are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmmesh.client import AsyncClient, AsyncVoiceSession, Chunk, Chunking, MeshError
from llmmesh.client.options import ClientConfig, Metadata
from llmmesh.common.model_assets import ModelAssets, load_model_assets
from llmmesh.common.registry import load_registry
from llmmesh.infer.backend import Generation, TritonBackend
from llmmesh.launcher import Mesh, MeshPorts
from llmmesh.preprocess.domain import PrepareInput, Preparer, SamplingInput
from llmmesh.preprocess.server import PreprocessSettings
from llmmesh.voice import EspeakNg, Speech, VoiceFrontEnd, VoiceRun

from .metrics import distribution
from .model_counters import POLL_INTERVAL, CounterPoller, ModelCounters, analyse_barge_ins

__all__ = ["main", "paired_over_ms", "tokens_through_first_speakable"]

RESULTS = Path(__file__).parent / "results" / "voice_bench.json"
PROMPTS = (
    "Describe Paris in a few sentences.",
    "Why is the sky blue? Explain briefly.",
    "Give me three tips for sleeping well.",
    "What is the capital of France, and what is it known for?",
)
MODES = (Chunking.CLAUSE, Chunking.SENTENCE)
METRICS = ("time_to_first_token", "time_to_first_speakable_chunk", "time_to_first_audio")
# The allowance over the model's own time to the first speakable chunk, and its barge-in bound.
FLOOR_SLACK = 0.020
BARGE_IN_TARGET = 0.100
# Polling goes on this long after a batch's last stop: the token counter must stay still meanwhile.
SETTLE = 0.25


def tokens_through_first_speakable(chunks: Sequence[Chunk], token_bytes: Sequence[bytes]) -> int | None:
    """How many of the answer's tokens produce its text through the first speakable chunk with text: the
    fewest of every chunk's token ids, in order, whose bytes cover that text. Counted from the text, since a
    chunk's ids are not its own text's (postprocess gives a step's ids to the first chunk it releases).
    None without such a chunk, or when the tokens' text does not start with it."""
    index = next((k for k, c in enumerate(chunks) if c.text and c.speakable), None)
    if index is None:
        return None
    target = "".join(c.text for c in chunks[: index + 1]).encode()
    produced = b""
    for n, token in enumerate((i for c in chunks for i in c.token_ids), 1):
        produced += token_bytes[token]
        if len(produced) >= len(target):
            return n if produced.startswith(target) else None
    return None


@dataclass(frozen=True)
class _CueAfterFirstAudio(EspeakNg):
    """eSpeak NG that sets `cue` `delay` seconds after the first audio it produces: the listener barges in."""

    cue: asyncio.Event = field(default_factory=asyncio.Event)
    delay: float = 0.1

    async def synthesize(self, text: str) -> Speech:
        speech = await super().synthesize(text)
        if speech.pcm:
            due = (speech.first_audio_at or speech.ready_at) + self.delay
            asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self.cue.set)
        return speech


class _RecordingSession(AsyncVoiceSession):
    def __init__(
        self,
        stub: Any,
        config: ClientConfig,
        timeout: float | None,
        metadata: Metadata | None,
        sink: dict[str, list[Chunk]],
    ) -> None:
        super().__init__(stub, config, timeout, metadata)
        self._sink = sink

    async def __anext__(self) -> Chunk:
        chunk = await super().__anext__()
        assert self.request is not None
        self._sink.setdefault(self.request.request_id, []).append(chunk)
        return chunk


class _RecordingClient(AsyncClient):
    """The mesh's client, keeping each voice turn's chunks with their token ids (which the front end's
    `SpokenChunk` does not carry), by request id."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.chunks: dict[str, list[Chunk]] = {}

    def converse(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> AsyncVoiceSession:
        return _RecordingSession(self._stub(), self.config, self._timeout(timeout), metadata, self.chunks)


@dataclass(frozen=True)
class _ModelRun:
    ids: list[int]
    # Seconds from the request's start to each token's arrival.
    arrivals: list[float]


class _DirectModel:
    """The model alone: preprocess's own tokenization, infer's own Triton client, a call per request."""

    def __init__(self, triton_grpc: str) -> None:
        entry = load_registry().default
        assert entry.gguf_path is not None
        self.assets: ModelAssets = load_model_assets(str(entry.gguf_path)).configured(template=entry.template)
        self._model = entry.name
        self._preparer = Preparer({entry.name: self.assets}, entry.name, PreprocessSettings().default_system_prompt)
        self._backend = TritonBackend(triton_grpc, {entry.name: entry.triton_model}, shared_calls=0)

    async def run(self, prompt: str, max_tokens: int) -> _ModelRun:
        sampling = SamplingInput(max_tokens=max_tokens, temperature=0.0)
        p = self._preparer.prepare(PrepareInput(f"voice-bench-{uuid.uuid4().hex}", self._model, prompt, None, sampling))
        s = p.sampling
        gen = Generation(
            p.request_id,
            p.model,
            p.input_ids,
            s.max_tokens,
            p.end_id,
            p.pad_id,
            s.temperature,
            s.top_p,
            s.top_k,
            s.seed,
        )
        ids: list[int] = []
        arrivals: list[float] = []
        started = time.monotonic()
        async for batch in self._backend.generate(gen, timeout=120):
            at = time.monotonic() - started
            ids += batch
            arrivals += [at] * len(batch)
        return _ModelRun(ids, arrivals)

    async def close(self) -> None:
        await self._backend.close()


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]
    modes: tuple[Chunking, ...]
    rounds: int
    max_tokens: int
    barge_in_after: float
    barge_in_max_tokens: int
    triton_model: str


@dataclass(frozen=True)
class _Endpoints:
    gateway: str
    # Triton's metrics URL (barge-in part) and gRPC address (model floor); None: that part is skipped.
    triton_metrics: str | None
    triton_grpc: str | None
    mesh: str


@dataclass
class _BargeInBatch:
    sessions: int
    interrupts: list[float]
    samples: list[tuple[float, ModelCounters]]
    ack_latencies: list[float]
    not_acknowledged: int
    errors: list[str]
    poll_interval: float | None
    poll_failures: int


@contextlib.contextmanager
def _mesh(args: argparse.Namespace, log_dir: Path) -> Iterator[_Endpoints]:
    if args.address:
        yield _Endpoints(args.address, args.triton_metrics, args.triton_grpc, f"{args.address} (started elsewhere)")
        return
    # Dedup off: the rounds repeat greedy prompts, and replays from the result cache would not measure speech.
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=log_dir,
        env={"LLMMESH_INFER_DEDUP": "false"},
        in_gateway=tuple(args.in_gateway),
    )
    mesh.start()
    try:
        assert mesh.triton is not None
        classifier = "on" if "safety_classifier" in mesh.served_triton_models else "off"
        inside = f" ({', '.join(mesh.in_gateway)} in the gateway)" if mesh.in_gateway else ""
        described = (
            f"started here: Triton ({', '.join(mesh.served_triton_models)}) + {', '.join(mesh.services)}{inside}, "
            f"classifier {classifier}"
        )
        yield _Endpoints(mesh.address("gateway"), mesh.triton.metrics_url, mesh.triton.grpc_url, described)
    finally:
        mesh.stop()


async def _speak(
    client: AsyncClient,
    tts: EspeakNg,
    mode: Chunking,
    prompt: str,
    max_tokens: int,
    request_id: str,
    cue: asyncio.Event | None = None,
) -> VoiceRun | str:
    front_end = VoiceFrontEnd(client, tts, mode, realtime=False)
    try:
        return await front_end.speak(
            prompt,
            interrupt=cue,
            max_tokens=max_tokens,
            temperature=0.0,
            fresh=True,
            request_id=request_id,
            timeout=120,
        )
    except MeshError as exc:
        return exc.code.name


async def _barge_in_batch(
    client: _RecordingClient, mode: Chunking, prompts: list[str], url: str, plan: Plan
) -> _BargeInBatch:
    poller = CounterPoller(url, plan.triton_model)
    await asyncio.to_thread(poller.start)
    try:
        cues = [asyncio.Event() for _ in prompts]
        results = await asyncio.gather(
            *(
                _speak(
                    client,
                    _CueAfterFirstAudio(cue=cue, delay=plan.barge_in_after),
                    mode,
                    prompt,
                    plan.barge_in_max_tokens,
                    uuid.uuid4().hex,
                    cue,
                )
                for prompt, cue in zip(prompts, cues, strict=True)
            )
        )
        runs = [r for r in results if isinstance(r, VoiceRun)]
        acked = [r for r in runs if r.ack is not None and r.ack.acknowledged and r.interrupted_at is not None]
        # An engine may stop after the mesh acknowledged the barge-in: wait for its cancel, then settle.
        await asyncio.to_thread(poller.wait_for_cancels, len(acked), 5.0)
        await asyncio.sleep(SETTLE)
    finally:
        await asyncio.to_thread(poller.stop)
    client.chunks.clear()
    elapsed = time.monotonic() - poller.started_at
    return _BargeInBatch(
        sessions=len(prompts),
        interrupts=[r.interrupted_at for r in acked if r.interrupted_at is not None],
        samples=list(poller.samples),
        ack_latencies=[
            r.generation_ended_at - r.interrupted_at for r in acked if r.generation_ended_at and r.interrupted_at
        ],
        not_acknowledged=len(runs) - len(acked),
        errors=[r for r in results if isinstance(r, str)],
        poll_interval=elapsed / poller.polls if poller.polls else None,
        poll_failures=poller.failures,
    )


def _dist(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int] | None:
    dist = distribution(values, scale)
    return dist.as_dict() if dist else None


def _barge_in_summary(batches: list[_BargeInBatch]) -> dict[str, Any]:
    outcomes = [analyse_barge_ins(b.interrupts, b.samples) for b in batches]
    after_stop = [o.tokens_after_last_stop for o in outcomes if o.tokens_after_last_stop is not None]
    intervals = [b.poll_interval for b in batches if b.poll_interval is not None]
    return {
        "sessions": sum(b.sessions for b in batches),
        "acknowledged": sum(len(b.interrupts) for b in batches),
        "not_acknowledged": sum(b.not_acknowledged for b in batches),
        "matched": sum(len(o.stop_latencies) for o in outcomes),
        "completed_instead": sum(o.completed for o in outcomes),
        "errors": [e for b in batches for e in b.errors],
        "barge_in_to_engine_stop_ms": _dist([x for o in outcomes for x in o.stop_latencies]),
        "barge_in_to_ack_ms": _dist([x for b in batches for x in b.ack_latencies]),
        # Model-wide tokens generated between a barge-in and its engine stop (at 1 session: that answer's).
        "tokens_until_stop": _dist([x for o in outcomes for x in o.tokens_until_stop], scale=1.0),
        # Per batch with a stop: tokens generated after its last stop; all zero = the engine stopped.
        "tokens_after_last_stop": after_stop,
        "engine_stopped_batches": f"{sum(1 for t in after_stop if t == 0)}/{len(after_stop)}",
        "poll_interval_ms": round(1000 * sum(intervals) / len(intervals), 2) if intervals else None,
        "poll_failures": sum(b.poll_failures for b in batches),
    }


def _answers_entry(runs: list[VoiceRun], errors: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"answers": len(runs), "errors": errors}
    for metric in METRICS:
        entry[f"{metric}_ms"] = _dist([v for run in runs if (v := getattr(run, metric)) is not None])
    entry["mesh_time_to_first_token_ms"] = _dist(
        [run.final.timings.time_to_first_token_ms / 1000 for run in runs if run.final]
    )
    entry["chunks_per_answer"] = round(sum(len(run.chunks) for run in runs) / max(1, len(runs)), 1)
    entry["audio_seconds_per_answer"] = round(sum(run.audio_seconds for run in runs) / max(1, len(runs)), 2)
    return entry


def paired_over_ms(pairs: Sequence[tuple[float, float]]) -> float | None:
    """The median of each answer's first speakable chunk minus its own floor (seconds in, ms out; negative:
    under the floor): steadier than the difference of two medians when the model's speed drifts."""
    return round(statistics.median(first - floor for first, floor in pairs) * 1000, 1) if pairs else None


def _floor_entry(pairs: list[tuple[float, float]], skipped: int, mismatched: int) -> dict[str, Any]:
    """(first speakable, floor) pairs of one mode's answers, in seconds."""
    return {
        "answers": len(pairs),
        "floor_ms": _dist([floor for _, floor in pairs]),
        "over_floor_paired_p50_ms": paired_over_ms(pairs),
        "within_floor": sum(1 for first, floor in pairs if first <= floor),
        # Each answer's first speakable chunk minus its own floor, in the order answered (for pooling runs).
        "over_floor_ms": [round((first - floor) * 1000, 1) for first, floor in pairs],
        # No speakable chunk, or too few model tokens; the mesh's tokens differing from the model's alone.
        "skipped": skipped,
        "token_mismatches": mismatched,
    }


async def _level(
    client: _RecordingClient, direct: _DirectModel | None, endpoints: _Endpoints, level: int, plan: Plan
) -> dict[str, Any]:
    runs: dict[Chunking, list[VoiceRun]] = {mode: [] for mode in plan.modes}
    errors: dict[Chunking, list[str]] = {mode: [] for mode in plan.modes}
    batches: dict[Chunking, list[_BargeInBatch]] = {mode: [] for mode in plan.modes}
    floors: dict[Chunking, list[tuple[float, float]]] = {mode: [] for mode in plan.modes}
    skipped = dict.fromkeys(plan.modes, 0)
    mismatched = dict.fromkeys(plan.modes, 0)
    measure_floor = direct is not None and level == 1
    for r in range(plan.rounds):
        prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(level)]
        order = plan.modes if r % 2 == 0 else plan.modes[::-1]
        answers: list[tuple[Chunking, VoiceRun, list[Chunk]]] = []
        if measure_floor:
            assert direct is not None
            # The prompt goes to the model first, so the answers and the floor all find it in llama.cpp's
            # prompt cache: the floor is then compared with everything but the prefill.
            await direct.run(prompts[0], plan.max_tokens)
        for mode in order:
            ids = [uuid.uuid4().hex for _ in prompts]
            results = await asyncio.gather(
                *(_speak(client, EspeakNg(), mode, p, plan.max_tokens, i) for p, i in zip(prompts, ids, strict=True))
            )
            for result, request_id in zip(results, ids, strict=True):
                chunks = client.chunks.pop(request_id, [])
                if isinstance(result, str):
                    errors[mode].append(result)
                else:
                    runs[mode].append(result)
                    answers.append((mode, result, chunks))
        if endpoints.triton_metrics:
            for mode in order:
                batches[mode].append(await _barge_in_batch(client, mode, prompts, endpoints.triton_metrics, plan))
        if measure_floor:
            assert direct is not None
            model = await direct.run(prompts[0], plan.max_tokens)
            for mode, run, chunks in answers:
                n = tokens_through_first_speakable(chunks, direct.assets.token_bytes)
                first = run.time_to_first_speakable_chunk
                if n is None or first is None or n > len(model.ids):
                    skipped[mode] += 1
                elif [i for c in chunks for i in c.token_ids][:n] != model.ids[:n]:
                    mismatched[mode] += 1
                else:
                    floors[mode].append((first, model.arrivals[n - 1] + FLOOR_SLACK))
    out: dict[str, Any] = {}
    for mode in plan.modes:
        entry = _answers_entry(runs[mode], errors[mode])
        entry["barge_in"] = _barge_in_summary(batches[mode]) if endpoints.triton_metrics else None
        entry["model_floor"] = _floor_entry(floors[mode], skipped[mode], mismatched[mode]) if measure_floor else None
        out[mode.name] = entry
    return out


async def _bench(endpoints: _Endpoints, plan: Plan) -> dict[str, Any]:
    direct = _DirectModel(endpoints.triton_grpc) if endpoints.triton_grpc and 1 in plan.levels else None
    try:
        client = _RecordingClient(endpoints.gateway)
        async with client:
            for mode in plan.modes:  # warm-up, not counted
                await _speak(client, EspeakNg(), mode, PROMPTS[0], plan.max_tokens, uuid.uuid4().hex)
            client.chunks.clear()
            if direct is not None:
                await direct.run(PROMPTS[0], plan.max_tokens)
            return {str(level): await _level(client, direct, endpoints, level, plan) for level in plan.levels}
    finally:
        if direct is not None:
            await direct.close()


def _p(entry: dict[str, Any] | None, key: str, pct: str = "p50") -> float | None:
    d = None if entry is None else entry.get(key)
    return None if d is None else float(d[pct])


def _targets(levels: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's targets at 1 session, per mode; None without a 1-session level."""
    one = levels.get("1")
    if one is None:
        return None
    out: dict[str, Any] = {}
    for mode, entry in one.items():
        first = _p(entry, "time_to_first_speakable_chunk_ms")
        floor = _p(entry["model_floor"], "floor_ms")
        stop = _p(entry["barge_in"], "barge_in_to_engine_stop_ms", "p99")
        out[mode] = {
            "first_speakable_p50_ms": first,
            "floor_p50_ms": floor,
            "over_floor_paired_p50_ms": None
            if entry["model_floor"] is None
            else entry["model_floor"]["over_floor_paired_p50_ms"],
            "first_speakable_within_floor": None if first is None or floor is None else first <= floor,
            "barge_in_to_engine_stop_p99_ms": stop,
            "barge_in_within_100_ms": None if stop is None else stop <= BARGE_IN_TARGET * 1000,
        }
    return out


def _table(levels: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any] | None, key: str) -> str:
        p50, p99 = _p(entry, key), _p(entry, key, "p99")
        return "-" if p50 is None or p99 is None else f"{p50:.0f} / {p99:.0f}"

    lines = [
        "| sessions | chunking | answers | first token p50 / p99 (ms) | first speakable chunk p50 / p99 (ms) "
        "| model floor p50 (ms) | first audio p50 / p99 (ms) | barge-in to engine stop p50 / p99 (ms) "
        "| barge-ins matched | chunks per answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level, modes in levels.items():
        for mode, e in modes.items():
            floor = _p(e["model_floor"], "floor_ms")
            barge = e["barge_in"]
            matched = "-" if barge is None else f"{barge['matched']}/{barge['sessions']}"
            lines.append(
                f"| {level} | {mode} | {e['answers']} | {cell(e, 'time_to_first_token_ms')} "
                f"| {cell(e, 'time_to_first_speakable_chunk_ms')} | {'-' if floor is None else f'{floor:.0f}'} "
                f"| {cell(e, 'time_to_first_audio_ms')} | {cell(barge, 'barge_in_to_engine_stop_ms')} "
                f"| {matched} | {e['chunks_per_answer']} |"
            )
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def _target_lines(targets: dict[str, Any] | None) -> list[str]:
    if targets is None:
        return ["Targets: not measured (no 1-session level)"]
    lines = ["Targets at 1 session:"]
    for mode, t in targets.items():
        first, floor, stop = (
            t["first_speakable_p50_ms"],
            t["floor_p50_ms"],
            t["barge_in_to_engine_stop_p99_ms"],
        )
        lines.append(
            f"- {mode}: first speakable chunk p50 {_ms(first)} vs model floor p50 {_ms(floor)} (TTFT + the chunk's "
            f"tokens + 20 ms): {_verdict(t['first_speakable_within_floor'])} (paired, each answer against its own "
            f"floor: median {_ms(t['over_floor_paired_p50_ms'])} over); barge-in to engine stop p99 "
            f"{_ms(stop)} vs 100 ms: {_verdict(t['barge_in_within_100_ms'])}"
        )
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.voice_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running gateway; default: start the real mesh on free ports")
    parser.add_argument("--triton-metrics", help="with --address: Triton's metrics URL (http://HOST:8002/metrics)")
    parser.add_argument("--triton-grpc", help="with --address: Triton's gRPC address (HOST:8001), for the floor")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16], help="levels: concurrent sessions")
    parser.add_argument(
        "--modes", nargs="+", type=str.upper, choices=[m.name for m in Chunking], default=[m.name for m in MODES]
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level (each: every mode in turn)")
    parser.add_argument("--max-tokens", type=int, default=64, dest="max_tokens")
    parser.add_argument("--barge-in-after-ms", type=float, default=100.0, help="barge in this long after first audio")
    parser.add_argument("--barge-in-max-tokens", type=int, default=256, help="max tokens of a barge-in session")
    parser.add_argument(
        "--in-gateway",
        nargs="*",
        default=[],
        choices=["preprocess", "postprocess"],
        help="stages run in the gateway's process (the mesh started here)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.address and (args.triton_metrics or args.triton_grpc):
        parser.error("--triton-metrics and --triton-grpc go with --address (the mesh started here has its own)")
    if not EspeakNg().available():
        parser.error("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    if args.address and not args.triton_metrics:
        print("barge-in to engine stop: skipped (--address without --triton-metrics)", file=sys.stderr)
    if args.address and not args.triton_grpc and 1 in args.sessions:
        print("model floor: skipped (--address without --triton-grpc)", file=sys.stderr)
    plan = Plan(
        levels=tuple(dict.fromkeys(args.sessions)),
        modes=tuple(Chunking[m] for m in dict.fromkeys(args.modes)),
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        barge_in_after=args.barge_in_after_ms / 1000,
        barge_in_max_tokens=args.barge_in_max_tokens,
        triton_model=load_registry(tokenizers=False).default.triton_model,
    )
    started = time.monotonic()
    with _mesh(args, RESULTS.parent / "tmp" / "voice_bench" / "logs") as endpoints:
        levels = asyncio.run(_bench(endpoints, plan))
    targets = _targets(levels)
    report = {
        "command": shlex.join(["python", "-m", "loadtest.voice_bench", *(sys.argv[1:] if argv is None else argv)]),
        "mesh": endpoints.mesh,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "wall_seconds": round(time.monotonic() - started, 1),
        "settings": {
            "max_tokens": plan.max_tokens,
            "barge_in_after_first_audio_ms": args.barge_in_after_ms,
            "barge_in_max_tokens": plan.barge_in_max_tokens,
            "metrics_poll_interval_ms": POLL_INTERVAL * 1000,
            "floor_slack_ms": FLOOR_SLACK * 1000,
        },
        "levels": levels,
        "targets": targets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(levels))
    print("\n" + "\n".join(_target_lines(targets)))
    print(f"\n{report['command']}: {report['wall_seconds']} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
