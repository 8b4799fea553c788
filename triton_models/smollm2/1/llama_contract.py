"""How the TensorRT-LLM tensor contract maps onto llama.cpp: seeds, stop sequences, threads.

Pure functions, imported by `model.py` next to this file. `model.py` itself runs only inside Triton's
python backend (it imports `triton_python_backend_utils`); these run anywhere, so tests/unit checks them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["DEFAULT_MAX_THREADS", "LLAMA_RANDOM_SEED", "engine_threads", "llama_seed", "take_until_stop"]

# llama.cpp's LLAMA_DEFAULT_SEED: a request that carries it is sampled with a fresh random seed.
LLAMA_RANDOM_SEED = 0xFFFFFFFF

# The most llama.cpp threads one model instance starts when `n_threads` is 0 (automatic). llama.cpp's
# threads spin between the operations of every step, and a step of a small model is short: past a few
# threads the split work is smaller than the synchronisation, while each extra thread still burns a core
# that Triton's other models and the mesh's services need. (A judgement, not a measurement: these machines
# have 2 cores.) A bigger model on a bigger host sets `n_threads` in config.pbtxt explicitly.
DEFAULT_MAX_THREADS = 8


def llama_seed(seed: int) -> int:
    """The contract's UINT64 `seed` as a llama.cpp seed that is never llama.cpp's "random" value.

    Seeds below 2^32 - 1 are used as they are; larger seeds wrap modulo 2^32 - 1, so 2^32 - 1 itself (and
    2^64 - 1, or any seed whose low 32 bits are all ones) becomes a fixed seed like any other. The mesh
    treats a request with a seed as deterministic and shares its answer: the seed must make it so.
    """
    return seed % LLAMA_RANDOM_SEED


def take_until_stop(generated: list[int], new: Sequence[int], stops: Sequence[Sequence[int]]) -> tuple[list[int], bool]:
    """Appends `new` to `generated`, through the end of the first stop sequence that ends among them.

    Returns the ids appended and whether a stop sequence ended. Every end position among the new ids is
    checked, so a stop sequence is found when it ends inside a step that produced several ids, or began in
    an earlier step. Its own ids are kept, as TensorRT-LLM sends them; nothing after them is.
    """
    start = len(generated)
    generated.extend(new)
    for end in range(start + 1, len(generated) + 1):
        for stop in stops:
            n = len(stop)
            if 0 < n <= end and all(generated[end - n + i] == t for i, t in enumerate(stop)):
                del generated[end:]
                return generated[start:], True
    return generated[start:], False


def engine_threads(configured: int, available: int | None = None, cap: int = DEFAULT_MAX_THREADS) -> int:
    """llama.cpp threads for one model instance.

    `configured` 0 means automatic: the CPUs this process may run on (its affinity, which a container's
    cpuset or `taskset` narrows; not `os.cpu_count()`, the host's), at most `cap`. A configured count is
    honoured up to those CPUs: more threads than CPUs only take turns, and llama.cpp's spinning threads
    make that very slow.
    """
    cpus = max(1, available if available is not None else len(os.sched_getaffinity(0)))
    if configured > 0:
        return min(configured, cpus)
    return max(1, min(cpus, cap))
