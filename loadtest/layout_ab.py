"""Two gateways side by side on one mesh: the listener's wait over the model's floor, at one session.

    .venv/bin/python -m loadtest.layout_ab --b-in-gateway preprocess,postprocess --blocks 8 --rounds 4 --name NAME
    .venv/bin/python -m loadtest.layout_ab --b-env LLMMESH_GATEWAY_HOP_ORDER=gateway --name NAME
    .venv/bin/python -m loadtest.layout_ab --name NAME                     # A/A: two plain gateways
                                                                           → results/NAME.json

What a policy file cannot switch (loadtest.policy_ab) but a gateway's own settings can: which stages run in
the gateway's process, the hop order. One mesh (Triton with the shipped models and the classifier, the four
services, dedup off): its gateway is A; a second gateway process on the same infer and Triton is B, with the
stages named by `--b-in-gateway` in its own process (read from the same LLMMESH_PREPROCESS_* and
LLMMESH_POSTPROCESS_* settings as the mesh's stages) and `--b-env` over the mesh's environment. Block by
block, A then B, then B then A, ... (each block `--rounds` rounds of `python -m loadtest.voice_bench
--sessions 1 --modes CLAUSE` against that gateway, with the model floor), every answer's first speakable
chunk minus its own floor pooled per gateway, as policy_ab does. Only one gateway is driven at a time; the
other idles beside it. Without `--b-in-gateway` and `--b-env`, B is a second plain gateway: an A/A run
that shows the spread between two gateway processes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from llmmesh.launcher import Mesh, MeshPorts, free_port
from loadtest.policy_ab import RESULTS, arm_order, voice_block, write_result

STAGES = ("preprocess", "postprocess")


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"not a stage the gateway can hold: {', '.join(unknown)}")
    return names


def b_environment(in_gateway: tuple[str, ...], extra: list[tuple[str, str]]) -> dict[str, str]:
    """Gateway B's settings over the mesh's: each stage in `in_gateway` in its own process, then `extra`."""
    env = {f"LLMMESH_GATEWAY_{stage.upper()}_URL": "inprocess" for stage in in_gateway}
    env.update(extra)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.layout_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--b-in-gateway", type=_stages, default=(), help="stages in gateway B's process")
    parser.add_argument("--b-env", type=_env_pair, action="append", default=[], help="KEY=VALUE for gateway B")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per gateway")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per block")
    parser.add_argument("--name", required=True, help="results/NAME.json")
    args = parser.parse_args(argv)
    b_env = b_environment(args.b_in_gateway, args.b_env)
    work = Path(tempfile.mkdtemp(prefix="layout-ab-"))
    pooled: dict[str, list[list[float]]] = {"A": [], "B": []}
    started = time.time()
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=RESULTS / "tmp" / "layout_ab" / "logs",
        env={"LLMMESH_INFER_DEDUP": "false"},
    )
    mesh.start()
    try:
        assert mesh.triton is not None
        b_port = free_port()
        mesh.start_replica("gateway", b_port, timeout=120.0, env=b_env)
        address = {"A": mesh.address("gateway"), "B": f"{mesh.host}:{b_port}"}
        for block in range(args.blocks):
            for label in arm_order(block):
                out = work / f"{block}-{label}.json"
                pooled[label].append(voice_block(address[label], mesh.triton.grpc_url, args.rounds, out))
    finally:
        mesh.stop()
        shutil.rmtree(work, ignore_errors=True)
    arms = {
        "gateways": {
            "A": "the mesh's gateway (four services)",
            "B": {"in_gateway": list(args.b_in_gateway), "env": b_env},
        }
    }
    write_result(
        args.name,
        "python -m loadtest.layout_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        started,
        arms,
        pooled,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
