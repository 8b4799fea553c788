"""Layered safety for prompts and streamed responses: blocked terms, PII redaction, a trained classifier.

Shared by preprocess (the prompt, `check_prompt`) and postprocess (the response, `SafetyStream`). The
policy (terms in several languages, PII placeholders, classifier model and threshold, hold-back bound)
is one versioned YAML file, `policies/default.yaml` unless a deployment names its own; `PolicyStore`
reloads it when it changes.
"""

from __future__ import annotations

from llmmesh.common.safety.blocklist import BlockedTerm, fold
from llmmesh.common.safety.classifier import (
    Classifier,
    LocalClassifier,
    StageClassifier,
    TritonClassifier,
    classifier_for,
)
from llmmesh.common.safety.pii import PiiRedactor, luhn_valid
from llmmesh.common.safety.policy import (
    DEFAULT_POLICY_PATH,
    VOICE_POLICY_PATH,
    ClassifierSettings,
    PiiSettings,
    PolicyError,
    PolicyStore,
    SafetyPolicy,
    load_policy,
)
from llmmesh.common.safety.stream import SafetyStream, SafetyVerdict, check_prompt, split_units

__all__ = [
    "DEFAULT_POLICY_PATH",
    "VOICE_POLICY_PATH",
    "BlockedTerm",
    "Classifier",
    "ClassifierSettings",
    "LocalClassifier",
    "PiiRedactor",
    "PiiSettings",
    "PolicyError",
    "PolicyStore",
    "SafetyPolicy",
    "SafetyStream",
    "SafetyVerdict",
    "StageClassifier",
    "TritonClassifier",
    "check_prompt",
    "classifier_for",
    "fold",
    "load_policy",
    "luhn_valid",
    "split_units",
]
