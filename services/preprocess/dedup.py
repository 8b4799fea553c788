"""Request identity for dedup: prompt normalisation, the request hash, and who may share a generation.

Two requests share a generation (join it in flight, or replay its cached result) only when they would
produce the same tokens. So the hash covers everything that decides the tokens: the model, the prompt
ids after normalising and templating, every sampling parameter, the stop strings, and the safety policy
version (a result checked under an older policy is never served under a newer one). It leaves out what
only shapes the delivery (chunking mode, priority, request id): those are applied per request.

Normalisation, applied to every message before templating (so the model sees the same text as the hash):
  - Unicode NFC: "é" typed as e + combining acute and as the precomposed letter are one request;
  - whitespace: leading and trailing whitespace is removed; a run of whitespace inside the text becomes
    one newline if it contains a line break, else one space ("What  is\\t2+2 ?" == "What is 2+2 ?");
  - case is preserved: "paris" and "Paris" are different requests.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from llmmesh.preprocess.domain import Prepared

__all__ = ["normalize_text", "request_hash", "shareability"]

_WHITESPACE = re.compile(r"\s+")


def _collapse(match: re.Match[str]) -> str:
    run = match.group(0)
    return "\n" if ("\n" in run or "\r" in run) else " "


def normalize_text(text: str) -> str:
    """NFC, trimmed, each whitespace run collapsed to one newline (if it breaks a line) or one space."""
    return _WHITESPACE.sub(_collapse, unicodedata.normalize("NFC", text).strip())


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
