"""`llmmesh up`'s layout options: which stages run in the gateway, and the voice layout's policy."""

from __future__ import annotations

import pytest

from llmmesh.cli import layout, main
from llmmesh.common.safety import VOICE_POLICY_PATH


def test_without_voice_the_named_stages_and_nothing_else() -> None:
    assert layout([], False) == ((), {})
    assert layout(["postprocess"], False) == (("postprocess",), {})


def test_voice_puts_both_stages_in_the_gateway_with_the_voice_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMMESH_PREPROCESS_SAFETY_POLICY_PATH", raising=False)
    monkeypatch.setenv("LLMMESH_POSTPROCESS_SAFETY_POLICY_PATH", "/etc/mine.yaml")
    stages, env = layout(["postprocess"], True)
    assert stages == ("preprocess", "postprocess")
    # A policy the environment names is kept; otherwise policies/voice.yaml.
    assert env == {
        "LLMMESH_PREPROCESS_SAFETY_POLICY_PATH": str(VOICE_POLICY_PATH),
        "LLMMESH_POSTPROCESS_SAFETY_POLICY_PATH": "/etc/mine.yaml",
    }


def test_up_accepts_voice() -> None:
    with pytest.raises(SystemExit) as info:
        main(["up", "--voice", "--help"])
    assert info.value.code == 0
