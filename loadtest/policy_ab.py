"""Two safety policies side by side on one mesh: the listener's wait over the model's floor, at one session.

    .venv/bin/python -m loadtest.policy_ab A.yaml B.yaml --blocks 8 --rounds 4 --name NAME
                                                                  → results/NAME.json

One mesh (Triton with the shipped models and the classifier, the four services, dedup off) whose preprocess
and postprocess read their policy from a file this tool rewrites: block by block, A then B then A... (each
block `--rounds` rounds of `python -m loadtest.voice_bench --sessions 1 --modes CLAUSE` against that mesh,
with the model floor), after the services have picked the new file up. Every answer's first speakable chunk
minus its own floor (the model's TTFT + the first clause's tokens + 20 ms, voice_bench's doc) is pooled per
policy: the median of those differences per policy and the difference of the two, with the same for the
halves of each policy's answers (first blocks vs last) as a sign of drift. Give the same file twice for an
A/A run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmmesh.launcher import Mesh, MeshPorts
from loadtest import voice_bench

RESULTS = Path(__file__).parent / "results"
RELOAD_SECONDS = 2.5  # PolicyStore looks at its file at most once a second, on the next request


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.policy_ab", description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="policy file A")
    parser.add_argument("b", type=Path, help="policy file B")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per policy")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per block")
    parser.add_argument("--name", required=True, help="results/NAME.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="policy-ab-"))
    policy = work / "policy.yaml"
    shutil.copyfile(args.a, policy)
    pooled: dict[str, list[list[float]]] = {"A": [], "B": []}
    started = time.time()
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=RESULTS / "tmp" / "policy_ab" / "logs",
        env={
            "LLMMESH_INFER_DEDUP": "false",
            "LLMMESH_PREPROCESS_SAFETY_POLICY_PATH": str(policy),
            "LLMMESH_POSTPROCESS_SAFETY_POLICY_PATH": str(policy),
        },
    )
    mesh.start()
    try:
        assert mesh.triton is not None
        for block in range(args.blocks):
            for label in arm_order(block):
                shutil.copyfile(args.a if label == "A" else args.b, policy)
                time.sleep(RELOAD_SECONDS)
                pooled[label].append(
                    voice_block(
                        mesh.address("gateway"), mesh.triton.grpc_url, args.rounds, work / f"{block}-{label}.json"
                    )
                )
    finally:
        mesh.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_result(
        args.name,
        "python -m loadtest.policy_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        started,
        {"policies": {"A": str(args.a), "B": str(args.b)}},
        pooled,
    )
    return 0


def arm_order(block: int) -> tuple[str, str]:
    """A then B in even blocks, B then A in odd ones: neither arm always runs first."""
    return ("A", "B") if block % 2 == 0 else ("B", "A")


def voice_block(address: str, triton_grpc: str, rounds: int, out: Path) -> list[float]:
    """One block: `rounds` rounds of voice_bench at one session (CLAUSE, with the model floor) against the
    gateway at `address`; each answer's first speakable chunk minus its own floor, ms."""
    voice_bench.main(
        [
            "--address", address, "--triton-grpc", triton_grpc,
            "--sessions", "1", "--modes", "CLAUSE", "--rounds", str(rounds), "--output", str(out),
        ]
    )  # fmt: skip
    return list(json.loads(out.read_text())["levels"]["1"]["CLAUSE"]["model_floor"]["over_floor_ms"])


def summarise(pooled: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Per arm: the median difference over the floor of every answer, how many were within it, and the same
    median for the first and last half of its blocks (drift); and B's median minus A's."""
    summary: dict[str, Any] = {}
    for label in ("A", "B"):
        every = [d for block in pooled[label] for d in block]
        half = len(pooled[label]) // 2
        summary[label] = {
            "answers": len(every),
            "over_floor_p50_ms": _median(every),
            "within_floor": sum(d <= 0 for d in every),
            "first_half_p50_ms": _median([d for block in pooled[label][:half] for d in block]),
            "second_half_p50_ms": _median([d for block in pooled[label][half:] for d in block]),
        }
    a, b = summary["A"]["over_floor_p50_ms"], summary["B"]["over_floor_p50_ms"]
    return {"summary": summary, "b_minus_a_p50_ms": None if a is None or b is None else round(b - a, 1)}


def write_result(
    name: str, command: str, started: float, arms: dict[str, Any], pooled: dict[str, list[list[float]]]
) -> dict[str, Any]:
    """results/NAME.json: the command, when, what each arm was, the summary and every answer by block."""
    result = {
        "command": command,
        "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        **arms,
        **summarise(pooled),
        "over_floor_ms_by_block": pooled,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "over_floor_ms_by_block"}, indent=1))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
