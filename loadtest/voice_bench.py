"""What a listener waits for: time to first token, first speakable chunk and first audio, per chunking mode.

    .venv/bin/python -m loadtest.voice_bench --sessions 4 --rounds 3

Starts the real mesh (Triton serving SmolLM2 and the safety classifier, the four services) unless
`--address` names a running gateway. Each round runs `--sessions` concurrent voice sessions (the reference
front end, `llmmesh.voice.VoiceFrontEnd`, over `Converse`, eSpeak NG synthesizing every chunk as it
arrives) for TOKEN, CLAUSE and SENTENCE chunking in turn, so the three modes see the same machine. One
warm-up session per mode is not counted. Every figure is measured by the client from just before the call
opens: first token = first chunk with text, first speakable chunk = first chunk marked speakable, first
audio = first PCM bytes espeak-ng produced for the first chunk. Playback is not paced (`realtime=False`):
pacing changes when audio is heard, not when the first audio is ready. Results go to
loadtest/results/voice_bench.json; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmmesh.client import AsyncClient, Chunking, MeshError
from llmmesh.launcher import Mesh, MeshPorts
from llmmesh.voice import EspeakNg, VoiceFrontEnd, VoiceRun

from .metrics import distribution

RESULTS = Path(__file__).parent / "results" / "voice_bench.json"
PROMPTS = (
    "Describe Paris in a few sentences.",
    "Why is the sky blue? Explain briefly.",
    "Give me three tips for sleeping well.",
    "What is the capital of France, and what is it known for?",
)
MODES = (Chunking.TOKEN, Chunking.CLAUSE, Chunking.SENTENCE)
METRICS = ("time_to_first_token", "time_to_first_speakable_chunk", "time_to_first_audio")


@contextlib.contextmanager
def _gateway(address: str | None, log_dir: Path) -> Iterator[str]:
    if address:
        yield address
        return
    # Dedup off: the rounds repeat greedy prompts, and replays from the result cache would not measure speech.
    mesh = Mesh(ports=MeshPorts.free(), log_dir=log_dir, env={"LLMMESH_INFER_DEDUP": "false"})
    mesh.start()
    try:
        yield mesh.address("gateway")
    finally:
        mesh.stop()


async def _session(front_end: VoiceFrontEnd, prompt: str, max_tokens: int) -> VoiceRun | str:
    try:
        return await front_end.speak(prompt, max_tokens=max_tokens, temperature=0.0, timeout=120)
    except MeshError as exc:
        return exc.code.name


async def _bench(address: str, sessions: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    runs: dict[Chunking, list[VoiceRun]] = {mode: [] for mode in MODES}
    errors: dict[Chunking, list[str]] = {mode: [] for mode in MODES}
    async with AsyncClient(address) as client:
        fronts = {mode: VoiceFrontEnd(client, EspeakNg(), mode, realtime=False) for mode in MODES}
        for mode in MODES:
            await _session(fronts[mode], PROMPTS[0], max_tokens)  # warm-up, not counted
        for r in range(rounds):
            for mode in MODES:
                results = await asyncio.gather(
                    *(_session(fronts[mode], PROMPTS[(r + i) % len(PROMPTS)], max_tokens) for i in range(sessions))
                )
                for result in results:
                    (errors[mode] if isinstance(result, str) else runs[mode]).append(result)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for mode in MODES:
        done = runs[mode]
        entry: dict[str, Any] = {"sessions": len(done), "errors": errors[mode]}
        for metric in METRICS:
            dist = distribution(v for run in done if (v := getattr(run, metric)) is not None)
            entry[f"{metric}_ms"] = dist.as_dict() if dist else None
        dist = distribution(run.final.timings.time_to_first_token_ms / 1000 for run in done if run.final)
        entry["mesh_time_to_first_token_ms"] = dist.as_dict() if dist else None
        entry["chunks_per_answer"] = round(sum(len(run.chunks) for run in done) / max(1, len(done)), 1)
        entry["audio_seconds_per_answer"] = round(sum(run.audio_seconds for run in done) / max(1, len(done)), 2)
        out[mode.name] = entry
    return out


def _table(results: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any], key: str) -> str:
        d = entry[key]
        return "-" if d is None else f"{d['p50']:.0f} / {d['p99']:.0f}"

    lines = [
        "| chunking | sessions | first token p50 / p99 (ms) | first speakable chunk p50 / p99 (ms) "
        "| first audio p50 / p99 (ms) | chunks per answer |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        lines.append(
            f"| {name} | {entry['sessions']} | {cell(entry, 'time_to_first_token_ms')} | "
            f"{cell(entry, 'time_to_first_speakable_chunk_ms')} | {cell(entry, 'time_to_first_audio_ms')} | "
            f"{entry['chunks_per_answer']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.voice_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running gateway; default: start the real mesh on free ports")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent voice sessions per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per chunking mode")
    parser.add_argument("--max-tokens", type=int, default=64, dest="max_tokens")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not EspeakNg().available():
        parser.error("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    started = time.monotonic()
    with _gateway(args.address, RESULTS.parent / "tmp" / "voice_bench" / "logs") as address:
        results = asyncio.run(_bench(address, args.sessions, args.rounds, args.max_tokens))
    report = {
        "command": f"python -m loadtest.voice_bench --sessions {args.sessions} --rounds {args.rounds} "
        f"--max-tokens {args.max_tokens}",
        "mesh": args.address or "started here: Triton (smollm2, safety_classifier) + 4 services",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "wall_seconds": round(time.monotonic() - started, 1),
        "modes": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    print(f"\n{report['command']}: {report['wall_seconds']} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
