"""A model's tokenizer from a Hugging Face model folder: `tokenizer.json` and its `tokenizer_config.json`.

A model folder as Hugging Face ships it holds the tokenizer (`tokenizer.json`, loaded by the `tokenizers`
library itself) and, beside it, `tokenizer_config.json`: the chat template (or a `chat_template.jinja`
file), the BOS/EOS/PAD tokens, the special tokens (`added_tokens_decoder`) and `model_max_length`
(else `config.json`'s `max_position_embeddings`). `load_hf_tokenizer` reads them into what
`llmmesh.common.model_assets` needs, the same fields a GGUF gives (`llmmesh.common.gguf_vocab`).

Two vocabulary families are understood, the two the GGUF path knows: byte-level BPE (a `ByteLevel`
decoder: GPT-2, SmolLM, Llama 3, Qwen) and SentencePiece-style BPE (`▁` for spaces, `<0xXX>` byte
fallback: Llama 2, Mistral, Gemma). Special tokens (the `added_tokens` marked special) are the ones user
text can never spell: ModelAssets encodes user text with special-token parsing off.

`write_hf_tokenizer` goes the other way for a byte-level BPE GGUF: it writes the folder Hugging Face's
converters make from the GGUF's vocabulary (no model hub is reachable here; the tests check that folder
against llama.cpp's own tokenization).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from llmmesh.common.gguf_vocab import _byte_decoder, read_metadata

__all__ = ["HFTokenizer", "hf_tokenizer_file", "load_hf_tokenizer", "write_hf_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# transformers writes this (int(1e30)) when a tokenizer does not know its model's limit.
_NO_LIMIT = 10**9
_SPACE = "\u2581"
# llama.cpp's token types (gguf_vocab): control tokens are special, user-defined ones plain added tokens.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass(frozen=True)
class HFTokenizer:
    """What a Hugging Face tokenizer folder says about its model, in the GGUF path's terms."""

    tokenizer: Tokenizer
    # Raw bytes of every token id (empty for special tokens): decoding is concatenating bytes.
    token_bytes: tuple[bytes, ...]
    special_token_ids: frozenset[int]
    eos_token_id: int
    pad_token_id: int
    # The id put before every prompt (`add_bos_token`, or the post-processor's template); None: none is.
    bos_token_id: int | None
    chat_template: str
    context_length: int


def hf_tokenizer_file(path: str | Path) -> Path | None:
    """The tokenizer.json a registry's `tokenizer:` names: a file ending in `.json`, or a folder holding
    tokenizer.json; None for anything else (a GGUF)."""
    p = Path(path)
    if p.is_dir():
        return p / TOKENIZER_FILE
    return p if p.suffix == ".json" else None


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """Loads a tokenizer.json (or the folder holding one) with its sibling tokenizer_config.json.

    A missing file is a FileNotFoundError, a file that is not what it should be a ValueError; both name
    the file.
    """
    file = hf_tokenizer_file(path) or Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {file}")
    config_file = file.with_name(CONFIG_FILE)
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no such file: {config_file} (a tokenizer.json needs its tokenizer_config.json: EOS token, chat template)"
        )
    raw = _read_json(file)
    config = _read_json(config_file)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise ValueError(f"{file}: not a valid tokenizer.json: {exc}") from None
    special = _special_ids(tokenizer, raw, config, config_file)
    eos = _token_id(tokenizer, config, "eos_token", config_file)
    if eos is None:
        raise ValueError(f"{config_file}: no eos_token")
    pad = _token_id(tokenizer, config, "pad_token", config_file)
    return HFTokenizer(
        tokenizer=tokenizer,
        token_bytes=_token_bytes(tokenizer, raw, special, file),
        special_token_ids=special,
        eos_token_id=eos,
        pad_token_id=eos if pad is None else pad,
        bos_token_id=_bos(tokenizer, config, config_file),
        chat_template=_chat_template(config, config_file),
        context_length=_context_length(config, config_file),
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{file}: not a JSON object")
    return doc


def _special_ids(
    tokenizer: Tokenizer, raw: Mapping[str, Any], config: Mapping[str, Any], config_file: Path
) -> frozenset[int]:
    """The added tokens marked special, in tokenizer.json or in tokenizer_config.json's
    `added_tokens_decoder` (transformers adds the latter's tokens when it loads a tokenizer: so do we)."""
    special = {int(t["id"]) for t in raw.get("added_tokens") or () if t.get("special")}
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        content = token.get("content") if isinstance(token, dict) else None
        if not isinstance(content, str) or not str(key).isdigit():
            raise ValueError(f"{config_file}: added_tokens_decoder[{key!r}] is not a token")
        found = tokenizer.token_to_id(content)
        if found is None or (token.get("special") and found not in special):
            added = AddedToken(content, special=bool(token.get("special")), normalized=False)
            if token.get("special"):
                tokenizer.add_special_tokens([added])
            else:
                tokenizer.add_tokens([added])
            found = tokenizer.token_to_id(content)
        if found != int(key):
            raise ValueError(f"{config_file}: added_tokens_decoder gives {content!r} id {key}, the tokenizer {found}")
        if token.get("special"):
            special.add(found)
    return frozenset(special)


def _token_text(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_id(tokenizer: Tokenizer, config: Mapping[str, Any], key: str, config_file: Path) -> int | None:
    text = _token_text(config, key)
    if text is None:
        return None
    found = tokenizer.token_to_id(text)
    if found is None:
        raise ValueError(f"{config_file}: {key} {text!r} is not in the tokenizer's vocabulary")
    return int(found)


def _bos(tokenizer: Tokenizer, config: Mapping[str, Any], config_file: Path) -> int | None:
    """The BOS id when a prompt starts with it: `add_bos_token` when the config says (transformers' Llama
    and Gemma tokenizers obey it), else whatever special token the post-processor puts first."""
    bos = _token_id(tokenizer, config, "bos_token", config_file)
    if "add_bos_token" in config:
        return bos if config["add_bos_token"] and bos is not None else None
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain else None


def _chat_template(config: Mapping[str, Any], config_file: Path) -> str:
    """The chat template: `chat_template.jinja` beside the config (newer folders), else the config's own
    (a string, or a list of named templates: the one named "default")."""
    jinja = config_file.with_name("chat_template.jinja")
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template") or ""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or ""
    if not isinstance(template, str):
        raise ValueError(f"{config_file}: chat_template is neither text nor a list of named templates")
    return template


def _context_length(config: Mapping[str, Any], config_file: Path) -> int:
    limit = config.get("model_max_length")
    if isinstance(limit, int | float) and 0 < limit < _NO_LIMIT:
        return int(limit)
    model_config = config_file.with_name("config.json")
    if model_config.is_file():
        positions = _read_json(model_config).get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            return positions
    raise ValueError(
        f"{config_file}: no context length (model_max_length, or max_position_embeddings in config.json beside it)"
    )


def _token_bytes(
    tokenizer: Tokenizer, raw: Mapping[str, Any], special: frozenset[int], file: Path
) -> tuple[bytes, ...]:
    """Every id's raw bytes, as the decoder spells them: GPT-2's byte-to-unicode table for a byte-level
    vocabulary; "▁" for a space and `<0xXX>` for a byte in a SentencePiece-style one."""
    model = raw.get("model") or {}
    decoders = _decoder_types(raw.get("decoder"))
    added = {int(t["id"]) for t in raw.get("added_tokens") or ()}
    byte_level = "ByteLevel" in decoders
    if not byte_level and not ("Metaspace" in decoders or model.get("byte_fallback") or "Replace" in decoders):
        supported = "byte-level BPE and SentencePiece-style are"
        raise ValueError(f"{file}: decoder {sorted(decoders) or 'none'} is not supported ({supported})")
    byte_of = _byte_decoder()
    out: list[bytes] = []
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(i)
        if token is None or i in special:
            out.append(b"")
        elif i in added:
            out.append(token.encode("utf-8"))  # added tokens are matched, and rendered, as written
        elif byte_level:
            try:
                out.append(bytes(byte_of[ch] for ch in token))
            except KeyError:
                raise ValueError(f"{file}: token {i} {token!r} is not byte-level BPE") from None
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.append(bytes([int(token[3:5], 16)]))
        else:
            out.append(token.replace(_SPACE, " ").encode("utf-8"))
    return tuple(out)


def _decoder_types(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    found = {str(decoder.get("type"))}
    for inner in decoder.get("decoders") or ():
        found |= _decoder_types(inner)
    return found


def write_hf_tokenizer(gguf: str | Path, folder: str | Path) -> Path:
    """Writes a byte-level BPE GGUF's tokenizer as a Hugging Face folder (tokenizer.json and
    tokenizer_config.json, laid out as Hugging Face's GPT-2-style tokenizer files are) and returns the
    tokenizer.json's path.

    Made as Hugging Face's converters make it: a BPE model of the GGUF's vocabulary and merges, a ByteLevel
    pre-tokenizer without prefix space (after single-digit splitting for SmolLM's `smollm` pre-tokenizer)
    and ByteLevel decoder; control tokens (type 3) added as special, user-defined ones (type 4) as plain
    added tokens; the config holds the chat template, BOS/EOS/PAD/UNK and the context length.
    """
    meta = read_metadata(gguf)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf}: only byte-level BPE GGUFs (tokenizer.ggml.model gpt2) can be written")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "gpt-2", "default"):
        raise ValueError(f"{gguf}: pre-tokenizer {pre!r} is not supported (smollm, gpt-2)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pretokenizers = [{"type": "Digits", "individual_digits": True}] if pre == "smollm" else []
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t == _CONTROL,
        }
        for i, t in enumerate(types)
        if t in (_CONTROL, _USER_DEFINED)
    ]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*pretokenizers, byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]],
        },
    }
    arch = meta["general.architecture"]

    def named(key: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else tokens[int(value)]

    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "bos_token": named("bos"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": named("eos"),
        "model_max_length": int(meta[f"{arch}.context_length"]),
        "pad_token": named("padding") or named("eos"),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": named("unknown"),
        "vocab_size": len(tokens),
    }
    if "tokenizer.ggml.add_bos_token" in meta:
        config["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_FILE).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (out / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out / TOKENIZER_FILE
