"""PCM audio: reading espeak-ng's streamed WAV header, writing one WAV file, playing live where a device exists."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AudioFormat", "LivePlayer", "parse_wav_header", "sound_device_present", "write_wav"]


@dataclass(frozen=True, slots=True)
class AudioFormat:
    sample_rate: int
    channels: int
    sample_width: int  # bytes per sample

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * self.sample_width

    def duration(self, n_bytes: int) -> float:
        return n_bytes / self.bytes_per_second


def parse_wav_header(buf: bytes) -> tuple[AudioFormat, int] | None:
    """The format and the offset of the first PCM byte, or None while `buf` does not hold the header yet.

    espeak-ng writing to a pipe cannot know its length up front, so its RIFF and data sizes are
    placeholders (0x7ffff000...): the sizes are ignored and the data runs to the end of the stream.
    """
    if len(buf) < 12:
        return None
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos = 12
    fmt: AudioFormat | None = None
    while len(buf) >= pos + 8:
        chunk_id, size = buf[pos : pos + 4], struct.unpack_from("<I", buf, pos + 4)[0]
        body = pos + 8
        if chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAVE data before its fmt chunk")
            return fmt, body
        if len(buf) < body + size:
            return None
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", buf, body)
            if tag != 1:
                raise ValueError(f"not PCM (format tag {tag})")
            fmt = AudioFormat(rate, channels, bits // 8)
        pos = body + size + (size & 1)
    return None


def write_wav(path: Path, fmt: AudioFormat, pieces: Iterable[bytes]) -> float:
    """Writes the pieces back to back as one WAV file; returns its duration in seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with wave.open(str(path), "wb") as out:
        out.setnchannels(fmt.channels)
        out.setsampwidth(fmt.sample_width)
        out.setframerate(fmt.sample_rate)
        for piece in pieces:
            out.writeframes(piece)
            n += len(piece)
    return fmt.duration(n)


def sound_device_present() -> bool:
    """True when ALSA shows a playback device and `aplay` is installed (servers and CI have neither)."""
    snd = Path("/dev/snd")
    return shutil.which("aplay") is not None and snd.is_dir() and any(p.name.startswith("pcm") for p in snd.iterdir())


class LivePlayer:
    """Streams PCM to `aplay` as chunks come due, so the listener hears them while the rest is generated."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def open(cls, fmt: AudioFormat) -> LivePlayer | None:
        """A player on the default ALSA device, or None when this machine has no sound device."""
        if not sound_device_present() or fmt.sample_width != 2:
            return None
        proc = await asyncio.create_subprocess_exec(
            "aplay", "-q", "-t", "raw", "-f", "S16_LE", "-r", str(fmt.sample_rate), "-c", str(fmt.channels), "-",
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return cls(proc)

    def write(self, pcm: bytes) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.write(pcm)

    async def close(self, *, stop_now: bool) -> None:
        """Lets what was written finish playing, or (barge-in) silences it at once."""
        if stop_now and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        elif self._proc.stdin is not None:
            self._proc.stdin.close()
        await self._proc.wait()
