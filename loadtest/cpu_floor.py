"""Issue 18's CPU target against the least a Python reader of Triton's stream costs, from runs already made.

    .venv/bin/python -m loadtest.cpu_floor        → results/cpu_floor.json

Every committed `python -m loadtest run` result that has both `direct` and `mesh` at a concurrency holds,
measured in the same run: tritonserver's and the instrument stub's CPU per 1,000 output tokens (the
target's yardstick: the four services together at most half of it), and the load generator's own CPU
while it drove `direct`: a Python process doing nothing but read Triton's `ModelStreamInfer` responses,
one gRPC message per token, over grpc.aio (loadtest/clients.py `DirectClient`: it checks a flag and takes
the ids' bytes, nothing more). Infer has to read that same stream, so no Python infer can cost less than
that reader, and the four services together cost at least that much. For each run: the allowance (half of
triton + stub), the bare reader, infer and the four services, and the bare reader over the allowance.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "cpu_floor.json"
SERVICES = ("gateway", "preprocess", "infer", "postprocess")


def rows(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
        return []
    cpu = {
        (level.get("target"), level.get("concurrency")): level.get("cpu_s_per_1k_tokens") or {}
        for level in data["levels"]
    }
    out = []
    for concurrency in sorted({c for _, c in cpu if c is not None}):
        direct, mesh = cpu.get(("direct", concurrency)), cpu.get(("mesh", concurrency))
        if not direct or not mesh or "loadgen" not in direct or "triton_stub" not in mesh:
            continue
        yardstick = mesh["triton"] + mesh["triton_stub"]
        out.append(
            {
                "file": path.name,
                "pii_redaction": data.get("config", {}).get("pii_redaction"),
                "concurrency": concurrency,
                "triton_and_stub": round(yardstick, 3),
                "allowance": round(yardstick / 2, 3),
                "bare_reader": direct["loadgen"],
                "infer": mesh["infer"],
                "services": round(sum(mesh[name] for name in SERVICES), 3),
                "bare_reader_over_allowance": round(direct["loadgen"] / (yardstick / 2), 2),
                "infer_over_bare_reader": round(mesh["infer"] / direct["loadgen"], 2),
            }
        )
    return out


def main() -> None:
    found = [row for path in sorted(RESULTS.glob("*.json")) if path != OUT for row in rows(path)]
    summary = {}
    for concurrency in sorted({row["concurrency"] for row in found}):
        at = [row for row in found if row["concurrency"] == concurrency]
        over = [row["bare_reader_over_allowance"] for row in at]
        summary[f"c={concurrency}"] = {
            "runs": len(at),
            "bare_reader_over_allowance": {"min": min(over), "median": statistics.median(over), "max": max(over)},
            "runs_where_the_bare_reader_alone_exceeds_the_allowance": sum(value > 1 for value in over),
            "infer_over_bare_reader_median": statistics.median(row["infer_over_bare_reader"] for row in at),
        }
    result = {"command": "python -m loadtest.cpu_floor", "unit": "CPU s per 1,000 output tokens", "summary": summary}
    OUT.write_text(json.dumps({**result, "runs": found}, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
