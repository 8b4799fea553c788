from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from llmmesh.gateway import complexity
from llmmesh.gateway.complexity import CONTEXT_CHARS, Complexity, request_text, score, score_request
from llmmesh.v1 import generation_pb2

PROMPTS = Path(__file__).resolve().parents[3] / "loadtest" / "prompts" / "routing.jsonl"
THRESHOLD = 0.4  # the shipped `auto` route's tier boundary


def chat(*turns: tuple[str, str]) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in turns])
    )


def test_trivial_chit_chat_scores_well_under_the_threshold() -> None:
    """Greetings and one-line facts, in English and Chinese, score under 0.2."""
    for text in ("hi", "What is the capital of France?", "Thanks, that was helpful.", "法国的首都是哪里？", "你好"):
        assert score(text).value < 0.2, text


def test_a_multi_part_proof_and_a_code_design_request_score_well_over_the_threshold() -> None:
    """A proof with an equation in several steps, and a design request naming a language, score over 0.6."""
    proof = (
        "Prove by induction that 1 + 3 + 5 + ... + (2n - 1) = n^2 for every n >= 1. First state the base case, "
        "then the inductive step, and explain why the two together are enough."
    )
    design = (
        "Design a rate limiter service in Go for a multi-tenant API: explain the data structures, show the code "
        "for the token bucket and analyse its behaviour under bursts."
    )
    assert score(proof).value > 0.6
    assert score(design).value > 0.6


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "?" * 1000,
        "```python\n" + "def f(x):\n    return x == 1 && y != 2; {}[]\n" * 200 + "```",
        "Prove, derive, design, implement, analyse, optimise, explain, compare, why? " * 50
        + r"$\int_0^1 x^2 dx$ 347 × 29 = 3x^2 + 5x - 2 1. a 2. b 3. c First, then, finally. 证明 设计 为什么",
        "Привет! " * 500,
    ],
)
def test_the_score_stays_in_zero_to_one_and_is_the_clipped_sum_of_the_features(text: str) -> None:
    """Empty, degenerate and everything-at-once texts all score within [0, 1], as the clipped feature sum."""
    c = score(text)
    assert 0.0 <= c.value <= 1.0
    assert c.value == pytest.approx(min(1.0, max(0.0, sum(c.features.values()))))
    assert set(c.features) == {"length", "task", "code", "math", "multi_step", "language"}
    assert all(v >= 0.0 for v in c.features.values())


def test_the_everything_text_saturates_at_one() -> None:
    """A text with every signal at once is clipped to exactly 1."""
    text = "Prove and derive, then design and implement in Python: ```def f(x): return x``` $\\frac{1}{2}$. Why? How?"
    assert score(text).value == 1.0


# (feature, without, with): the same request, without and with the feature's evidence.
PAIRS = [
    ("length", "Tell me about the sea.", "Tell me about the sea. " + "It is wide and deep and full of life. " * 12),
    ("task", "Tell me about photosynthesis.", "Explain photosynthesis."),
    ("task", "Tell me about the theorem.", "Prove the theorem."),
    ("task", "Parle-moi du ciel.", "Explique pourquoi le ciel est bleu."),
    ("task", "Erzähl mir vom Himmel.", "Erkläre, warum der Himmel blau ist."),
    ("task", "Háblame del cielo.", "Explica por qué el cielo es azul."),
    ("task", "天空是蓝色的。", "解释为什么天空是蓝色的。"),
    ("task", "空は青いです。", "なぜ空が青いのか説明してください。"),
    ("task", "Небо голубое.", "Объясни, почему небо голубое."),
    ("task", "Tell me about sorting.", "Tell me about sorting, step by step."),
    ("code", "What does this do?", "What does this do?\n```\nx = [i for i in range(3)]\n```"),
    ("code", "What does this line do: x equals y plus one", "What does this line do: `x = y + 1;`"),
    ("code", "Write a short text about loops.", "Write a Python function with a loop."),
    ("code", "Fix this.", "Fix this: def area(r): return 3.14 * r ** 2 if r >= 0 else None"),
    ("math", "What is the answer?", "What is the answer: 3x^2 - 5x + 2 = 0?"),
    ("math", "What is the sum?", r"What is the sum $\sum_{k=1}^{n} k$?"),
    ("math", "What is two plus two?", "What is 2 + 2?"),
    ("math", "What is 2 + 2?", "What is 347 × 29?"),
    ("math", "Tell me about the curve.", "Tell me about the integral of the curve."),
    ("math", "看一下这个。", "解这个方程。"),
    (
        "multi_step",
        "Plan a trip: where to stay, what to see, a budget.",
        "Plan a trip:\n1. where to stay\n2. what to see\n3. a budget",
    ),
    ("multi_step", "Boil the water and add the pasta.", "First boil the water, then add the pasta, finally drain it."),
    ("multi_step", "What causes rain?", "What causes rain? Why does it fall? How is it measured?"),
    ("multi_step", "总结三国的历史。", "首先总结三国的历史，然后评价诸葛亮。"),
    ("language", "What is the capital of Russia?", "Какая столица России?"),
    ("language", "What is the capital of Japan?", "日本の首都はどこですか？"),
]


@pytest.mark.parametrize(("feature", "without", "with_"), PAIRS)
def test_each_feature_moves_the_score_up(feature: str, without: str, with_: str) -> None:
    """Adding a feature's evidence to a request raises that feature's contribution and the score."""
    lo, hi = score(without), score(with_)
    assert hi.features[feature] > lo.features[feature]
    assert hi.value > lo.value


def test_a_plain_english_question_has_no_language_contribution() -> None:
    """Latin-script text, accents included, adds nothing for its script."""
    assert score("What is the capital of France?").features["language"] == 0.0
    assert score("Où se trouve la gare ? Ça coûte combien ?").features["language"] == 0.0


def test_cjk_length_is_counted_without_spaces() -> None:
    """Chinese text (no spaces) gets a length contribution like English text of as many words."""
    chinese = "我们今天在公园里散步看到了很多花" * 6  # 96 characters, about 67 words' worth
    english = " ".join(["word"] * round(96 * complexity.CJK_CHAR_WORDS))
    assert score(chinese).features["length"] == pytest.approx(score(english).features["length"], rel=0.05)
    assert score(chinese).features["length"] > 5 * score("我们今天").features["length"]


def test_a_long_text_is_scanned_at_its_start_and_end_and_its_length_saturates() -> None:
    """A question after a long pasted document still counts; what lies in the middle does not."""
    filler = "The quarterly table lists revenue by region and month. " * 200
    asked_last = score(filler + "Prove that the growth rate is bounded.")
    hidden = score(filler[:2000] + "Prove that the growth rate is bounded. " + filler[:2000])
    assert asked_last.features["task"] > 0.0
    assert hidden.features["task"] == 0.0
    assert asked_last.features["length"] == pytest.approx(complexity.LENGTH_WEIGHT, rel=0.01)


def test_a_repeated_task_word_counts_once() -> None:
    """Saying 'explain' five times is no stronger than saying it once."""
    once, five = score("Explain it."), score("Explain it. " * 5)
    assert five.features["task"] == once.features["task"]


def test_scoring_is_deterministic_and_the_result_frozen() -> None:
    """The same text always gets the same score, and a Complexity cannot be changed."""
    text = "Compare quicksort and mergesort in Python, then prove the O(n log n) bound."
    assert score(text) == score(text)
    with pytest.raises(dataclasses.FrozenInstanceError):
        score(text).value = 0.0  # type: ignore[misc]
    assert isinstance(score(text), Complexity)


def test_request_text_of_a_prompt_is_the_prompt() -> None:
    """A prompt request is scored on its prompt, as is."""
    assert request_text(generation_pb2.GenerateRequest(prompt="Why is the sky blue?")) == "Why is the sky blue?"


def test_request_text_of_a_chat_puts_the_last_user_turn_first_and_drops_system_prompts() -> None:
    """A chat is scored on its last user turn, then the earlier turns newest first, without system prompts."""
    request = chat(
        ("system", "You are a helpful assistant."),
        ("user", "Tell me about sorting."),
        ("assistant", "Sorting puts items in order."),
        ("user", "Now prove quicksort's bound."),
    )
    text = request_text(request)
    assert text.split("\n") == [
        "Now prove quicksort's bound.",
        "Sorting puts items in order.",
        "Tell me about sorting.",
    ]
    assert "helpful assistant" not in text


def test_request_text_bounds_the_earlier_turns() -> None:
    """The earlier turns add at most CONTEXT_CHARS characters, however long the conversation."""
    long_turn = "x" * 1000
    request = chat(("user", long_turn), ("assistant", long_turn), ("user", "And why?"))
    text = request_text(request)
    assert text.startswith("And why?\n")
    assert len(text) - len("And why?\n") <= CONTEXT_CHARS


def test_request_text_without_a_user_turn_uses_the_last_turn_and_of_nothing_is_empty() -> None:
    """A chat with no user turn is scored on its last message; a request with no input on ''."""
    assert request_text(chat(("system", "Be brief."))) == "Be brief."
    assert request_text(generation_pb2.GenerateRequest()) == ""


def test_score_request_weighs_the_last_user_turn_most() -> None:
    """An easy follow-up after a hard question scores under the threshold, a little above the same question
    alone, and far below the hard question asked last."""
    hard = "Prove that there are infinitely many primes, then derive the prime number theorem's error term."
    easy = "Thanks! What is the capital of France?"
    after = score_request(chat(("system", "Be brief."), ("user", hard), ("assistant", "..."), ("user", easy)))
    last = score_request(chat(("user", easy), ("assistant", "..."), ("user", hard)))
    alone = score(easy).value
    assert alone < after.value < THRESHOLD < last.value
    assert after.features["context"] > 0.0


def test_score_request_of_a_prompt_or_a_single_turn_is_the_text_score() -> None:
    """Without earlier turns, score_request is score of the prompt or the one turn."""
    text = "Explain recursion."
    assert score_request(generation_pb2.GenerateRequest(prompt=text)) == score(text)
    assert score_request(chat(("system", "Be brief."), ("user", text))) == score(text)


def _labelled() -> list[dict[str, str]]:
    return [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_labelled_set_is_mostly_on_the_right_side_of_the_threshold() -> None:
    """A sanity bar, not the measurement: on loadtest/prompts/routing.jsonl more than 60 % of the simple prompts
    score under 0.4 and more than 60 % of the complex ones at or over it; the measured shares (the tuning and
    the held-out prompts apart) are in loadtest/README.md, and this test prints them."""
    rows = _labelled()
    shares: dict[tuple[str, str], tuple[int, int]] = {}
    for split in ("tune", "holdout", "all"):
        for label in ("simple", "complex"):
            picked = [r for r in rows if r["label"] == label and split in ("all", r["split"])]
            right = sum((score(r["prompt"]).value < THRESHOLD) == (label == "simple") for r in picked)
            shares[split, label] = (right, len(picked))
            print(f"{split:8s} {label:8s} {right}/{len(picked)} = {right / len(picked):.2f} on the right side of 0.4")
    for label in ("simple", "complex"):
        right, n = shares["all", label]
        assert right / n > 0.6


def test_score_speed_is_printed() -> None:
    """Prints microseconds per prompt over the labelled set (a figure to read, not a timed assertion)."""
    prompts = [r["prompt"] for r in _labelled()]
    rounds = 5
    start = time.perf_counter()
    for _ in range(rounds):
        for p in prompts:
            score(p)
    per = (time.perf_counter() - start) / rounds / len(prompts) * 1e6
    long_text = " ".join(prompts)[:2000]
    start = time.perf_counter()
    for _ in range(50):
        score(long_text)
    print(
        f"score(): {per:.0f} µs per labelled prompt, {(time.perf_counter() - start) / 50 * 1e6:.0f} µs for 2,000 chars"
    )
