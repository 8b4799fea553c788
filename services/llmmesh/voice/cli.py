"""`llmmesh speak "question"`: the reference voice front end on the command line.

Prints the answer as it arrives and speaks it at the pace of a listener (played live with `aplay` when
this machine has a sound device), writes what was heard to a WAV file, then reports time to first token,
first speakable chunk and first audio. Ctrl-C, or `--interrupt-after SECONDS`, barges in and prints what
the listener heard. `--fast` skips the real-time pacing (heard then means synthesized).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from llmmesh.client import AsyncClient, Chunking, Credentials, MeshError, TlsConfig
from llmmesh.voice.frontend import SpokenChunk, VoiceFrontEnd, VoiceRun
from llmmesh.voice.tts import EspeakNg, SynthesisError

__all__ = ["add_speak_command", "format_report"]


def add_speak_command(sub: Any) -> None:
    """Adds `speak` to the `llmmesh` command's subparsers."""
    speak = sub.add_parser("speak", help="ask a running mesh and speak the answer with eSpeak NG (voice front end)")
    speak.add_argument("prompt")
    speak.add_argument("--address", default="127.0.0.1:50051", help="the gateway")
    speak.add_argument("--wav", default="llmmesh-speak.wav", help="where to write the audio that was heard")
    speak.add_argument("--interrupt-after", type=float, dest="interrupt_after", help="barge in after SECONDS")
    speak.add_argument("--chunking", choices=["clause", "sentence", "token"], default="clause")
    speak.add_argument("--max-tokens", type=int, dest="max_tokens", default=128)
    speak.add_argument("--temperature", type=float, default=0.0)
    speak.add_argument("--seed", type=int)
    speak.add_argument("--model", default="")
    speak.add_argument("--voice", default="en", help="eSpeak NG voice, e.g. en-us, de, fr")
    speak.add_argument("--speed", type=int, default=175, help="words per minute")
    speak.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    speak.add_argument("--no-play", action="store_true", help="do not play live even if a sound device exists")
    speak.add_argument(
        "--fast", action="store_true", help="no real-time pacing: write the WAV as fast as synthesis goes"
    )
    speak.add_argument("--tls-ca", help="PEM file of the CA that signed the gateway's certificate (turns TLS on)")
    speak.add_argument(
        "--api-key-env", default="LLMMESH_API_KEY", help="environment variable holding an API key to send, if set"
    )
    speak.set_defaults(func=run_speak)


def run_speak(args: argparse.Namespace) -> int:
    tts = EspeakNg(voice=args.voice, words_per_minute=args.speed)
    if not tts.available():
        print("error: espeak-ng is not installed (Debian: apt-get install espeak-ng)", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(_speak(args, tts))
    except MeshError as exc:
        print(f"\nerror: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except SynthesisError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stdout)
    if run.interrupted_at is not None:
        print(f"heard: {run.heard_text!r}")
    print(format_report(run), file=sys.stderr)
    return 0


async def _speak(args: argparse.Namespace, tts: EspeakNg) -> VoiceRun:
    api_key = os.environ.get(args.api_key_env) or None
    client = AsyncClient(
        args.address,
        tls=TlsConfig.from_files(ca=args.tls_ca) if args.tls_ca else None,
        credentials=Credentials(api_key=api_key) if api_key else None,
        timeout=args.timeout,
    )
    barge_in = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        barge_in.set()
        # A second Ctrl-C then ends the process the usual way.
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, on_sigint)

    def show(chunk: SpokenChunk) -> None:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()

    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.model:
        params["model"] = args.model
    try:
        async with client:
            front_end = VoiceFrontEnd(
                client, tts, Chunking[args.chunking.upper()], realtime=not args.fast, live_playback=not args.no_play
            )
            return await front_end.speak(
                args.prompt,
                wav_path=Path(args.wav),
                interrupt=barge_in,
                interrupt_after=args.interrupt_after,
                on_chunk=show,
                **params,
            )
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def format_report(run: VoiceRun) -> str:
    lines = []
    if run.interrupted_at is not None:
        lines.append(
            f"[interrupted after {_ms(run.interrupted_at - run.started_at)}] heard {run.heard_chunks} of "
            f"{len(run.chunks)} chunks received"
            + (
                f"; the mesh acknowledged {run.ack.delivered_chunks} chunks delivered"
                + ("" if run.ack.acknowledged else " (the answer had already completed)")
                if run.ack
                else ""
            )
        )
    elif run.final is not None:
        f = run.final
        lines.append(f"[{f.finish_reason.name.lower()}] {len(run.chunks)} chunks, {f.usage.completion_tokens} tokens")
    lines.append(
        f"time to first token {_ms(run.time_to_first_token)}, first speakable chunk "
        f"{_ms(run.time_to_first_speakable_chunk)}, first audio {_ms(run.time_to_first_audio)}"
    )
    if run.final is not None:
        t = run.final.timings
        lines.append(
            f"mesh: first token {t.time_to_first_token_ms:.0f} ms, first speakable chunk "
            f"{t.time_to_first_speakable_chunk_ms:.0f} ms, total {t.total_ms:.0f} ms"
        )
    if run.wav_path is not None:
        lines.append(f"{run.audio_seconds:.1f} s of audio heard -> {run.wav_path}")
    return "\n".join(lines)
