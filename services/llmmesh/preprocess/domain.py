"""Request validation, chat templating and tokenization. No grpc here: errors are domain errors.

A model served by an OpenAI-compatible endpoint (`remote`) is validated the same way (input, roles,
sampling ranges, stop strings) but not templated nor tokenized: the endpoint does both, so its `Prepared`
has no input ids and carries the messages exactly as they will be sent (a prompt is one user message; no
default system prompt, which the gateway would not send). Its context length is the endpoint's to check
(an over-long request comes back as the endpoint's 400, INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.model_assets import ModelAssets

__all__ = ["ChatTurn", "PrepareInput", "Prepared", "Preparer", "ResolvedSampling", "SamplingInput"]

_ROLES = frozenset({"system", "user", "assistant"})
# C0 and C1 control characters and DEL, except tab, line feed and carriage return (U+0000 included).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingInput:
    """Sampling as the client sent it: None where the field was not set."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrepareInput:
    request_id: str
    model: str
    prompt: str | None = None
    chat: tuple[ChatTurn, ...] | None = None
    sampling: SamplingInput = field(default_factory=SamplingInput)


@dataclass(frozen=True)
class ResolvedSampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass(frozen=True)
class Prepared:
    request_id: str
    model: str
    input_ids: list[int]
    end_id: int
    pad_id: int
    sampling: ResolvedSampling
    stop: tuple[str, ...]
    stop_token_ids: tuple[tuple[int, ...], ...]
    # "triton" (input_ids are the model input) or "openai" (an OpenAI-compatible endpoint: `messages` are).
    backend: str = "triton"
    # For backend openai: the (role, content) turns sent to the endpoint.
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Limits:
    default_max_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    # Ceiling on sampling.max_tokens, whatever the model's context length.
    max_tokens_limit: int = 8192
    # Characters of the prompt, or of all chat contents together.
    max_prompt_chars: int = 65536
    max_chat_messages: int = 256
    # Characters of one chat message's content.
    max_message_chars: int = 32768


class Preparer:
    """Validates, templates and tokenizes requests for the models this mesh serves."""

    def __init__(
        self,
        models: dict[str, ModelAssets],
        default_model: str,
        default_system_prompt: str = "",
        limits: Limits | None = None,
        aliases: Mapping[str, str] | None = None,
        remote: Collection[str] = (),
    ) -> None:
        # Models served by an OpenAI-compatible endpoint: no tokenizer here.
        self._remote = frozenset(remote)
        known = {*models, *self._remote}
        if default_model not in known:
            raise ValueError(f"default model {default_model!r} is not among {sorted(known)}")
        self._models = models
        self._default_model = default_model
        # More names for the models (alias -> model name): a request is prepared, and reported, under the name.
        self._aliases = dict(aliases or {})
        if unknown := {a: m for a, m in self._aliases.items() if m not in known}:
            raise ValueError(f"aliases of unknown models: {unknown}")
        self._system_prompt = default_system_prompt
        self._limits = limits or Limits()

    def prepare(self, req: PrepareInput) -> Prepared:
        self._check_input(req)
        model = req.model or self._default_model
        model = self._aliases.get(model, model)
        if model in self._remote:
            return self._prepare_remote(req, model)
        assets = self._models.get(model)
        if assets is None:
            served = ", ".join(sorted([*self._models, *self._remote, *self._aliases]))
            raise InvalidArgument("model", f"unknown model {model!r}; served: {served}")
        sampling = self._resolve_sampling(req.sampling)
        stop = self._check_stop(req.sampling.stop)
        # The model sees exactly what the caller wrote; contents are data, never control tokens.
        # A base model (completion template) continues the caller's text: no default system prompt before it.
        input_ids = assets.encode_chat(self._messages(req, system_prompt=assets.template == "chat"))
        total = len(input_ids) + sampling.max_tokens
        if total > assets.context_length:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"prompt ({len(input_ids)} tokens) + max_tokens ({sampling.max_tokens}) = {total} exceeds "
                f"the context length of {model} ({assets.context_length} tokens)",
            )
        return Prepared(
            request_id=req.request_id,
            model=model,
            input_ids=input_ids,
            end_id=assets.eos_token_id,
            pad_id=assets.pad_token_id,
            sampling=sampling,
            stop=stop,
            stop_token_ids=tuple(tuple(assets.encode_text(s)) for s in stop),
        )

    def _prepare_remote(self, req: PrepareInput, model: str) -> Prepared:
        """An OpenAI-compatible endpoint's request: validated as any other, sent as text."""
        sampling = self._resolve_sampling(req.sampling)
        stop = self._check_stop(req.sampling.stop)
        messages = self._messages(req, system_prompt=False)
        return Prepared(
            request_id=req.request_id,
            model=model,
            input_ids=[],
            end_id=0,
            pad_id=0,
            sampling=sampling,
            stop=stop,
            stop_token_ids=(),
            backend="openai",
            messages=tuple((m["role"], m["content"]) for m in messages),
        )

    def _check_input(self, req: PrepareInput) -> None:
        """Sizes and characters of the free-text fields, before any of them is used."""
        limits = self._limits
        _check_name("request_id", req.request_id)
        _check_name("model", req.model)
        if req.prompt is not None:
            if len(req.prompt) > limits.max_prompt_chars:
                raise InvalidArgument("prompt", f"at most {limits.max_prompt_chars} characters, got {len(req.prompt)}")
            _check_text("prompt", req.prompt)
        if req.chat is not None:
            if len(req.chat) > limits.max_chat_messages:
                raise InvalidArgument(
                    "chat.messages", f"at most {limits.max_chat_messages} messages, got {len(req.chat)}"
                )
            total = 0
            for i, turn in enumerate(req.chat):
                if len(turn.content) > limits.max_message_chars:
                    raise InvalidArgument(
                        f"chat.messages[{i}].content",
                        f"at most {limits.max_message_chars} characters, got {len(turn.content)}",
                    )
                _check_text(f"chat.messages[{i}].content", turn.content)
                _check_text(f"chat.messages[{i}].role", turn.role)
                total += len(turn.content)
            if total > limits.max_prompt_chars:
                raise InvalidArgument(
                    "chat.messages", f"at most {limits.max_prompt_chars} characters in all, got {total}"
                )

    def _messages(self, req: PrepareInput, *, system_prompt: bool = True) -> list[dict[str, str]]:
        if req.chat is not None:
            if not req.chat:
                raise InvalidArgument("chat.messages", "must hold at least one message")
            for i, turn in enumerate(req.chat):
                if turn.role not in _ROLES:
                    raise InvalidArgument(
                        f"chat.messages[{i}].role", f"must be one of {sorted(_ROLES)}, got {turn.role!r}"
                    )
                if not turn.content.strip():
                    raise InvalidArgument(f"chat.messages[{i}].content", "must not be empty")
            messages = [{"role": t.role, "content": t.content} for t in req.chat]
        elif req.prompt is not None and req.prompt.strip():
            messages = [{"role": "user", "content": req.prompt}]
        elif req.prompt is not None:
            raise InvalidArgument("prompt", "must not be empty")
        else:
            raise InvalidArgument("input", "set either prompt or chat")
        if system_prompt and self._system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self._system_prompt})
        return messages

    def _resolve_sampling(self, s: SamplingInput) -> ResolvedSampling:
        max_tokens = self._limits.default_max_tokens if s.max_tokens is None else s.max_tokens
        if max_tokens <= 0:
            raise InvalidArgument("sampling.max_tokens", f"must be > 0, got {max_tokens}")
        if max_tokens > self._limits.max_tokens_limit:
            raise InvalidArgument(
                "sampling.max_tokens", f"must be <= {self._limits.max_tokens_limit}, got {max_tokens}"
            )
        temperature = 1.0 if s.temperature is None else s.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument("sampling.temperature", f"must be >= 0, got {temperature}")
        top_p = 1.0 if s.top_p is None else s.top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
        top_k = 0 if s.top_k is None else s.top_k
        if top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0, got {top_k}")
        return ResolvedSampling(max_tokens, temperature, top_p, top_k, s.seed)

    def _check_stop(self, stop: tuple[str, ...]) -> tuple[str, ...]:
        limits = self._limits
        if len(stop) > limits.max_stop_strings:
            raise InvalidArgument("sampling.stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop)}")
        for i, s in enumerate(stop):
            if not s:
                raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
            if len(s) > limits.max_stop_chars:
                raise InvalidArgument(
                    f"sampling.stop[{i}]", f"at most {limits.max_stop_chars} characters, got {len(s)}"
                )
            _check_text(f"sampling.stop[{i}]", s)
        return tuple(stop)


def _check_text(field: str, text: str) -> None:
    """No control characters other than tab, line feed and carriage return."""
    found = _CONTROL.search(text)
    if found is not None:
        char = found.group()
        raise InvalidArgument(field, f"control character U+{ord(char):04X} at position {found.start()} is not allowed")


def _check_name(field: str, value: str) -> None:
    if len(value) > _MAX_NAME_CHARS:
        raise InvalidArgument(field, f"at most {_MAX_NAME_CHARS} characters, got {len(value)}")
    _check_text(field, value)
    if "\t" in value or "\n" in value or "\r" in value:
        raise InvalidArgument(field, "must not contain tabs or line breaks")
