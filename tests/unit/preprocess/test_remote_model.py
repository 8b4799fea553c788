"""Preprocess for a model served by an OpenAI-compatible endpoint: validated as any other, not tokenized,
never shareable, hashed over its exact text."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.model_assets import ModelAssets
from llmmesh.common.safety import PolicyStore
from llmmesh.preprocess.domain import ChatTurn, Limits, PrepareInput, Preparer, SamplingInput
from llmmesh.preprocess.stage import REMOTE_NOT_SHAREABLE, PreprocessStage
from llmmesh.v1 import generation_pb2


@pytest.fixture(scope="module")
def preparer(assets: ModelAssets) -> Preparer:
    return Preparer(
        {"smollm2": assets},
        "smollm2",
        "You are a helpful assistant.",
        Limits(default_max_tokens=64),
        aliases={"gpt": "remote"},
        remote=["remote"],
    )


@pytest.fixture(scope="module")
def stage(preparer: Preparer) -> PreprocessStage:
    return PreprocessStage(preparer, PolicyStore(None))


def _request(**fields: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id="r", model="remote", **fields)  # type: ignore[arg-type]


def test_remote_model_is_prepared_as_text(preparer: Preparer) -> None:
    """No input ids, no default system prompt: the prompt is one user message; sampling resolved, stops kept."""
    out = preparer.prepare(
        PrepareInput(request_id="r", model="gpt", prompt="Hi", sampling=SamplingInput(temperature=0.5, stop=("x",)))
    )
    assert out.model == "remote" and out.backend == "openai"
    assert out.input_ids == [] and out.stop_token_ids == ()
    assert out.messages == (("user", "Hi"),)
    assert out.sampling.temperature == 0.5 and out.sampling.max_tokens == 64 and out.stop == ("x",)


@pytest.mark.parametrize(
    ("prepare_input", "field"),
    [
        (PrepareInput(request_id="r", model="remote", prompt="  "), "prompt"),
        (PrepareInput(request_id="r", model="remote"), "input"),
        (PrepareInput(request_id="r", model="remote", chat=(ChatTurn("robot", "hi"),)), "chat.messages[0].role"),
        (PrepareInput(request_id="r", model="remote", chat=(ChatTurn("user", " "),)), "chat.messages[0].content"),
        (PrepareInput(request_id="r", model="remote", prompt="hi", sampling=SamplingInput(top_p=2)), "sampling.top_p"),
        (
            PrepareInput(request_id="r", model="remote", prompt="hi", sampling=SamplingInput(max_tokens=0)),
            "sampling.max_tokens",
        ),
        (
            PrepareInput(request_id="r", model="remote", prompt="hi", sampling=SamplingInput(stop=("",))),
            "sampling.stop[0]",
        ),
        (PrepareInput(request_id="r", model="remote", prompt="a\x00b"), "prompt"),
    ],
)
def test_remote_model_input_is_validated_as_any_other(
    preparer: Preparer, prepare_input: PrepareInput, field: str
) -> None:
    """Empty input, an unknown role, out-of-range sampling, a bad stop string: INVALID_ARGUMENT naming the field."""
    with pytest.raises(InvalidArgument) as info:
        preparer.prepare(prepare_input)
    assert info.value.field == field


async def test_remote_response_is_not_shareable_and_hashes_the_text(stage: PreprocessStage) -> None:
    """backend=openai, no ids, the stop strings passed on, not shareable with the reason, a hash over the text."""
    chat = generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", content="Hi")])
    seeded = generation_pb2.SamplingParams(temperature=0, seed=1, stop=["."])
    a = await stage.prepare(_request(chat=chat, sampling=seeded))
    assert (a.backend, list(a.input_ids), list(a.stop)) == ("openai", [], ["."])
    assert not a.shareable and a.not_shareable_reason == REMOTE_NOT_SHAREABLE
    assert a.request_hash == (await stage.prepare(_request(prompt="Hi", sampling=seeded))).request_hash
    for other in (
        _request(prompt="Hi ", sampling=seeded),
        _request(prompt="Hi", sampling=generation_pb2.SamplingParams(temperature=0, seed=2, stop=["."])),
        _request(prompt="Hi", sampling=generation_pb2.SamplingParams(temperature=0, seed=1)),
        _request(
            chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="system", content="Hi")]),
            sampling=seeded,
        ),
    ):
        assert (await stage.prepare(other)).request_hash != a.request_hash


async def test_triton_model_beside_a_remote_one_is_unchanged(stage: PreprocessStage) -> None:
    """A Triton model of the same preparer is still tokenized, shareable when greedy, backend=triton."""
    out = await stage.prepare(
        generation_pb2.GenerateRequest(
            request_id="r", prompt="Hi", sampling=generation_pb2.SamplingParams(temperature=0)
        )
    )
    assert out.backend == "triton" and out.input_ids and out.shareable


async def test_remote_prompt_goes_through_the_safety_policy(stage: PreprocessStage) -> None:
    """The prompt safety check applies to a remote model as to any other."""
    out = await stage.prepare(_request(prompt="I will kill you"))
    assert out.blocked_category == "violence"


def test_preprocess_loads_a_registry_whose_default_is_remote(tmp_path: Path) -> None:
    """A registry whose default model is an OpenAI-compatible endpoint needs no tokenizer for it."""
    from llmmesh.preprocess.server import PreprocessSettings, build_servicer

    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        "  - {name: remote, default: true, backend: openai, openai: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "  - {name: smollm2, triton_model: smollm2}\n",
        encoding="utf-8",
    )
    servicer, _ = build_servicer(PreprocessSettings(model_registry=str(registry)))
    assert servicer.stage
