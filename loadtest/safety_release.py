"""What clause-level release lets through that sentence-level release would have stopped.

    .venv/bin/python -m loadtest.safety_release        → results/safety_release.json

Starts a Triton of its own serving the real safety classifier (alt-profanity-check, the shipped policy's
`safety_classifier`) and streams every sentence of the labelled set `prompts/safety_labelled.jsonl`
(50 benign sentences of several clauses, some with alarming words used harmlessly; 50 offensive ones, the
insult early or late in the sentence) word by word through the shipped policy's `SafetyStream`, twice:
released at sentences (`classifier.release: sentence`) and at clauses (`release: clause`, CLAUSE chunking).
For each sentence it records what each release gave out before the stream ended, and whether it ended with
CONTENT_FILTER. The summary counts:

- leaked: offensive sentences that sentence release blocked whole and clause release blocked only after
  giving out some of them, with the text given out (what a listener would already have heard);
- missed: offensive sentences neither release blocked (the classifier's own misses, the same in both);
- false blocks: benign sentences blocked by each release (clause release scores sentence prefixes, which
  can read differently from the whole sentence);
- the characters held before the first release of each benign sentence (the listener's wait, in text),
  and classifier calls per sentence (clause release scores more, shorter texts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from llmmesh.common.safety import DEFAULT_POLICY_PATH, SafetyPolicy, SafetyStream, TritonClassifier, load_policy
from llmmesh.infer.triton_server import TritonServer
from llmmesh.launcher import free_ports
from llmmesh.postprocess.chunker import Chunker, ChunkingMode

SET = Path(__file__).parent / "prompts" / "safety_labelled.jsonl"
RESULTS = Path(__file__).parent / "results" / "safety_release.json"
MODEL = "safety_classifier"


def words(text: str) -> list[str]:
    """The text as a model streams it, a word (with its leading space) at a time."""
    return [w for w in text.replace(" ", "\0 ").split("\0") if w]


def policies(folder: Path) -> dict[str, SafetyPolicy]:
    """The shipped policy with each release unit (everything else as shipped)."""
    text = DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
    out = {}
    for unit in ("sentence", "clause"):
        path = folder / f"{unit}.yaml"
        path.write_text(text.replace("release: clause", f"release: {unit}"), encoding="utf-8")
        out[unit] = load_policy(path)
        assert out[unit].classifier.release == unit, "the shipped policy no longer says `release: clause`"
    return out


class _Counting:
    """The classifier, counting calls."""

    def __init__(self, inner: TritonClassifier) -> None:
        self.inner = inner
        self.calls = 0

    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        self.calls += 1
        return await self.inner.score(texts, timeout)


async def stream_once(policy: SafetyPolicy, classifier: _Counting, text: str) -> dict[str, Any]:
    """One sentence through one release: what came out, where the first piece came out, how it ended."""
    clauses = Chunker(ChunkingMode.CLAUSE)
    stream = SafetyStream(policy, classifier, clauses=clauses)
    calls = classifier.calls
    released = ""
    first_release_after: int | None = None  # characters pushed when something was first released
    pushed = 0
    pieces = words(text)
    blocked = None
    for i, piece in enumerate(pieces):
        pushed += len(piece)
        verdict = await stream.push(piece, final=i == len(pieces) - 1)
        if verdict.text and first_release_after is None:
            first_release_after = pushed
        released += verdict.text
        if verdict.blocked:
            blocked = verdict.blocked
            break
    return {
        "released": released,
        "blocked": blocked,
        "first_release_after_chars": first_release_after,
        "classifier_calls": classifier.calls - calls,
    }


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    offensive = [r for r in items if r["label"] == "offensive"]
    benign = [r for r in items if r["label"] == "benign"]
    leaked = [
        {"id": r["id"], "text": r["text"], "given_out": r["clause"]["released"]}
        for r in offensive
        if r["sentence"]["blocked"] and r["clause"]["released"]
    ]
    out: dict[str, Any] = {
        "sentences": {"benign": len(benign), "offensive": len(offensive)},
        "offensive_blocked": {unit: sum(1 for r in offensive if r[unit]["blocked"]) for unit in ("sentence", "clause")},
        "offensive_missed_by_both": [
            r["id"] for r in offensive if not r["sentence"]["blocked"] and not r["clause"]["blocked"]
        ],
        # Sentence prefixes can score higher than the whole sentence: caught by clause release only.
        "offensive_blocked_only_by_clause": [
            r["id"] for r in offensive if r["clause"]["blocked"] and not r["sentence"]["blocked"]
        ],
        "leaked_count": len(leaked),
        "leaked_by_position": {
            where: sum(1 for x in leaked if x["id"].startswith(f"offensive-{where}")) for where in ("early", "late")
        },
        "leaked_chars_share": round(
            sum(len(x["given_out"]) for x in leaked) / max(1, sum(len(x["text"]) for x in leaked)), 3
        ),
        "leaked": leaked,
        "benign_false_blocks": {
            unit: [r["id"] for r in benign if r[unit]["blocked"]] for unit in ("sentence", "clause")
        },
        "benign_first_release_after_chars_median": {
            unit: statistics.median(
                r[unit]["first_release_after_chars"] or len(r["text"]) for r in benign if not r[unit]["blocked"]
            )
            for unit in ("sentence", "clause")
        },
        "benign_chars_median": statistics.median(len(r["text"]) for r in benign),
        "classifier_calls_per_sentence": {
            unit: round(statistics.mean(r[unit]["classifier_calls"] for r in items), 2)
            for unit in ("sentence", "clause")
        },
    }
    return out


async def measure(grpc_url: str, folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    units = policies(folder)
    client = TritonClassifier(grpc_url, MODEL)
    try:
        counting = _Counting(client)
        for row in rows:
            for unit, policy in units.items():
                row[unit] = await stream_once(policy, counting, row["text"])
    finally:
        await client.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.safety_release", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmmesh-release-") as tmp:
        server = TritonServer(*free_ports(3), models=(MODEL,), log_path=Path(tmp) / "triton.log")
        server.start()
        try:
            server.wait_ready(timeout=180)
            rows = asyncio.run(measure(server.grpc_url, Path(tmp)))
        finally:
            server.stop()
    summary = summarise(rows)
    report = {
        "command": "python -m loadtest.safety_release",
        "set": str(SET.relative_to(Path(__file__).parent.parent)),
        "policy": "services/llmmesh/common/safety/policies/default.yaml (release: sentence vs clause)",
        "wall_seconds": round(time.monotonic() - started, 1),
        "summary": summary,
        "sentences": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "leaked"}, indent=2))
    for leak in summary["leaked"]:
        print(f"  leaked {leak['id']}: {leak['given_out']!r}")
    print(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
