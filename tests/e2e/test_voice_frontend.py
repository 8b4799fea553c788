"""The voice front end end to end: the real mesh, the real model, real eSpeak NG speech."""

from __future__ import annotations

import asyncio
import shutil
import time
import wave
from pathlib import Path

import pytest

from llmmesh.cli import main
from llmmesh.client import AsyncClient, Chunking, FinishReason
from llmmesh.launcher import Mesh
from llmmesh.voice import EspeakNg, VoiceFrontEnd

from .conftest import model_counters, settled_counters

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (Debian package espeak-ng)"),
]


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == 22050
        return w.getnframes() / w.getframerate()


def _counters_after_a_cancel(mesh: Mesh, cancelled_before: float, wait: float = 5.0) -> dict[str, float]:
    """The model's counters once it has counted one more cancelled request (or after `wait` seconds)."""
    deadline = time.monotonic() + wait
    while (counters := model_counters(mesh))["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    return counters


async def test_spoken_answer_is_a_valid_wav_that_grows_with_the_answer_and_speech_starts_early(
    mesh: Mesh, tmp_path: Path
) -> None:
    """A short and a long answer: both WAVs are valid, the longer lasts longer, and the long answer's first
    chunk was synthesized before its generation ended."""
    async with AsyncClient(mesh.address("gateway")) as client:
        front_end = VoiceFrontEnd(client, realtime=False)
        short = await front_end.speak(
            "What is the capital of France?", wav_path=tmp_path / "short.wav", max_tokens=12, temperature=0.0
        )
        long = await front_end.speak(
            # max_tokens 121, not test_voice.py's 120: this must be a real generation, not a cache replay
            # of that identical request (a replay ends before the first chunk is spoken).
            "Describe Paris in a few sentences.",
            wav_path=tmp_path / "long.wav",
            max_tokens=121,
            temperature=0.0,
        )
    assert long.final is not None and long.final.reuse == "none"
    for run in (short, long):
        assert run.final is not None and run.heard_text == run.text and run.text.strip()
        assert run.wav_path is not None and run.wav_path.stat().st_size > 44
        assert _wav_seconds(run.wav_path) == pytest.approx(run.audio_seconds, abs=0.01) and run.audio_seconds > 0.3
    assert len(long.text) > 2 * len(short.text) and long.audio_seconds > 2 * short.audio_seconds
    assert long.final is not None and long.final.usage.completion_tokens > 40
    first = long.chunks[0]
    assert first.ready_at is not None and long.generation_ended_at is not None
    assert first.received_at < first.ready_at < long.generation_ended_at, "no speech before the generation ended"
    ttft, ttfsc, ttfa = long.time_to_first_token, long.time_to_first_speakable_chunk, long.time_to_first_audio
    assert ttft is not None and ttfsc is not None and ttfa is not None and 0 < ttft <= ttfsc < ttfa


async def test_barge_in_stops_the_triton_generation_and_reports_a_prefix_of_the_answer_as_heard(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Interrupted after the first chunk has been played: Triton's request is cancelled, the heard text is
    the played chunk, a prefix of the full (greedy) answer, and the WAV holds only that."""
    prompt, params = "Write a long story about a dragon.", {"max_tokens": 800, "temperature": 0.0}
    before = settled_counters(mesh)
    async with AsyncClient(mesh.address("gateway")) as client:
        # Fast speech so the first clause has finished playing long before 800 tokens are generated.
        front_end = VoiceFrontEnd(client, EspeakNg(words_per_minute=450), realtime=True, live_playback=False)
        run = await front_end.speak(prompt, wav_path=tmp_path / "heard.wav", interrupt_after_heard=1, **params)
        assert run.ack is not None and run.ack.acknowledged, "the answer completed before the barge-in"
        after = await asyncio.to_thread(_counters_after_a_cancel, mesh, before["cancelled"])
        assert after["cancelled"] == before["cancelled"] + 1, "the model saw no cancel"
        assert after["tokens"] - before["tokens"] < 800
        full = await client.complete(prompt, chunking=Chunking.CLAUSE, **params)  # type: ignore[arg-type]
    assert full.final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert run.heard_chunks >= 1 and run.heard_text.strip()
    assert run.ack.delivered_text.startswith(run.heard_text) and full.text.startswith(run.ack.delivered_text)
    assert len(run.heard_text) < len(full.text)
    assert [c.dropped for c in run.chunks[: run.heard_chunks]] == [False] * run.heard_chunks
    assert run.audio_seconds > 0
    assert _wav_seconds(tmp_path / "heard.wav") == pytest.approx(run.audio_seconds, abs=0.01)


def test_llmmesh_speak_writes_the_wav_and_reports_time_to_first_audio(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llmmesh speak` prints the answer, writes the WAV and reports the three latencies."""
    wav = tmp_path / "cli.wav"
    args = ["speak", "What is the capital of France?", "--address", mesh.address("gateway"), "--wav", str(wav)]
    code = main([*args, "--max-tokens", "16", "--fast"])
    out, err = capsys.readouterr()
    assert code == 0 and "Paris" in out
    assert "time to first token" in err and "first speakable chunk" in err and "first audio" in err
    assert _wav_seconds(wav) > 0.3
