"""`llmmesh up` runs the whole mesh on this machine; `llmmesh generate` streams an answer from it;
`llmmesh speak` speaks one (the voice front end in `llmmesh.voice`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["main"]

DEMO_PROMPT = "What is the capital of France? Answer in one sentence, then tell me one fact about it."


def _generate(args: argparse.Namespace) -> int:
    sampling = generation_pb2.SamplingParams(stop=args.stop or [])
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    request = generation_pb2.GenerateRequest(prompt=args.prompt, sampling=sampling, model=args.model or "")
    return stream_answer(args.address, request, args.timeout)


def stream_answer(
    address: str,
    request: generation_pb2.GenerateRequest,
    timeout: float | None,
    cancelled: Callable[[], bool] | None = None,
) -> int:
    """Prints text as it arrives, then a summary line; returns a process exit code.

    With `cancelled`, the call is cancelled once `cancelled()` holds (polled by a thread of its own)."""
    names = generation_pb2.FinishReason.Name
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        call = stub.Generate(request, timeout=timeout)
        if cancelled is not None:
            threading.Thread(target=_cancel_when, args=(call, cancelled), daemon=True).start()
        try:
            for response in call:
                if response.HasField("chunk"):
                    sys.stdout.write(response.chunk.text)
                    sys.stdout.flush()
                else:
                    f = response.final
                    print(
                        f"\n[{names(f.finish_reason).removeprefix('FINISH_REASON_').lower()}"
                        f"{' ' + f.filter_category if f.filter_category else ''}] "
                        f"{f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} completion tokens, "
                        f"first token {f.timings.time_to_first_token_ms:.0f} ms, total {f.timings.total_ms:.0f} ms; "
                        f"model {f.model}, cost {f.usage.cost:.6f}" + (f', route "{f.route}"' if f.route else ""),
                        file=sys.stderr,
                    )
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _cancel_when(call: grpc.Future, cancelled: Callable[[], bool]) -> None:
    while not call.done():
        if cancelled():
            call.cancel()
            return
        time.sleep(0.1)


def layout(in_gateway: list[str], voice: bool) -> tuple[tuple[str, ...], dict[str, str]]:
    """The stages `llmmesh up` runs in the gateway's process and the settings it adds for them. `voice`: the
    voice layout (README.md), both stages in the gateway with the policy policies/voice.yaml (the classifier
    in that process too) unless the environment names a policy of its own."""
    if not voice:
        return tuple(in_gateway), {}
    from llmmesh.common.safety import VOICE_POLICY_PATH

    stages = ("preprocess", "postprocess")
    env = {}
    for stage in stages:
        key = f"LLMMESH_{stage.upper()}_SAFETY_POLICY_PATH"
        env[key] = os.environ.get(key) or str(VOICE_POLICY_PATH)
    return stages, env


def _up(args: argparse.Namespace) -> int:
    from llmmesh.launcher import Mesh, MeshPorts, StartCancelled

    ports = MeshPorts.free() if args.free_ports else MeshPorts.from_gateway(args.port)
    endpoint = args.otlp_endpoint.rstrip("/")
    in_gateway, env = layout(args.in_gateway, args.voice)
    mesh = Mesh(
        ports=ports,
        log_dir=Path(args.log_dir),
        otlp_endpoint=endpoint,
        triton_trace_url=f"{endpoint}/v1/traces" if endpoint else "",
        in_gateway=in_gateway,
        env=env,
    )
    # The handler only records the signal: anything that takes a lock (threading.Event.set) can deadlock
    # when the handler runs inside that lock's owner in the main thread. The loops below poll the record.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    print(f"starting Triton and {', '.join(mesh.services)} (logs in {mesh.log_dir}/) ...", file=sys.stderr)
    started = time.monotonic()
    try:
        mesh.start(cancelled=lambda: bool(received))
    except StartCancelled:
        # Mesh.start stopped what it had started.
        print(f"{signal.Signals(received[0]).name} while starting: stopped everything", file=sys.stderr)
        return 128 + received[0]
    try:
        print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        assert mesh.triton is not None
        print(f"  triton       grpc {mesh.triton.grpc_url}  http {mesh.triton.http_url}", file=sys.stderr)
        for name in in_gateway:
            print(f"  {name:<12} in the gateway's process", file=sys.stderr)
        for name in mesh.services:
            print(
                f"  {name:<12} {mesh.address(name)}  (pid {mesh.procs[name].pid})  metrics {ports.metrics_url(name)}",
                file=sys.stderr,
            )
        print(f"  triton metrics {mesh.triton.metrics_url}", file=sys.stderr)
        if endpoint:
            print(f"traces: OTLP/HTTP to {endpoint} (services and Triton)", file=sys.stderr)
        print(f"gateway (public API): {mesh.address('gateway')}", file=sys.stderr)
        print(f"gateway (OpenAI-compatible HTTP): {mesh.http_url}/v1", file=sys.stderr)
        if args.demo is not None:
            prompt = args.demo or DEMO_PROMPT
            print(f"\ndemo> {prompt}", file=sys.stderr)
            request = generation_pb2.GenerateRequest(
                prompt=prompt, sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=96)
            )
            stream_answer(mesh.address("gateway"), request, timeout=120, cancelled=lambda: bool(received))
        if args.exit_after_demo or received:
            return 0
        print("\nserving; Ctrl-C stops everything", file=sys.stderr)
        # Wake up now and then: a signal delivered to one of grpc's threads only runs its Python
        # handler when the main thread next executes bytecode.
        while not received:
            time.sleep(0.2)
        return 0
    finally:
        codes = mesh.stop()
        print(f"stopped: {codes}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run Triton and the four services on loopback until Ctrl-C")
    up.add_argument("--port", type=int, default=50051, help="gateway port (stages use the next three)")
    up.add_argument("--free-ports", action="store_true", help="pick free ports for everything")
    up.add_argument("--log-dir", default=".llmmesh/logs", help="one log file per process")
    up.add_argument("--demo", nargs="?", const="", default=None, help="stream a demo answer once ready")
    up.add_argument("--exit-after-demo", action="store_true", help="stop everything after the demo")
    up.add_argument(
        "--otlp-endpoint",
        default="",
        help="trace every service and Triton to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318",
    )
    up.add_argument(
        "--in-gateway",
        nargs="+",
        choices=("preprocess", "postprocess"),
        default=[],
        metavar="STAGE",
        help="run these stages (preprocess, postprocess) inside the gateway's process instead of their own",
    )
    up.add_argument(
        "--voice",
        action="store_true",
        help="the voice layout: both stages in the gateway and the safety policy policies/voice.yaml (the "
        "classifier in that process) unless LLMMESH_<STAGE>_SAFETY_POLICY_PATH names another",
    )
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="stream an answer from a running mesh")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051", help="the gateway")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int, dest="max_tokens")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float, dest="top_p")
    gen.add_argument("--top-k", type=int, dest="top_k")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    gen.set_defaults(func=_generate)

    from llmmesh.voice.cli import add_speak_command

    add_speak_command(sub)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
