"""Request identity: the request hash, and who may share a generation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llmmesh.common.model_assets import ModelAssets
from llmmesh.preprocess.dedup import request_hash, shareability
from llmmesh.preprocess.domain import Prepared, PrepareInput, Preparer, ResolvedSampling, SamplingInput

BASE = Prepared(
    request_id="r1",
    model="smollm2",
    input_ids=[1, 2, 3, 4],
    end_id=2,
    pad_id=2,
    sampling=ResolvedSampling(max_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None),
    stop=("END",),
    stop_token_ids=((9,),),
)


def test_the_hash_is_stable_and_ignores_what_only_shapes_delivery() -> None:
    h = request_hash(BASE, "policy-1")
    assert h == request_hash(replace(BASE, request_id="another"), "policy-1")
    assert len(h) == 32


@pytest.mark.parametrize(
    "changed",
    [
        replace(BASE, model="other"),
        replace(BASE, input_ids=[1, 2, 3, 5]),
        replace(BASE, input_ids=[1, 2, 3]),
        replace(BASE, sampling=replace(BASE.sampling, max_tokens=33)),
        replace(BASE, sampling=replace(BASE.sampling, temperature=0.5)),
        replace(BASE, sampling=replace(BASE.sampling, top_p=0.9)),
        replace(BASE, sampling=replace(BASE.sampling, top_k=40)),
        replace(BASE, sampling=replace(BASE.sampling, seed=0)),
        replace(BASE, sampling=replace(BASE.sampling, seed=1)),
        replace(BASE, stop=("END", "STOP")),
        replace(BASE, stop=("ENDS",)),
        replace(BASE, stop=()),
        replace(BASE, end_id=3),
    ],
    ids=[
        "model",
        "prompt ids",
        "prompt length",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed 0",
        "seed 1",
        "one more stop",
        "other stop",
        "no stop",
        "end id",
    ],
)
def test_anything_that_changes_the_tokens_changes_the_hash(changed: Prepared) -> None:
    assert request_hash(changed, "policy-1") != request_hash(BASE, "policy-1")


def test_a_new_safety_policy_version_changes_the_hash() -> None:
    assert request_hash(BASE, "policy-2") != request_hash(BASE, "policy-1")


def test_stop_strings_cannot_alias_by_concatenation() -> None:
    assert request_hash(replace(BASE, stop=("ab", "c")), "p") != request_hash(replace(BASE, stop=("a", "bc")), "p")


def test_only_greedy_or_seeded_requests_share() -> None:
    assert shareability(BASE) == (True, "")
    seeded = replace(BASE, sampling=replace(BASE.sampling, temperature=0.8, seed=3))
    assert shareability(seeded) == (True, "")
    ok, why = shareability(replace(BASE, sampling=replace(BASE.sampling, temperature=0.8)))
    assert not ok and "without a seed" in why and "0.8" in why


def test_prompts_that_differ_only_in_layout_are_different_requests(assets: ModelAssets) -> None:
    """No normalisation: whitespace, composition and case variants hash apart, as the model sees them apart."""
    preparer = Preparer({"smollm2": assets}, "smollm2")

    def hashed(prompt: str) -> str:
        prepared = preparer.prepare(PrepareInput("r", "", prompt=prompt, sampling=SamplingInput(temperature=0)))
        return request_hash(prepared, "p")

    base = "Name a café in Paris."
    assert hashed(base) == hashed(base)
    for variant in ("Name  a café in Paris.", "Name a cafe\u0301 in Paris.", " Name a café in Paris.", base.upper()):
        assert hashed(variant) != hashed(base), variant
