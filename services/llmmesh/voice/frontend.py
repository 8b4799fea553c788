"""The reference voice front end: clause chunks from `Converse`, spoken by eSpeak NG as they arrive.

Every chunk is handed to the synthesizer the moment it arrives (one espeak-ng process each), so the first
clause is spoken while the model still generates the rest. Audio goes out in order on a playback clock:

    chunk i starts playing at max(its audio is synthesized, chunk i-1 has finished playing)
    and plays for its audio's duration (real time), or for no time at all with `realtime=False`.

What the listener heard, at chunk granularity:

    a chunk is heard when it had finished playing before the interrupt.

With `realtime=True` (a listener at a speaker; `aplay` plays along when a sound device exists) a chunk
cut off mid-way is not counted: the heard text never claims words the listener may have missed. With
`realtime=False` (a file as fast as synthesis goes: benchmarks, scripted runs) playing takes no time,
so heard means synthesized, in order. Either way the heard text is a prefix of the delivered text (chunks
play in order), which is a prefix of the full answer. Without an interrupt every chunk is heard. The WAV
file holds exactly the heard chunks. Timestamps are `time.monotonic()`, measured from `started_at`,
taken before the call opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

from llmmesh.client import AsyncClient, Chunking, FinalResult, Interrupted
from llmmesh.client.request import RequestParams
from llmmesh.voice.audio import AudioFormat, LivePlayer, write_wav
from llmmesh.voice.tts import EspeakNg, Speech, SynthesisError

__all__ = ["SpokenChunk", "VoiceFrontEnd", "VoiceRun"]

# eSpeak NG's output format; used for chunks with no audio of their own.
_FORMAT = AudioFormat(22050, 1, 2)


@dataclass(slots=True)
class SpokenChunk:
    index: int
    text: str
    received_at: float
    speakable: bool
    speech: Speech | None = None
    # On the playback clock; set once this chunk and every one before it are synthesized.
    play_start: float | None = None
    play_end: float | None = None
    # Set when its synthesis or playback was dropped by an interrupt.
    dropped: bool = False

    @property
    def ready_at(self) -> float | None:
        return self.speech.ready_at if self.speech else None


@dataclass
class VoiceRun:
    """One spoken answer: its chunks with their timestamps, what was heard, and the latencies."""

    started_at: float
    realtime: bool = False
    chunks: list[SpokenChunk] = field(default_factory=list)
    final: FinalResult | None = None
    # The mesh's answer to an interrupt (None when the answer was not interrupted).
    ack: Interrupted | None = None
    interrupted_at: float | None = None
    # When the stream ended (final message, or the interrupt's acknowledgement): the generation was over.
    generation_ended_at: float | None = None
    heard_chunks: int = 0
    audio_seconds: float = 0.0
    wav_path: Path | None = None

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def heard_text(self) -> str:
        return "".join(c.text for c in self.chunks[: self.heard_chunks])

    def _since_start(self, at: float | None) -> float | None:
        return None if at is None else at - self.started_at

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds until the first chunk with text arrived."""
        return self._since_start(next((c.received_at for c in self.chunks if c.text), None))

    @property
    def time_to_first_speakable_chunk(self) -> float | None:
        return self._since_start(next((c.received_at for c in self.chunks if c.text and c.speakable), None))

    @property
    def time_to_first_audio(self) -> float | None:
        """Seconds until the first synthesized audio of the first chunk that has any was ready."""
        for c in self.chunks:
            if c.speech is not None and c.speech.pcm:
                return self._since_start(c.speech.first_audio_at or c.speech.ready_at)
        return None

    def heard_at(self, at: float) -> int:
        """How many chunks had finished playing at `at` (they play in order, so this is a prefix)."""
        n = 0
        for c in self.chunks:
            if c.play_end is None or c.play_end > at:
                break
            n += 1
        return n


class VoiceFrontEnd:
    """Speaks answers from the mesh: one `Converse` turn per `speak()` call."""

    def __init__(
        self,
        client: AsyncClient,
        synthesizer: EspeakNg | None = None,
        chunking: Chunking = Chunking.CLAUSE,
        *,
        realtime: bool = True,
        live_playback: bool = True,
        max_parallel_synthesis: int = 4,
    ) -> None:
        self._client = client
        self._tts = synthesizer or EspeakNg()
        self._chunking = chunking
        self._realtime = realtime
        # Live playback needs real-time pacing and a sound device (never required).
        self._live_playback = live_playback and realtime
        # Bounds concurrent espeak-ng processes (TOKEN chunking would otherwise start one per token at once).
        self._synth_slots = asyncio.Semaphore(max_parallel_synthesis)

    async def speak(
        self,
        prompt: str,
        *,
        wav_path: Path | None = None,
        interrupt: asyncio.Event | None = None,
        interrupt_after: float | None = None,
        interrupt_after_heard: int | None = None,
        on_chunk: Callable[[SpokenChunk], None] | None = None,
        timeout: float | None = None,
        **params: Unpack[RequestParams],
    ) -> VoiceRun:
        """Asks, speaks, and returns the run.

        Barge-in: when `interrupt` is set, `interrupt_after` seconds have passed, or `interrupt_after_heard`
        chunks have been heard, the generation stops (Converse interrupt) and pending synthesis is dropped.
        """
        run = VoiceRun(started_at=time.monotonic(), realtime=self._realtime)
        loop = asyncio.get_running_loop()
        barge_in = interrupt or asyncio.Event()
        timers = [loop.call_later(interrupt_after, barge_in.set)] if interrupt_after is not None else []
        synth: list[asyncio.Task[None]] = []
        player = await LivePlayer.open(_FORMAT) if self._live_playback else None
        scheduled = 0

        def schedule() -> None:
            # Puts newly synthesized chunks on the playback clock, in order.
            nonlocal scheduled
            while scheduled < len(run.chunks) and (speech := run.chunks[scheduled].speech) is not None:
                chunk = run.chunks[scheduled]
                previous_end = run.chunks[scheduled - 1].play_end if scheduled else None
                chunk.play_start = max(speech.ready_at, previous_end or 0.0)
                chunk.play_end = chunk.play_start + (speech.duration if self._realtime else 0.0)
                if player is not None:
                    player.write(speech.pcm)
                scheduled += 1
                if interrupt_after_heard is not None and scheduled == interrupt_after_heard:
                    timers.append(loop.call_later(max(0.0, chunk.play_end - time.monotonic()), barge_in.set))

        async def synthesize(chunk: SpokenChunk) -> None:
            async with self._synth_slots:
                if barge_in.is_set():
                    return
                speech = await self._tts.synthesize(chunk.text)
            if speech.fmt != _FORMAT:
                # One WAV file and one player stream: every chunk must share the format.
                raise SynthesisError(f"unexpected audio format {speech.fmt}")
            chunk.speech = speech
            schedule()

        session = self._client.converse(timeout=timeout)
        params.setdefault("chunking", self._chunking)
        try:
            await session.send(prompt, **params)

            async def receive() -> None:
                async for item in session:
                    chunk = SpokenChunk(len(run.chunks), item.text, item.received_at, item.speakable)
                    run.chunks.append(chunk)
                    if on_chunk is not None:
                        on_chunk(chunk)
                    if barge_in.is_set():
                        continue
                    if item.text.strip():
                        synth.append(asyncio.create_task(synthesize(chunk)))
                    else:
                        # Nothing to say (whitespace): "spoken" at once, in its place.
                        chunk.speech = Speech(_FORMAT, b"", item.received_at, None, item.received_at)
                        schedule()
                run.final = session.final
                run.generation_ended_at = time.monotonic()

            receiving = asyncio.create_task(receive())
            await _first_of(receiving, barge_in)
            if barge_in.is_set() and not receiving.done():
                await self._barge_in(run, synth)
                run.ack = await session.interrupt()
                await receiving
            else:
                await receiving  # raises what the stream raised
                speaking = asyncio.gather(*synth)
                await _first_of(speaking, barge_in)
                if not barge_in.is_set():
                    await speaking
                    # A listener at a speaker can still barge in while the rest of the answer plays.
                    last_end = run.chunks[-1].play_end if run.chunks else None
                    if last_end is not None and last_end > time.monotonic():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(barge_in.wait(), last_end - time.monotonic())
                if barge_in.is_set():
                    await self._barge_in(run, synth)
                    run.ack = await session.interrupt()  # not acknowledged: the answer had completed
            if run.interrupted_at is None:
                run.heard_chunks = len(run.chunks)
        finally:
            for timer in timers:
                timer.cancel()
            for task in synth:
                task.cancel()
            await asyncio.gather(*synth, return_exceptions=True)
            await session.close()
            if player is not None:
                await player.close(stop_now=run.interrupted_at is not None)
        heard = [c.speech for c in run.chunks[: run.heard_chunks] if c.speech is not None]
        run.audio_seconds = sum(s.duration for s in heard)
        if wav_path is not None:
            write_wav(wav_path, _FORMAT, (s.pcm for s in heard))
            run.wav_path = wav_path
        return run

    async def _barge_in(self, run: VoiceRun, synth: list[asyncio.Task[None]]) -> None:
        """Freezes what was heard at this instant and drops every synthesis still pending."""
        run.interrupted_at = time.monotonic()
        run.heard_chunks = run.heard_at(run.interrupted_at)
        for chunk in run.chunks[run.heard_chunks :]:
            chunk.dropped = True
        for task in synth:
            task.cancel()
        await asyncio.gather(*synth, return_exceptions=True)


async def _first_of(task: asyncio.Future[Any], event: asyncio.Event) -> None:
    """Waits until `task` is done or `event` is set, whichever comes first."""
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
