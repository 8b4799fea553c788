"""A model's vocabulary from its GGUF file, built as llama.cpp builds it, for the `tokenizers` library.

Two of llama.cpp's vocabulary families (`tokenizer.ggml.model`):

* `gpt2`: byte-level BPE with merges (SmolLM2). Tokens spell bytes through GPT-2's byte-to-unicode table.
* `llama`: SentencePiece-style BPE by score (Gemma, Llama 2, Mistral). llama.cpp replaces every space by
  U+2581 "▁", splits the text into characters and repeatedly merges the adjacent pair whose concatenation
  is the vocabulary's highest-scoring token; a character no token spells becomes its UTF-8 bytes' `<0xXX>`
  tokens. A `tokenizers` BPE reproduces that with merges ordered by the merged token's score (as Hugging
  Face's SentencePiece converter does) and byte fallback.

In both, llama.cpp first cuts the text at its user-defined tokens (always) and control tokens (when
special texts are parsed); here those are added tokens, non-special and special. The GGUF is read with a
small reader of its metadata (`read_metadata`): gguf's `GGUFReader` takes about 25 s over a 262,144-token
vocabulary, this about 1 s.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["GGUFVocab", "build_vocab", "read_metadata"]

# llama.cpp's llama_token_type.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Texts llama.cpp always treats as control tokens, whatever type the file gives them (llama-vocab.cpp:
# "control-looking token ... its type will be overridden"): Gemma 3's `</s>` is user-defined in the file.
_CONTROL_LOOKING = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
        "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|eom_id|>", "<|end_of_text|>", "<|return|>",
        "<|call|>", "</s>",
    }
)  # fmt: skip
_SPACE = "\u2581"

# GGUF value types: (struct format, numpy dtype) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF's vocabulary as the mesh uses it."""

    tokenizer: Tokenizer
    # Raw bytes of every token id (empty for control tokens): decoding is concatenating bytes.
    token_bytes: tuple[bytes, ...]
    special_token_ids: frozenset[int]
    # The id llama.cpp puts before a prompt (`tokenizer.ggml.add_bos_token`); None when it adds none.
    bos_token_id: int | None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (version 2 or 3, little-endian); numeric arrays as numpy."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        pos = 24
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _string(buf, pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            out[key], pos = _value(buf, pos + 4, kind)
        return out


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    return buf[pos + 8 : end].decode("utf-8"), end


def _value(buf: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind][0]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALARS:
        dtype = np.dtype(_SCALARS[item][1])
        end = pos + count * dtype.itemsize
        return np.frombuffer(buf[pos:end], dtype=dtype), end
    values = []
    for _ in range(count):
        value, pos = _value(buf, pos, item)
        values.append(value)
    return values, pos


def build_vocab(meta: Mapping[str, Any], path: str = "") -> GGUFVocab:
    """The tokenizer of a GGUF's metadata (`read_metadata`); ValueError for a family not supported."""
    family = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    # What llama.cpp parses as special (control) and always cuts out (user-defined).
    control = [
        i for i, t in enumerate(types) if t == _CONTROL or (t == _USER_DEFINED and tokens[i] in _CONTROL_LOOKING)
    ]
    control_set = frozenset(control)
    user = [i for i, t in enumerate(types) if t == _USER_DEFINED and i not in control_set]
    if family == "gpt2":
        tokenizer, token_bytes = _byte_level_bpe(meta, tokens, control_set)
    elif family == "llama":
        tokenizer, token_bytes = _sentencepiece_bpe(meta, tokens, types, control_set)
    else:
        raise ValueError(f"{path}: tokenizer family {family!r} is not supported (gpt2 and llama are)")
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", family == "llama"))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return GGUFVocab(
        tokenizer=tokenizer,
        token_bytes=token_bytes,
        special_token_ids=control_set,
        bos_token_id=int(bos) if add_bos and bos is not None else None,
    )


def _byte_level_bpe(
    meta: Mapping[str, Any], tokens: list[str], control: frozenset[int]
) -> tuple[Tokenizer, tuple[bytes, ...]]:
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM's pre-tokenizer (GGUF "smollm"): digits one by one, then GPT-2 byte-level splitting.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    byte_of = _byte_decoder()
    token_bytes = tuple(b"" if i in control else bytes(byte_of[ch] for ch in tok) for i, tok in enumerate(tokens))
    return tokenizer, token_bytes


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], control: frozenset[int]
) -> tuple[Tokenizer, tuple[bytes, ...]]:
    scores = [float(s) for s in meta["tokenizer.ggml.scores"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    # llama.cpp merges any adjacent pair whose concatenation is a token, highest score first: every split of
    # a token into two tokens is a merge, ranked by the token's score (ties: the pieces' ids, as Hugging
    # Face's converter ranks them).
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, i in vocab.items():
        for k in range(1, len(token)):
            left, right = vocab.get(token[:k]), vocab.get(token[k:])
            if left is not None and right is not None:
                ranked.append((-scores[i], left, right, token[:k], token[k:]))
    ranked.sort(key=lambda m: (m[0], m[1], m[2]))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab=vocab,
        merges=[(m[3], m[4]) for m in ranked],
        unk_token=tokens[int(unk)] if unk is not None else None,
        fuse_unk=False,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    # add_space_prefix (Llama 2: true, Gemma: false) puts a space before the text, as SentencePiece does.
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", _SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend(" "))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    token_bytes = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if i in control or kind in (_UNKNOWN, _UNUSED):
            token_bytes.append(b"")
        elif kind == _BYTE:
            token_bytes.append(bytes([int(tok[3:5], 16)]))
        elif kind == _USER_DEFINED:
            token_bytes.append(tok.encode("utf-8"))  # llama.cpp renders them as written, "▁" included
        else:
            token_bytes.append(tok.replace(_SPACE, " ").encode("utf-8"))
    return tokenizer, tuple(token_bytes)
