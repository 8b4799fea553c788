"""The layered safety policy end to end: prompt check, blocked phrase across tokens, PII redaction.

The output checks run a mesh whose Triton serves the benchmark instrument streaming a fixed text that
contains an e-mail address and, in a second run, a blocked phrase, so the forced output is exact.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator

import grpc
import pytest

from llmmesh.common.model_assets import load_model_assets
from llmmesh.common.registry import registry_file
from llmmesh.common.safety.policy import DEFAULT_POLICY_PATH
from llmmesh.infer.triton_server import repository_root
from llmmesh.launcher import Mesh, MeshPorts
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import model_counters, request, settled_counters

pytestmark = pytest.mark.e2e

FORCED = "Sure. Write to jane.doe@example.com for details. Then kill yourself is what I must never say."


def _collect(address: str, req: generation_pb2.GenerateRequest) -> tuple[str, generation_pb2.Final]:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        text, final = "", None
        for r in stub.Generate(req, timeout=60):
            if r.HasField("chunk"):
                text += r.chunk.text
            else:
                final = r.final
    assert final is not None
    return text, final


@pytest.fixture(scope="module")
def forced_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose 'model' streams FORCED, tokenized by SmolLM2's own tokenizer."""
    repo = tmp_path_factory.mktemp("forced-repo")
    shutil.copytree(repository_root() / "instrument", repo / "instrument")
    shutil.copytree(repository_root() / "safety_classifier", repo / "safety_classifier")
    ids = load_model_assets().encode(FORCED)
    sequence = repo / "forced.json"
    sequence.write_text(json.dumps({"text": FORCED, "token_ids": ids}))
    config = repo / "instrument" / "config.pbtxt"
    text = config.read_text()
    text = re.sub(r'(key: "sequence_path" value: \{ string_value: ")[^"]*(")', rf"\g<1>{sequence}\g<2>", text)
    text = re.sub(r'(key: "ttft_ms" value: \{ string_value: ")[^"]*(")', r"\g<1>5\g<2>", text)
    text = re.sub(r'(key: "itl_ms" value: \{ string_value: ")[^"]*(")', r"\g<1>2\g<2>", text)
    config.write_text(text)
    # The prompt's classifier check alongside the model's start (the shipped policy checks before).
    policy = repo / "policy.yaml"
    shipped = DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
    assert "  prompt_check: before\n" in shipped
    policy.write_text(shipped.replace("  prompt_check: before\n", "  prompt_check: alongside\n"))
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=tmp_path_factory.mktemp("forced-logs"),
        model_registry=registry_file(tmp_path_factory.mktemp("forced-registry"), triton_model="instrument"),
        triton_models=("instrument", "safety_classifier"),
        model_repository=repo,
        env={"LLMMESH_PREPROCESS_SAFETY_POLICY_PATH": str(policy)},
    )
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


def test_an_email_in_the_output_arrives_redacted(forced_mesh: Mesh) -> None:
    """The e-mail address streamed token by token reaches the client only as [EMAIL]."""
    ids = load_model_assets().encode("Sure. Write to jane.doe@example.com for details.")
    text, final = _collect(forced_mesh.address("gateway"), request("anything", max_tokens=len(ids)))
    assert "jane.doe" not in text and "example.com" not in text
    assert text == "Sure. Write to [EMAIL] for details."
    assert final.finish_reason == generation_pb2.FINISH_REASON_LENGTH


def test_a_blocked_phrase_split_across_tokens_ends_with_content_filter(forced_mesh: Mesh) -> None:
    """'kill yourself' spans several tokens; the stream ends with CONTENT_FILTER and no part of it is sent."""
    assert len(load_model_assets().encode(" kill yourself")) >= 2
    text, final = _collect(forced_mesh.address("gateway"), request("anything", max_tokens=200))
    assert final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert final.filter_category == "violence"
    assert "kill" not in text and "yourself" not in text


def test_a_blocked_prompt_is_answered_without_generating(mesh: Mesh) -> None:
    """A prompt that fails the policy ends at once with CONTENT_FILTER; the model generates nothing."""
    before = settled_counters(mesh)
    text, final = _collect(mesh.address("gateway"), request("You are a fucking idiot, answer me.", max_tokens=20))
    assert text == ""
    assert final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert final.filter_category == "profanity" and final.usage.completion_tokens == 0
    assert model_counters(mesh) == before


def test_a_prompt_the_classifier_blocks_alongside_starts_the_model_but_nothing_is_released(forced_mesh: Mesh) -> None:
    """With `prompt_check: alongside` an insult the blocklist does not know is scored by the real classifier
    while the model already streams; the answer is CONTENT_FILTER with no text, and the model's request is
    cancelled before its answer's end."""
    answer_tokens = len(load_model_assets().encode(FORCED))
    before = settled_counters(forced_mesh)
    text, final = _collect(
        forced_mesh.address("gateway"), request("Tell me why you are such a stupid moron.", max_tokens=200)
    )
    after = settled_counters(forced_mesh)
    assert text == ""
    assert final.finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert final.filter_category == "toxicity" and final.usage.completion_tokens == 0
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1  # started alongside, then stopped
    assert after["tokens"] - before["tokens"] < answer_tokens


def test_concurrent_streams_share_classifier_batches_in_triton(forced_mesh: Mesh) -> None:
    """Sixteen concurrent mesh requests: Triton's statistics show classifier executions with batches > 1."""
    import concurrent.futures
    import urllib.request

    assert forced_mesh.triton is not None
    stats_url = f"{forced_mesh.triton.http_url}/v2/models/safety_classifier/stats"

    def batch_sizes() -> dict[int, int]:
        with urllib.request.urlopen(stats_url, timeout=5) as resp:
            stats = json.load(resp)["model_stats"][0]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}

    before = batch_sizes()
    ids = load_model_assets().encode("Sure. Write to jane.doe@example.com for details.")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda _: _collect(forced_mesh.address("gateway"), request("x", max_tokens=len(ids))), range(16))
        )
    assert all(text == "Sure. Write to [EMAIL] for details." for text, _ in results)
    after = batch_sizes()
    grown = {size: after[size] - before.get(size, 0) for size in after if after[size] > before.get(size, 0)}
    assert any(size > 1 for size in grown), f"no batch larger than 1: {grown}"
