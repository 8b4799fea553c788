"""Request identity for dedup: the request hash, and who may share a generation.

Two requests share a generation (join it in flight, or replay its cached result) only when they would
produce the same tokens. So the hash covers everything that decides the tokens: the model, the prompt
token ids exactly as the model receives them (after the chat template), every sampling parameter, the
stop strings, and the safety policy version (a result checked under an older policy is never served
under a newer one). It leaves out what only shapes the delivery (chunking mode, priority, request id):
those are applied per request.

No normalisation: the prompt is hashed as the model sees it, and the model sees what the caller wrote.
Requests that differ only in whitespace, Unicode composition or case are different requests (the model
may answer them differently: indentation is meaning in code, tables and poems).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from llmmesh.preprocess.domain import Prepared

__all__ = ["request_hash", "shareability"]


def _field(h: xxhash.xxh3_128, tag: bytes, value: bytes) -> None:
    # Tag and length before every value: no two different requests serialise to the same bytes.
    h.update(tag)
    h.update(struct.pack("<Q", len(value)))
    h.update(value)


def request_hash(prepared: Prepared, policy_version: str) -> str:
    """xxh3-128 (hex) of everything that decides the generated tokens."""
    s = prepared.sampling
    h = xxhash.xxh3_128()
    _field(h, b"model", prepared.model.encode())
    _field(h, b"input", struct.pack(f"<{len(prepared.input_ids)}i", *prepared.input_ids))
    _field(h, b"end", struct.pack("<ii", prepared.end_id, prepared.pad_id))
    # float32: the value Triton receives (0.7 and 0.70000001 are one request).
    _field(h, b"sampling", struct.pack("<iffi", s.max_tokens, s.temperature, s.top_p, s.top_k))
    _field(h, b"seed", b"" if s.seed is None else struct.pack("<Q", s.seed))
    for stop in prepared.stop:
        _field(h, b"stop", stop.encode())
    _field(h, b"policy", policy_version.encode())
    return h.hexdigest()


def shareability(prepared: Prepared) -> tuple[bool, str]:
    """(may share, why not): only deterministic requests share, greedy or with an explicit seed."""
    s = prepared.sampling
    if s.temperature == 0 or s.seed is not None:
        return True, ""
    return False, (
        f"sampled (temperature {s.temperature:g}) without a seed: set sampling.seed, or temperature 0, "
        "for identical requests to share one generation"
    )
