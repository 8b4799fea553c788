from __future__ import annotations

from collections import Counter

import pytest

from loadtest.routing import LARGE, POLICIES, PROMPTS, SMALL, Record, load_prompts, markdown, percentile, summarize


def rec(policy: str, label: str, model: str, cost: float, ttft: float | None = 100.0, route: str = "") -> Record:
    return Record(policy, f"p-{label}", label, "c0", model=model, route=route, cost=cost, ttft_ms=ttft)


def test_percentile_is_nearest_rank() -> None:
    """p50 of 1..10 is 5, p99 is 10, p100 the maximum; no values give None."""
    values = [float(v) for v in range(10, 0, -1)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 100) == 10.0
    assert percentile([], 50) is None


def test_summary_shares_costs_and_the_ratio_to_always_large() -> None:
    """Per policy: each model's share, the cost per 1,000 requests and its ratio to always large."""
    records = [
        rec("always large", "simple", LARGE, 0.002),
        rec("always large", "complex", LARGE, 0.004),
        rec("auto", "simple", SMALL, 0.0004),
        rec("auto", "complex", LARGE, 0.004),
        rec("auto", "simple", SMALL, 0.0004),
        rec("auto", "complex", SMALL, 0.0008),
    ]
    s = summarize(records, ["always large", "auto"])
    assert s["always large"]["cost_per_1000"] == pytest.approx(3.0)
    assert s["always large"]["cost_vs_always_large"] == pytest.approx(1.0)
    assert s["auto"]["share"] == {LARGE: 0.25, SMALL: 0.75}
    assert s["auto"]["cost_per_1000"] == pytest.approx(1.4)
    assert s["auto"]["cost_vs_always_large"] == pytest.approx(1.4 / 3.0)


def test_summary_confusion_against_the_labels() -> None:
    """Auto's confusion counts label -> model, and the shares routed the way the labels say."""
    records = [
        rec("auto", "simple", SMALL, 0.0),
        rec("auto", "simple", SMALL, 0.0),
        rec("auto", "simple", LARGE, 0.0),
        rec("auto", "complex", LARGE, 0.0),
        rec("auto", "complex", SMALL, 0.0),
    ]
    s = summarize(records, ["auto"])["auto"]
    assert s["confusion"] == {
        f"complex->{LARGE}": 1,
        f"complex->{SMALL}": 1,
        f"simple->{LARGE}": 1,
        f"simple->{SMALL}": 2,
    }
    assert s["simple_to_small"] == pytest.approx(2 / 3)
    assert s["complex_to_large"] == pytest.approx(0.5)


def test_summary_escalation_rate_and_ttft_per_answering_model() -> None:
    """The cascade's escalation rate counts routes that say 'escalated'; TTFT is split by the answering model,
    and an answer without a first token is left out of TTFT."""
    records = [
        rec("careful", "simple", SMALL, 0.0, ttft=50.0, route="careful: cascade: confident -> smollm2"),
        rec("careful", "simple", SMALL, 0.0, ttft=70.0, route="careful: cascade: confident -> smollm2"),
        rec(
            "careful", "complex", LARGE, 0.0, ttft=400.0, route="careful: cascade: escalated (mean logprob -2.7 < -1.5)"
        ),
        rec(
            "careful", "complex", LARGE, 0.0, ttft=None, route="careful: cascade: escalated (mean logprob -3.0 < -1.5)"
        ),
    ]
    s = summarize(records, ["careful"])["careful"]
    assert s["escalation_rate"] == pytest.approx(0.5)
    assert s["ttft_ms"][SMALL] == {"n": 2, "p50": 50.0, "p99": 70.0}
    assert s["ttft_ms"][LARGE] == {"n": 1, "p50": 400.0, "p99": 400.0}


def test_failed_requests_are_counted_apart() -> None:
    """A failed request counts in requests and errors, and nowhere else."""
    records = [rec("ab", "simple", SMALL, 0.001), Record("ab", "p-x", "complex", "c1", error="UNAVAILABLE")]
    s = summarize(records, ["ab"])["ab"]
    assert (s["requests"], s["errors"]) == (2, {"UNAVAILABLE": 1})
    assert s["share"] == {SMALL: 1.0}
    assert s["cost_per_1000"] == pytest.approx(1.0)
    assert s["callers"] == 2
    # No "always large" in this summary: no ratio.
    assert s["cost_vs_always_large"] is None


def test_markdown_has_one_row_per_policy() -> None:
    """The table has a header, a rule and a row per policy, missing figures shown as dashes."""
    records = [rec("always small", "simple", SMALL, 0.001), rec("always large", "simple", LARGE, 0.005)]
    table = markdown(summarize(records, ["always small", "always large"])).splitlines()
    assert len(table) == 4
    assert table[2].startswith("| always small | 1 | 0 | 100% | 1.000 | 0.20 |")
    assert "| – / – |" in table[2]  # no large-model TTFT under always small


def test_the_labelled_set_is_balanced_and_covers_the_required_kinds() -> None:
    """The shipped set: >= 240 prompts, ids unique, about half simple, >= 6 languages, code, arithmetic and
    multi-step prompts; the policies include the always-small and always-large baselines."""
    prompts = load_prompts(PROMPTS)
    assert len(prompts) >= 240
    assert len({p.id for p in prompts}) == len(prompts)
    labels = Counter(p.label for p in prompts)
    assert set(labels) == {"simple", "complex"}
    assert 0.4 < labels["simple"] / len(prompts) < 0.6
    assert len({p.language for p in prompts}) >= 6
    assert {"code", "arithmetic", "multi-step"} <= {p.category for p in prompts}
    assert [p.model for p in POLICIES[:2]] == [SMALL, LARGE]
