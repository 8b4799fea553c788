"""Workloads: what each request asks, built once into the mesh's request and Triton's, with the same ids.

The direct request to Triton is built by infer's own `build_request` from preprocess's own tokenization
of the same prompt (same chat template, same default system prompt), so both paths feed the model
exactly the same input ids and sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2

from llmmesh.common.model_assets import ModelAssets, load_model_assets
from llmmesh.infer.backend import Generation, build_request
from llmmesh.preprocess.domain import PrepareInput, Preparer, SamplingInput
from llmmesh.preprocess.server import PreprocessSettings
from llmmesh.stages.v1 import infer_pb2, preprocess_pb2
from llmmesh.v1 import generation_pb2

__all__ = ["INSTRUMENT_SEQUENCE", "WORKLOADS", "BuiltWorkload", "Workload", "build", "instrument_sequence"]

INSTRUMENT_SEQUENCE = Path(__file__).resolve().parents[1] / "triton_models" / "instrument" / "1" / "sequence.json"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    # Requests take these prompts in turn.
    prompts: tuple[str, ...]
    max_tokens: int
    temperature: float = 0.0


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "chat-256",
            "the issue's benchmark: short chat prompts, 256 output tokens, greedy",
            (
                "Tell me about the lighthouse at the end of the harbour.",
                "Why does streaming matter for a voice assistant?",
                "Describe a harbour town at night.",
                "What did the lighthouse keeper do during the storm?",
            ),
            256,
        ),
        Workload(
            "chat-64",
            "short answers: 64 output tokens, greedy (more requests per second for the same tokens)",
            ("What is a lighthouse for?", "Name three things you might see in a harbour."),
            64,
        ),
    )
}


@dataclass(frozen=True)
class BuiltWorkload:
    workload: Workload
    mesh_requests: tuple[generation_pb2.GenerateRequest, ...]
    # What the gateway sends the infer stage for the same prompt (to time that hop alone).
    infer_requests: tuple[infer_pb2.InferRequest, ...]
    direct_requests: tuple[service_pb2.ModelInferRequest, ...]
    prompt_tokens: tuple[int, ...]
    # What the model must return (known for the benchmark instrument), as raw int32 bytes and as ids.
    expected_ids: tuple[int, ...] | None

    @property
    def expected_bytes(self) -> bytes | None:
        if self.expected_ids is None:
            return None
        return np.asarray(self.expected_ids, dtype=np.int32).tobytes()


def instrument_sequence(path: Path = INSTRUMENT_SEQUENCE) -> list[int]:
    return [int(i) for i in json.loads(path.read_text(encoding="utf-8"))["token_ids"]]


def expected_instrument_output(sequence: list[int], max_tokens: int, end_id: int) -> tuple[int, ...]:
    """What the instrument streams for one request: the sequence's start, cut at end_id (see its model.py)."""
    tokens = sequence[:max_tokens]
    if end_id in tokens:
        tokens = tokens[: tokens.index(end_id)]
    return tuple(tokens)


def build(
    workload: Workload,
    triton_model: str,
    client_model: str = "smollm2",
    assets: ModelAssets | None = None,
    instrument: bool = True,
) -> BuiltWorkload:
    """The mesh's and Triton's request for every prompt, tokenized as preprocess tokenizes it."""
    assets = assets or load_model_assets()
    settings = PreprocessSettings()
    preparer = Preparer({client_model: assets}, client_model, settings.default_system_prompt)
    mesh, infer, direct, lengths = [], [], [], []
    end_id = assets.eos_token_id
    for i, prompt in enumerate(workload.prompts):
        sampling = SamplingInput(max_tokens=workload.max_tokens, temperature=workload.temperature)
        prepared = preparer.prepare(PrepareInput(f"loadtest-{i}", client_model, prompt=prompt, sampling=sampling))
        s = prepared.sampling
        gen = Generation(
            request_id=prepared.request_id,
            model=client_model,
            input_ids=prepared.input_ids,
            max_tokens=s.max_tokens,
            end_id=prepared.end_id,
            pad_id=prepared.pad_id,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
        )
        end_id = prepared.end_id
        direct.append(build_request(gen, triton_model))
        infer.append(
            infer_pb2.InferRequest(
                request_id=prepared.request_id,
                model=client_model,
                input_ids=prepared.input_ids,
                end_id=prepared.end_id,
                pad_id=prepared.pad_id,
                sampling=preprocess_pb2.ResolvedSampling(
                    max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k
                ),
            )
        )
        mesh.append(
            generation_pb2.GenerateRequest(
                prompt=prompt,
                model=client_model,
                sampling=generation_pb2.SamplingParams(
                    max_tokens=workload.max_tokens, temperature=workload.temperature
                ),
            )
        )
        lengths.append(len(prepared.input_ids))
    expected = expected_instrument_output(instrument_sequence(), workload.max_tokens, end_id) if instrument else None
    return BuiltWorkload(workload, tuple(mesh), tuple(infer), tuple(direct), tuple(lengths), expected)
