"""What a Python gRPC hop costs at its least: the floor under the mesh's added first-token time.

    .venv/bin/python -m loadtest.hop_floor        → results/hop_floor.json

A chain of processes, each nothing but a `grpc.aio` server on uvloop that forwards a streaming call to the
next process (requests one way, responses back; raw bytes: no protobuf, no interceptors, no tracing, no
safety, no routing), ending at an origin that answers a call's first message with one message at once. One
call at a time (as the benchmark's c=1), the number of relays in front of the origin alternating round by
round (0 to 4): the time from opening the call to its first response, per chain length, and the cost of one
relay as the slope of the medians. A relay is the least any stage process in the request's way can do, so
N stage processes in the way cost at least N × that slope, on top of what a client calling Triton directly
waits (the benchmark's `direct`). The mesh's request passes at least three (gateway, preprocess, infer on
the way in; infer, postprocess, gateway on the way out), four as it stands.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvloop

from llmmesh.launcher import free_ports

RESULTS = Path(__file__).parent / "results" / "hop_floor.json"
METHOD = "/floor.Relay/Stream"
RELAYS = (0, 1, 2, 3, 4)


def _handler(forward: grpc.aio.Channel | None) -> grpc.GenericRpcHandler:
    async def origin(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        assert forward is not None
        async for response in forward.stream_stream(METHOD)(requests):
            yield response

    behaviour = origin if forward is None else relay
    return grpc.method_handlers_generic_handler(
        "floor.Relay", {"Stream": grpc.stream_stream_rpc_method_handler(behaviour)}
    )


async def _serve(port: int, forward: str | None) -> None:
    channel = grpc.aio.insecure_channel(forward) if forward else None
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(channel),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _new_call(channel: grpc.aio.Channel, _: Any) -> float:
    """A request as a call of its own (the client's call to the gateway, infer's to Triton)."""
    started = time.perf_counter()
    call = channel.stream_stream(METHOD)(iter((b"token",)))
    assert await call.read() == b"token"  # the origin's echo came back through every relay
    first = time.perf_counter()
    assert await call.read() is grpc.aio.EOF
    return (first - started) * 1000


async def _on_open_call(_: grpc.aio.Channel, call: Any) -> float:
    """A request as a message on a call already open (the stages' multiplexed calls)."""
    started = time.perf_counter()
    await call.write(b"token")
    assert await call.read() == b"token"
    return (time.perf_counter() - started) * 1000


def _slope(xs: list[int], ys: list[float]) -> float:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


MODES = {"a call per request": _new_call, "a message on an open call": _on_open_call}


async def _measure(addresses: list[str], rounds: int) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    open_calls = [channel.stream_stream(METHOD)() for channel in channels]
    times = {(mode, n): [] for mode in MODES for n in RELAYS}
    try:
        for i in range(20 + rounds):  # the first 20 rounds connect and warm every chain
            order = [(mode, n) for mode in MODES for n in RELAYS]
            for mode, n in order if i % 2 else reversed(order):
                took = await MODES[mode](channels[n], open_calls[n])
                if i >= 20:
                    times[mode, n].append(took)
    finally:
        for call in open_calls:
            await call.done_writing()
        for channel in channels:
            await channel.close()
    out: dict[str, Any] = {}
    for mode in MODES:
        medians = [statistics.median(times[mode, n]) for n in RELAYS]
        out[mode] = {
            "first_response_ms": {
                f"{n} relays": {
                    "p50": round(medians[n], 3),
                    "p90": round(statistics.quantiles(times[mode, n], n=10)[-1], 3),
                }
                for n in RELAYS
            },
            "per_relay_ms": round(_slope(list(RELAYS), medians), 3),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hop_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # a process of the chain: its port
    parser.add_argument("--forward", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        uvloop.run(_serve(args.serve, args.forward))
        return
    ports = free_ports(len(RELAYS))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for n, port in enumerate(ports):
            forward = ["--forward", f"127.0.0.1:{ports[n - 1]}"] if n else []
            processes.append(
                subprocess.Popen([sys.executable, "-m", "loadtest.hop_floor", "--serve", str(port), *forward])
            )
        time.sleep(2.0)
        started = time.time()
        measured = uvloop.run(_measure([f"127.0.0.1:{port}" for port in ports], args.rounds))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
    result = {
        "command": "python -m loadtest.hop_floor" + (f" --rounds {args.rounds}" if args.rounds != 400 else ""),
        "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "rounds": args.rounds,
        "grpcio": grpc.__version__,
        **measured,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
