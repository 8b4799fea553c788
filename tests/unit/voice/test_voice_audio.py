"""The voice front end's audio helpers (they live in llmmesh.voice; tested here beside the client)."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import pytest

from llmmesh.voice.audio import AudioFormat, parse_wav_header, write_wav
from llmmesh.voice.frontend import SpokenChunk, VoiceRun
from llmmesh.voice.tts import Speech

FMT = AudioFormat(22050, 1, 2)


def _streamed_header() -> bytes:
    # What espeak-ng writes to a pipe: placeholder sizes, since it cannot know the length up front.
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 44100, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 0x7FFFF024)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", 0x7FFFF000)
    )


def test_a_streamed_header_gives_the_format_and_the_data_offset() -> None:
    """The placeholder sizes are ignored; data starts right after the header."""
    assert parse_wav_header(_streamed_header() + b"\x00\x01") == (FMT, 44)


def test_a_partial_header_asks_for_more_bytes_and_garbage_is_refused() -> None:
    """Until the data chunk's header is complete the parser returns None; a non-WAV stream raises."""
    header = _streamed_header()
    for n in (0, 11, 20, 40):
        assert parse_wav_header(header[:n]) is None
    with pytest.raises(ValueError):
        parse_wav_header(b"ID3\x00" * 4)


def test_write_wav_concatenates_pieces_and_returns_the_duration(tmp_path: Path) -> None:
    """Pieces are written back to back; the file's duration is their total."""
    path = tmp_path / "out.wav"
    seconds = write_wav(path, FMT, [b"\x00\x00" * 22050, b"\x00\x00" * 11025])
    assert seconds == 1.5
    with wave.open(str(path)) as w:
        assert w.getnframes() == 33075 and w.getframerate() == 22050


def _chunk(i: int, play_end: float | None) -> SpokenChunk:
    speech = Speech(FMT, b"\x00\x00" * 2205, 0.0, 0.1, 0.2) if play_end is not None else None
    return SpokenChunk(i, f"c{i} ", float(i), True, speech, play_end=play_end)


def test_heard_is_the_prefix_of_chunks_that_finished_playing() -> None:
    """Chunks play in order: one whose playback has not ended, or that waits for audio, ends what was heard."""
    run = VoiceRun(started_at=0.0, chunks=[_chunk(0, 1.0), _chunk(1, 2.5), _chunk(2, None), _chunk(3, 3.0)])
    assert [run.heard_at(t) for t in (0.5, 1.0, 2.0, 2.5, 10.0)] == [0, 1, 1, 2, 2]
    run.heard_chunks = run.heard_at(2.6)
    assert run.heard_text == "c0 c1 " and run.text.startswith(run.heard_text)
    assert run.time_to_first_token == 0.0 and run.time_to_first_audio == 0.1
