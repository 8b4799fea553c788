from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from llmmesh.common.safety import (
    DEFAULT_POLICY_PATH,
    BlockedTerm,
    PolicyError,
    PolicyStore,
    load_policy,
)

MINIMAL = """
version: "{version}"
blocklist:
  en:
    profanity: [darn]
classifier:
  threshold: 0.75
  window_chars: 120
"""


def _write(path: Path, text: str, bump: int = 0) -> Path:
    path.write_text(text, encoding="utf-8")
    if bump:
        # Filesystems with coarse timestamps could give two writes one mtime: move it on explicitly.
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))
    return path


def test_default_policy_has_a_version_and_lists_for_several_languages() -> None:
    """The shipped policy loads, carries a version and blocks terms in at least en, de, fr and es."""
    policy = load_policy()
    assert policy.path == DEFAULT_POLICY_PATH
    assert policy.version
    assert len(policy.digest) == 12
    assert {"en", "de", "fr", "es"} <= set(policy.languages)
    assert {"profanity", "slur", "violence"} <= policy.categories
    for language in ("en", "de", "fr", "es"):
        found = {t.category for t in policy.terms if t.language == language}
        assert found == {"profanity", "slur", "violence"}, language
    assert policy.classifier.enabled and 0 < policy.classifier.threshold <= 1
    assert policy.classifier.window_chars <= policy.max_hold_chars
    assert policy.pii.email == "[EMAIL]"


def test_a_policy_file_sets_terms_and_classifier_settings(tmp_path: Path) -> None:
    """Terms get their language and category; unset settings keep their defaults."""
    policy = load_policy(_write(tmp_path / "p.yaml", MINIMAL.format(version="7")))
    assert policy.version == "7"
    assert policy.terms == (BlockedTerm("darn", "profanity", "en"),)
    assert policy.classifier.threshold == 0.75
    assert policy.classifier.window_chars == 120
    assert policy.classifier.model == "safety_classifier"
    assert policy.max_hold_chars == 256


def test_extra_terms_are_added_to_the_file_s_blocklist(tmp_path: Path) -> None:
    """Deployment-specific terms (from settings) join the policy's terms."""
    policy = load_policy(_write(tmp_path / "p.yaml", MINIMAL.format(version="1")), [BlockedTerm("Berlin", "custom")])
    assert policy.matcher.find("the capital is Berlin.") == "custom"
    assert policy.matcher.find("darn it") == "profanity"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("blocklist: {}", "version"),
        ('version: ""', "version"),
        ('version: "1"\nclassifier: {threshold: 1.5}', "classifier.threshold"),
        ('version: "1"\nclassifier: {window_chars: 300}\nhold: {max_chars: 100}', "window_chars"),
        ('version: "1"\nsurprise: true', "surprise"),
        ('version: "1"\nblocklist: {en: {profanity: ["  "]}}', "blocklist.en.profanity"),
        ("version: [unclosed", "not valid YAML"),
        ("- a list", "mapping"),
    ],
)
def test_a_broken_policy_is_refused_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    """Schema errors raise PolicyError naming the offending key."""
    with pytest.raises(PolicyError, match=message):
        load_policy(_write(tmp_path / "p.yaml", text))


def test_a_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    """A path that does not exist raises PolicyError, not a bare OSError."""
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")


def test_store_reloads_when_the_file_changes(tmp_path: Path) -> None:
    """After an edit, current() returns the new policy; without one, the same object."""
    path = _write(tmp_path / "p.yaml", MINIMAL.format(version="1"))
    store = PolicyStore(path, check_interval=0)
    first = store.current()
    assert store.current() is first
    _write(path, MINIMAL.format(version="2"), bump=1)
    with capture_logs() as logs:
        assert store.current().version == "2"
    assert [e["event"] for e in logs] == ["safety_policy_reloaded"]
    assert logs[0]["previous_version"] == "1"


def test_store_checks_the_file_at_most_once_per_interval(tmp_path: Path) -> None:
    """Within the check interval an edit is not seen yet (current() stays cheap)."""
    path = _write(tmp_path / "p.yaml", MINIMAL.format(version="1"))
    store = PolicyStore(path, check_interval=3600)
    _write(path, MINIMAL.format(version="2"), bump=1)
    assert store.current().version == "1"


def test_store_keeps_the_last_good_policy_when_the_file_breaks(tmp_path: Path) -> None:
    """A broken edit is logged once and the previous policy stays; a fixed file is picked up again."""
    path = _write(tmp_path / "p.yaml", MINIMAL.format(version="1"))
    store = PolicyStore(path, check_interval=0)
    _write(path, 'version: "2"\nclassifier: {threshold: 7}', bump=1)
    with capture_logs() as logs:
        assert store.current().version == "1"
        assert store.current().version == "1"
    assert [e["event"] for e in logs] == ["safety_policy_reload_failed"]
    assert logs[0]["log_level"] == "error" and "threshold" in logs[0]["error"]
    path.unlink()
    with capture_logs() as logs:
        assert store.current().version == "1"
    assert [e["event"] for e in logs] == ["safety_policy_reload_failed"]
    _write(path, MINIMAL.format(version="3"), bump=2)
    assert store.current().version == "3"


def test_store_refuses_to_start_without_a_valid_policy(tmp_path: Path) -> None:
    """There is no previous policy to fall back on at start: a broken file raises."""
    with pytest.raises(PolicyError):
        PolicyStore(_write(tmp_path / "p.yaml", "version: [x"))


def test_the_classifier_runs_in_triton_unless_the_policy_says_stage(tmp_path: Path) -> None:
    """`classifier.runs_in` defaults to triton, accepts stage, and names itself when given anything else."""
    assert load_policy().classifier.runs_in == "triton"
    stage = _write(tmp_path / "stage.yaml", 'version: "s"\nclassifier: {runs_in: stage}\n')
    assert load_policy(stage).classifier.runs_in == "stage"
    wrong = _write(tmp_path / "wrong.yaml", 'version: "w"\nclassifier: {runs_in: gpu}\n')
    with pytest.raises(PolicyError, match="runs_in"):
        load_policy(wrong)


def test_the_voice_policy_is_the_default_with_the_classifier_in_the_stage() -> None:
    """policies/voice.yaml extends default.yaml: its own version and digest, runs_in stage, all else the same."""
    from llmmesh.common.safety import VOICE_POLICY_PATH

    voice, default = load_policy(VOICE_POLICY_PATH), load_policy()
    assert voice.classifier.runs_in == "stage" and default.classifier.runs_in == "triton"
    assert voice.version != default.version and voice.digest != default.digest
    assert voice.classifier.model_copy(update={"runs_in": "triton"}) == default.classifier
    assert (voice.terms, voice.pii, voice.max_hold_chars) == (default.terms, default.pii, default.max_hold_chars)
    assert [p.name for p in voice.files] == ["voice.yaml", "default.yaml"]


def test_a_policy_that_extends_another_merges_mappings_and_replaces_the_rest(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", MINIMAL.format(version="base") + "pii: {email: '[MAIL]', phone: null}\n")
    child = _write(
        tmp_path / "child.yaml",
        'extends: base.yaml\nversion: "child"\nblocklist: {en: {profanity: [heck]}}\nclassifier: {threshold: 0.5}\n',
    )
    policy = load_policy(child)
    assert policy.version == "child"
    assert [t.term for t in policy.terms] == ["heck"]  # a list replaces the base's
    assert (policy.classifier.threshold, policy.classifier.window_chars) == (0.5, 120)  # mappings merge
    assert (policy.pii.email, policy.pii.phone) == ("[MAIL]", None)


def test_extends_needs_its_own_version_an_existing_base_and_no_loop(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", MINIMAL.format(version="base"))
    no_version = _write(tmp_path / "a.yaml", "extends: base.yaml\nclassifier: {threshold: 0.5}\n")
    with pytest.raises(PolicyError, match=r"a\.yaml: version"):
        load_policy(no_version)
    missing = _write(tmp_path / "b.yaml", 'extends: nowhere.yaml\nversion: "b"\n')
    with pytest.raises(PolicyError, match=r"nowhere\.yaml: cannot read"):
        load_policy(missing)
    _write(tmp_path / "c.yaml", 'extends: d.yaml\nversion: "c"\n')
    loop = _write(tmp_path / "d.yaml", 'extends: c.yaml\nversion: "d"\n')
    with pytest.raises(PolicyError, match="leads back to itself"):
        load_policy(loop)


def test_the_store_reloads_when_the_extended_file_changes(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", MINIMAL.format(version="base-1"))
    child = _write(tmp_path / "child.yaml", 'extends: base.yaml\nversion: "child"\nclassifier: {runs_in: stage}\n')
    store = PolicyStore(child, check_interval=0.0)
    assert store.current().classifier.threshold == 0.75
    _write(base, MINIMAL.format(version="base-2").replace("0.75", "0.5"), bump=1)
    policy = store.current()
    assert (policy.version, policy.classifier.threshold, policy.classifier.runs_in) == ("child", 0.5, "stage")
