"""The safety policy: one versioned YAML file, validated, compiled once, reloaded when it changes.

A policy is immutable once loaded. A stream keeps the policy it started with; `PolicyStore.current()`
hands new streams the newest valid one, so an edit to the file reaches new responses within the
check interval and never changes a response half-way.

A file may start from another (`extends: default.yaml`, relative to itself) and name only what differs:
mappings merge key by key, anything else (a list of terms, a number) replaces the other file's. It names
its own `version`. A change to either file reloads the policy.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from llmmesh.common.logging import get_logger
from llmmesh.common.safety.blocklist import BlockedTerm, TermMatcher
from llmmesh.common.safety.pii import PiiRedactor

__all__ = [
    "DEFAULT_POLICY_PATH",
    "VOICE_POLICY_PATH",
    "ClassifierSettings",
    "PiiSettings",
    "PolicyError",
    "PolicyStore",
    "SafetyPolicy",
    "load_policy",
]

DEFAULT_POLICY_PATH = Path(__file__).with_name("policies") / "default.yaml"
# The voice layout's: the default with the classifier in the stage's process (`llmmesh up --voice`).
VOICE_POLICY_PATH = DEFAULT_POLICY_PATH.with_name("voice.yaml")

_Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class PolicyError(ValueError):
    """The policy file is missing, not YAML, or breaks the schema; the message names the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PiiSettings(_Frozen):
    """Which personal data is replaced, and by what; a placeholder of null turns that kind off."""

    enabled: bool = True
    email: str | None = "[EMAIL]"
    phone: str | None = "[PHONE]"
    card: str | None = "[CARD]"

    def redactor(self) -> PiiRedactor:
        if not self.enabled:
            return PiiRedactor(None, None, None)
        return PiiRedactor(self.email or None, self.phone or None, self.card or None)


class ClassifierSettings(_Frozen):
    """The trained classifier: Triton model, threshold on P(unsafe), and the unit it scores."""

    enabled: bool = True
    # Where texts are scored: "triton" (the model `model` on Triton: alt-profanity-check on CPU, a Llama
    # Guard-style model in the same slot on GPU), or "stage" (alt-profanity-check in each stage's own
    # process, `model` unused: no round trip to Triton before a prompt is let through or a clause spoken;
    # the CPU model only, and its work on the stages' CPU instead of Triton's).
    runs_in: Literal["triton", "stage"] = "triton"
    model: _Name = "safety_classifier"
    threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    # The finish category of a block by the classifier (it scores one class: unsafe).
    category: _Name = "toxicity"
    # Text is scored a sentence at a time; with no sentence end, this many characters at most.
    window_chars: int = Field(default=200, ge=16)
    # Score the prompt too (check_prompt).
    check_prompts: bool = True
    # When the prompt's score is known: "before" the model starts (a prompt the classifier blocks costs no
    # model time), or "alongside" its start (the gateway starts the generation, holds every part of the
    # answer until the score is in, and cancels the generation and ends with CONTENT_FILTER if it blocks:
    # the classifier's call leaves the first token's path; a blocked prompt may have cost some prefill, and
    # nothing of its answer is released). Blocked terms are checked before the model starts either way.
    prompt_check: Literal["before", "alongside"] = "before"
    # The unit a response is released at when its request asks for CLAUSE chunking (voice): "sentence"
    # holds each sentence until the whole of it is scored; "clause" scores and releases each clause (with
    # the sentence so far as context) and the whole sentence again when it completes, ending the stream
    # with CONTENT_FILTER if it then fails: its earlier clauses have already been released (spoken).
    # Other chunking modes always release whole sentences.
    release: Literal["sentence", "clause"] = "sentence"


class _HoldSettings(_Frozen):
    # No layer holds back more than this many characters; past it, text is checked with what is there.
    max_chars: int = Field(default=256, ge=16)


class _PolicyFile(_Frozen):
    version: _Name
    description: str = ""
    hold: _HoldSettings = _HoldSettings()
    # language -> category -> terms
    blocklist: dict[_Name, dict[_Name, list[str]]] = Field(default_factory=dict)
    pii: PiiSettings = PiiSettings()
    classifier: ClassifierSettings = ClassifierSettings()

    @model_validator(mode="after")
    def _consistent(self) -> _PolicyFile:
        if self.classifier.window_chars > self.hold.max_chars:
            raise ValueError(
                f"classifier.window_chars ({self.classifier.window_chars}) exceeds hold.max_chars "
                f"({self.hold.max_chars})"
            )
        for language, categories in self.blocklist.items():
            for category, terms in categories.items():
                for term in terms:
                    if not term.strip():
                        raise ValueError(f"blocklist.{language}.{category}: empty term")
                    if len(term) > self.hold.max_chars:
                        raise ValueError(f"blocklist.{language}.{category}: term longer than hold.max_chars")
        return self


class SafetyPolicy:
    """One loaded policy: its version, blocked terms (compiled), PII and classifier settings."""

    def __init__(
        self,
        raw: _PolicyFile,
        digest: str,
        path: Path | None,
        extra_terms: Iterable[BlockedTerm] = (),
        files: tuple[Path, ...] = (),
    ):
        self.version: str = raw.version
        # First 12 hex digits of the file's SHA-256: tells two edits apart that kept the version.
        self.digest = digest
        self.path = path
        # Every file it was read from: `path`, then what it extends (PolicyStore watches them all).
        self.files: tuple[Path, ...] = files or ((path,) if path is not None else ())
        self.max_hold_chars: int = raw.hold.max_chars
        self.terms: tuple[BlockedTerm, ...] = (
            *(
                BlockedTerm(term.strip(), category, language)
                for language, categories in raw.blocklist.items()
                for category, terms in categories.items()
                for term in terms
            ),
            *extra_terms,
        )
        self.pii = raw.pii
        self.classifier = raw.classifier
        self.languages: tuple[str, ...] = tuple(raw.blocklist)
        self.matcher = TermMatcher(self.terms)
        self.redactor = self.pii.redactor()

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(t.category for t in self.terms)

    def __repr__(self) -> str:
        return f"SafetyPolicy(version={self.version!r}, digest={self.digest!r}, terms={len(self.terms)})"


_MAX_EXTENDS = 4


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        out[key] = _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return out


def _read(file: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], tuple[Path, ...], bytes]:
    """The file's mapping with what it extends merged under it; the files read (this one, then what it
    extends) and their bytes. `seen`: the files that extend this one (a loop is an error)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        doc: Any = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{file}: the policy must be a mapping with a version")
    base_name = doc.pop("extends", None)
    if base_name is None:
        return doc, (file,), data
    if not isinstance(base_name, str) or not base_name.strip():
        raise PolicyError(f"{file}: extends: the path of another policy file, relative to this one")
    if "version" not in doc:
        raise PolicyError(f"{file}: version: a policy that extends another names its own version")
    base = (file.parent / base_name.strip()).resolve()
    if base in {f.resolve() for f in (file, *seen)} or len(seen) >= _MAX_EXTENDS:
        raise PolicyError(f"{file}: extends: {base_name} leads back to itself or is more than {_MAX_EXTENDS} deep")
    base_doc, base_files, base_data = _read(base, (file, *seen))
    return _merged(base_doc, doc), (file, *base_files), data + b"\0" + base_data


def _parse(doc: dict[str, Any], where: str) -> _PolicyFile:
    try:
        return _PolicyFile.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise PolicyError(f"{where}: {problems}") from None


def load_policy(path: str | Path | None = None, extra_terms: Iterable[BlockedTerm] = ()) -> SafetyPolicy:
    """Reads, validates and compiles a policy file (None: the default policy shipped with llmmesh), with the
    file it extends, if any.

    `extra_terms` are added to the file's blocklist (the deployment's own terms from settings).
    """
    file = Path(path) if path is not None else DEFAULT_POLICY_PATH
    doc, files, data = _read(file)
    raw = _parse(doc, str(file))
    try:
        return SafetyPolicy(raw, hashlib.sha256(data).hexdigest()[:12], file, tuple(extra_terms), files)
    except ValueError as exc:
        raise PolicyError(f"{file}: {exc}") from None


def _stamp(paths: Iterable[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    def one(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        # The inode too: an atomic replace (write elsewhere, rename) may keep mtime and size.
        return st.st_mtime_ns, st.st_size, st.st_ino

    return tuple(one(p) for p in paths)


class PolicyStore:
    """The newest valid policy from a file, re-read when the file changes (checked at most every interval).

    The first load must succeed (it raises PolicyError). Later, a broken or missing file keeps the last
    good policy and logs an error once per change of the file.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        check_interval: float = 1.0,
        extra_terms: Iterable[BlockedTerm] = (),
    ) -> None:
        self.path = Path(path) if path is not None else DEFAULT_POLICY_PATH
        self._interval = check_interval
        self._extra = tuple(extra_terms)
        # Stamped before reading: a change made while it is read is seen at the next check.
        stamp = _stamp([self.path])
        self._policy = load_policy(self.path, self._extra)
        self._stamp = stamp if self._policy.files == (self.path,) else _stamp(self._policy.files)
        self._next_check = time.monotonic() + check_interval

    def current(self) -> SafetyPolicy:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._interval
            self._reload_if_changed()
        return self._policy

    def _reload_if_changed(self) -> None:
        # The files the current policy came from; a reload that fails keeps watching those.
        files = self._policy.files
        stamp = _stamp(files)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            policy = load_policy(self.path, self._extra)
            self._stamp = _stamp(policy.files) if policy.files != files else stamp
        except PolicyError as exc:
            # A fresh logger each time (reloads are rare): one cached at import would miss test captures.
            get_logger(__name__).error(
                "safety_policy_reload_failed", path=str(self.path), error=str(exc), kept_version=self._policy.version
            )
            return
        old, self._policy = self._policy, policy
        get_logger(__name__).info(
            "safety_policy_reloaded",
            path=str(self.path),
            version=policy.version,
            digest=policy.digest,
            previous_version=old.version,
        )
