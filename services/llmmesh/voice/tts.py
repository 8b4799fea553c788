"""Text to speech with eSpeak NG, one subprocess per chunk, read as it streams.

eSpeak NG (Debian package `espeak-ng`) is small, offline and fast (~25 ms for a sentence here). A
process per chunk lets chunks be synthesized while the model is still generating the next ones, and a
chunk's synthesis can be dropped at once on barge-in by killing its process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass, field

from llmmesh.voice.audio import AudioFormat, parse_wav_header

__all__ = ["EspeakNg", "Speech", "SynthesisError"]


class SynthesisError(RuntimeError):
    """The speech synthesizer is missing or failed."""


@dataclass(slots=True)
class Speech:
    """A chunk's audio, with `time.monotonic()` stamps: process start, first PCM bytes, all audio read."""

    fmt: AudioFormat
    pcm: bytes = field(repr=False)
    started_at: float
    first_audio_at: float | None
    ready_at: float

    @property
    def duration(self) -> float:
        return self.fmt.duration(len(self.pcm))


@dataclass(frozen=True)
class EspeakNg:
    """`espeak-ng --stdout`: 16-bit mono PCM at 22,050 Hz in a WAV stream."""

    binary: str = "espeak-ng"
    voice: str = "en"
    words_per_minute: int = 175

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    async def synthesize(self, text: str) -> Speech:
        """Speaks `text` into memory; cancelling the task kills the process (dropped synthesis)."""
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary,
                "--stdout",
                "-v",
                self.voice,
                "-s",
                str(self.words_per_minute),
                # Text goes through stdin: a chunk that starts with "-" is then never read as an option.
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            raise SynthesisError(f"{self.binary} not found: install the Debian package espeak-ng") from exc
        try:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            proc.stdin.write(text.encode())
            await proc.stdin.drain()
            proc.stdin.close()
            buf = bytearray()
            header: tuple[AudioFormat, int] | None = None
            first_audio_at: float | None = None
            while piece := await proc.stdout.read(1 << 16):
                buf += piece
                if header is None:
                    header = parse_wav_header(bytes(buf))
                if header is not None and first_audio_at is None and len(buf) > header[1]:
                    first_audio_at = time.monotonic()
            stderr = await proc.stderr.read()
            if await proc.wait() != 0 or header is None:
                raise SynthesisError(
                    f"{self.binary} failed ({proc.returncode}): {stderr.decode(errors='replace')[:200]}"
                )
            fmt, offset = header
            return Speech(fmt, bytes(buf[offset:]), started, first_audio_at, time.monotonic())
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                # Reaps it even when this task is being cancelled, so no zombie is left behind.
                await asyncio.shield(proc.wait())
