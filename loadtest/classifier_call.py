"""What one safety-classifier check costs: the scoring itself, and a call to the Triton model.

    .venv/bin/python -m loadtest.classifier_call        → results/classifier_call.json

1. Scoring in this process, side by side (alternating, same texts): scikit-learn's path (the package's
   `TfidfVectorizer.transform`, then one sparse product with the folds' weights) against `scorer.Scorer`'s
   own features (triton_models/safety_classifier/1/scorer.py), for one short clause, one long sentence
   (the context a clause check sends) and a batch of 8.
2. A call to Triton's `safety_classifier` (a Triton of its own serving only that model) through the
   services' own client (`TritonClassifier`), one short clause at a time with 5 ms between calls (an idle
   model, as a voice stream meets it): client latency p50/p99, and Triton's own statistics per request
   (queue, compute input / infer / output), which split the call between gRPC and the python backend.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from llmmesh.common.safety import TritonClassifier
from llmmesh.infer.triton_server import TritonServer
from llmmesh.launcher import free_ports

RESULTS = Path(__file__).parent / "results" / "classifier_call.json"
SCORER = Path(__file__).parent.parent / "triton_models" / "safety_classifier" / "1" / "scorer.py"
MODEL = "safety_classifier"
SHORT = "Paris, the capital of France, is known for its art,"
LONG = (
    "Paris, the capital of France, is known for its art, its museums and its food, and every year millions "
    "of visitors walk along the Seine to see the cathedral, the old bridges and the bookstalls on its banks."
)
TEXTS = {"short clause": [SHORT], "long sentence": [LONG], "batch of 8": [SHORT, LONG] * 4}
STATS = ("queue", "compute_input", "compute_infer", "compute_output")


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(values),
        "p50": round(statistics.median(values), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def scoring(rounds: int) -> dict[str, Any]:
    from profanity_check import profanity_check as package

    spec = importlib.util.spec_from_file_location("classifier_scorer", SCORER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scorer = module.Scorer(package.vectorizer, package.model)

    def sklearn_path(texts: list[str]) -> Any:
        return package.vectorizer.transform(texts) @ scorer._weights_t

    def own_path(texts: list[str]) -> Any:
        return [scorer._features(text) for text in texts]

    out: dict[str, Any] = {}
    for name, texts in TEXTS.items():
        times: dict[str, list[float]] = {"scikit-learn transform": [], "scorer features": []}
        for i in range(rounds):
            order = [("scikit-learn transform", sklearn_path), ("scorer features", own_path)]
            for label, path in order if i % 2 else order[::-1]:
                started = time.perf_counter()
                path(texts)
                times[label].append((time.perf_counter() - started) * 1000)
        whole: list[float] = []
        for _ in range(rounds):
            started = time.perf_counter()
            scorer(texts)
            whole.append((time.perf_counter() - started) * 1000)
        out[name] = {**{k: _ms(v) for k, v in times.items()}, "Scorer call (features + folds)": _ms(whole)}
    return out


def _stats(server: TritonServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{MODEL}/stats", timeout=5) as reply:
        return dict(json.load(reply)["model_stats"][0]["inference_stats"])


async def calls(server: TritonServer, n: int) -> dict[str, Any]:
    classifier = TritonClassifier(server.grpc_url, MODEL)
    try:
        for _ in range(20):
            await classifier.score([SHORT])
        before = await asyncio.to_thread(_stats, server)
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            await classifier.score([SHORT])
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.005)
        after = await asyncio.to_thread(_stats, server)
    finally:
        await classifier.close()
    count = int(after["success"]["count"]) - int(before["success"]["count"])
    per_request = {
        key: round((int(after[key]["ns"]) - int(before[key]["ns"])) / count / 1e6, 3) for key in ("success", *STATS)
    }
    return {"client_ms": _ms(latencies), "triton_mean_ms_per_request": per_request, "requests": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.classifier_call", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=500, help="scorings per path and text set")
    parser.add_argument("--calls", type=int, default=300, help="calls to Triton")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {"command": "python -m loadtest.classifier_call", "scoring_ms": scoring(args.rounds)}
    with tempfile.TemporaryDirectory(prefix="llmmesh-classifier-") as tmp:
        server = TritonServer(*free_ports(3), models=(MODEL,), log_path=Path(tmp) / "triton.log")
        server.start()
        try:
            server.wait_ready(timeout=180)
            report["triton_call"] = asyncio.run(calls(server, args.calls))
        finally:
            server.stop()
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
