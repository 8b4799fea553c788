"""SafetyStream and check_prompt with a scripted classifier (these tests are about the caller of the
classifier; the real model behind Triton is tested end to end in tests/e2e/test_safety_classifier.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.common.errors import Unavailable
from llmmesh.common.safety import SafetyPolicy, SafetyStream, SafetyVerdict, check_prompt, load_policy, split_units
from llmmesh.postprocess.chunker import Chunker, ChunkingMode

POLICY_YAML = """
version: "test-1"
hold: {max_chars: 64}
blocklist:
  en:
    profanity: [darn]
    violence: [kill yourself]
classifier: {threshold: 0.8, window_chars: 40, category: toxicity}
"""


class ScriptedClassifier:
    """Scores a text 1.0 if it contains a marker word, else 0.0; records every call and its timeout."""

    def __init__(self, marker: str = "nasty") -> None:
        self.marker = marker
        self.calls: list[list[str]] = []
        self.timeouts: list[float | None] = []

    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        self.calls.append(list(texts))
        self.timeouts.append(timeout)
        return [1.0 if self.marker in t else 0.0 for t in texts]

    @property
    def scored(self) -> list[str]:
        return [t for call in self.calls for t in call]


class BrokenClassifier:
    async def score(self, texts: list[str], timeout: float | None = None) -> list[float]:
        raise Unavailable("classifier down")


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> SafetyPolicy:
    path = tmp_path_factory.mktemp("policy") / "p.yaml"
    path.write_text(POLICY_YAML, encoding="utf-8")
    return load_policy(path)


async def _run(stream: SafetyStream, pieces: list[str]) -> list[SafetyVerdict]:
    verdicts = []
    for i, piece in enumerate(pieces):
        verdict = await stream.push(piece, final=i == len(pieces) - 1)
        verdicts.append(verdict)
        if verdict.blocked:
            break
    return verdicts


def _text(verdicts: list[SafetyVerdict]) -> str:
    return "".join(v.text for v in verdicts)


async def test_sentences_are_released_only_after_they_are_scored(policy: SafetyPolicy) -> None:
    """Each sentence is held until complete, scored once, then released whole."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier)
    pieces = ["Hello", " there", ".", " How", " are", " you", "?", " Fine", "."]
    verdicts = await _run(stream, pieces)
    assert [v.text for v in verdicts] == ["", "", "", "Hello there. ", "", "", "", "How are you? ", "Fine."]
    assert classifier.scored == ["Hello there. ", "How are you? ", "Fine."]
    assert stream.finished and stream.blocked is None


async def test_an_unsafe_sentence_ends_the_stream_and_is_never_released(policy: SafetyPolicy) -> None:
    """A unit scored at or above the threshold blocks with the classifier's category; nothing of it leaks."""
    stream = SafetyStream(policy, ScriptedClassifier())
    verdicts = await _run(stream, ["Fine here. ", "You are", " nasty", " people. ", "More."])
    assert verdicts[-1] == SafetyVerdict("", "toxicity")
    assert "nasty" not in _text(verdicts)
    assert _text(verdicts) == "Fine here. "
    assert await stream.push("after") == SafetyVerdict("", "toxicity")


async def test_without_a_sentence_end_the_window_bounds_the_hold(policy: SafetyPolicy) -> None:
    """A long run with no sentence end is scored and released in windows, cut at spaces."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier)
    words = [f" word{i}" for i in range(30)]
    verdicts = await _run(stream, [*words, ""])
    assert _text(verdicts) == "".join(words)
    assert all(len(t) <= 40 for t in classifier.scored)
    assert stream.held_chars == 0
    assert len(classifier.scored) > 3


async def test_the_classifier_sees_redacted_text(policy: SafetyPolicy) -> None:
    """PII is replaced before scoring and before release."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier)
    verdicts = await _run(stream, ["Write", " to", " ann", "@", "example", ".org", " today", ".", ""])
    assert _text(verdicts) == "Write to [EMAIL] today."
    assert classifier.scored == ["Write to [EMAIL] today."]
    assert stream.redacted == {"email": 1}


async def test_a_blocked_term_split_across_pieces_ends_the_stream(policy: SafetyPolicy) -> None:
    """Layer 1 blocks before the classifier is asked, and the held sentence is dropped."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier)
    verdicts = await _run(stream, ["Ok. ", "Go kill", " your", "self", " now."])
    assert verdicts[-1] == SafetyVerdict("", "violence")
    assert _text(verdicts) == "Ok. "
    assert all("kill" not in t for t in classifier.scored)


async def test_without_a_classifier_only_terms_and_pii_hold_text(policy: SafetyPolicy) -> None:
    """No classifier: text flows as soon as the blocklist and PII layers allow."""
    stream = SafetyStream(policy)
    verdicts = await _run(stream, ["Hello", " world", ", da", "rn", " it", ""])
    assert verdicts[-1].blocked == "profanity"
    stream = SafetyStream(policy)
    verdicts = await _run(stream, ["Hello", " world", ", dar", "ling", ""])
    assert [v.text for v in verdicts] == ["", "Hello ", "world, ", "", "darling"]


async def test_a_disabled_classifier_is_not_called(tmp_path: Path) -> None:
    """classifier.enabled: false in the policy turns layer 3 off even when a classifier is given."""
    path = tmp_path / "p.yaml"
    path.write_text('version: "x"\nclassifier: {enabled: false}\n', encoding="utf-8")
    classifier = ScriptedClassifier()
    verdicts = await _run(SafetyStream(load_policy(path), classifier), ["nasty", " stuff", ""])
    assert _text(verdicts) == "nasty stuff"
    assert classifier.calls == []


async def test_units_without_letters_or_digits_are_not_scored(policy: SafetyPolicy) -> None:
    """Blank lines and bare punctuation pass without a classifier call."""
    classifier = ScriptedClassifier()
    verdicts = await _run(SafetyStream(policy, classifier), ["\n", "\n", "— …", ""])
    assert _text(verdicts) == "\n\n— …"
    assert classifier.calls == []


async def test_a_failing_classifier_releases_nothing(policy: SafetyPolicy) -> None:
    """If the classifier cannot answer, push raises, the unchecked sentence is never released and the
    stream is over."""
    stream = SafetyStream(policy, BrokenClassifier())
    assert (await stream.push("Hello")).text == ""
    with pytest.raises(Unavailable):
        await stream.push(" there. Next", final=False)
    assert stream.finished
    assert await stream.push("more", final=True) == SafetyVerdict("", None)


async def test_several_units_completed_by_one_push_go_in_one_call(policy: SafetyPolicy) -> None:
    """The final push scores all remaining units in a single classifier call (one Triton request)."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier)
    verdict = await stream.push("One. Two! Three? Four", final=True)
    assert verdict.text == "One. Two! Three? Four"
    assert classifier.calls == [["One. ", "Two! ", "Three? ", "Four"]]


def test_split_units_keeps_decimals_and_cuts_cjk() -> None:
    """'3.14' does not end a sentence; CJK full stops do, without a following space."""
    assert split_units("Pi is 3.14 today. Yes", 100) == ["Pi is 3.14 today. ", "Yes"]
    assert split_units("東京です。北京です！", 100) == ["東京です。", "北京です！"]
    assert split_units("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]


async def test_check_prompt_uses_terms_then_the_classifier(policy: SafetyPolicy) -> None:
    """A prompt is blocked by a term or by any unit the classifier finds unsafe."""
    classifier = ScriptedClassifier()
    assert await check_prompt(policy, "What a darn day.", classifier) == "profanity"
    assert classifier.calls == []
    assert await check_prompt(policy, "Hello. Some nasty words. Bye.", classifier) == "toxicity"
    assert classifier.calls == [["Hello. ", "Some nasty words. ", "Bye."]]
    assert await check_prompt(policy, "Hello. Nice words.", classifier) is None
    assert await check_prompt(policy, "Some nasty words.") is None


async def test_the_classifier_gets_the_time_left_until_the_streams_deadline(policy: SafetyPolicy) -> None:
    """Each classifier call's timeout is what remains of the deadline the stream was opened with, so a
    request with 2 s left never waits on the classifier for longer; no deadline, no timeout of the caller's."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier, deadline=time.monotonic() + 2.0)
    await stream.push("One. Two")
    await stream.push(". Three", final=True)
    assert len(classifier.timeouts) == 2
    first, second = classifier.timeouts
    assert first is not None and second is not None
    assert 1.5 < second <= first <= 2.0

    classifier = ScriptedClassifier()
    await SafetyStream(policy, classifier).push("One.", final=True)
    assert classifier.timeouts == [None]


async def test_check_prompt_passes_the_requests_remaining_time(policy: SafetyPolicy) -> None:
    """check_prompt hands its timeout (the request's remaining time) to the classifier call."""
    classifier = ScriptedClassifier()
    await check_prompt(policy, "Hello there.", classifier, 0.75)
    await check_prompt(policy, "Hello there.", classifier)
    assert classifier.timeouts == [0.75, None]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    parts=st.lists(
        st.sampled_from(["Hi", " there", ".", " ", "nasty", " a@b.io", "\n", "word", "!", "?", " darn", "3.5"]),
        max_size=20,
    ),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=40),
)
async def test_nothing_unchecked_is_ever_released(policy: SafetyPolicy, parts: list[str], cuts: list[int]) -> None:
    """For any text and split: released text is exactly the concatenation of scored (or letterless) units,
    and a stream that is not blocked releases all of its (redacted) text."""
    text = "".join(parts)
    pieces, at = [], 0
    for n in cuts:
        pieces.append(text[at : at + n])
        at += n
    pieces.append(text[at:])
    classifier = ScriptedClassifier()
    stream = SafetyStream(policy, classifier)
    verdicts = await _run(stream, pieces)
    released = _text(verdicts)
    scored = "".join(classifier.scored)
    # Every released letter went through the classifier, in order.
    assert [c for c in released if c.isalnum()] == [c for c in scored if c.isalnum()][: sum(map(str.isalnum, released))]
    if stream.blocked is None:
        assert released == policy.redactor.redact(text)
        assert "nasty" not in released
    else:
        assert "nasty" not in released


CLAUSE_POLICY_YAML = POLICY_YAML.replace("category: toxicity}", "category: toxicity, release: clause}")


@pytest.fixture(scope="module")
def clause_policy(tmp_path_factory: pytest.TempPathFactory) -> SafetyPolicy:
    path = tmp_path_factory.mktemp("policy") / "clause.yaml"
    path.write_text(CLAUSE_POLICY_YAML, encoding="utf-8")
    return load_policy(path)


def _words(text: str) -> list[str]:
    """Text in word-sized pushes, as a model streams it."""
    return [w for w in text.replace(" ", "\0 ").split("\0") if w]


async def test_clause_release_scores_and_releases_each_clause_with_the_sentence_so_far(
    clause_policy: SafetyPolicy,
) -> None:
    """With the clause policy and a splitter, the first clause is out before its sentence ends; each clause is
    scored with the sentence so far in front of it, the sentence's last clause as the whole sentence."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(clause_policy, classifier, clauses=Chunker(ChunkingMode.CLAUSE))
    assert stream.chunks
    text = "The city of Paris is large, and it has many museums. Its river is the Seine, which is long."
    verdicts = await _run(stream, _words(text))
    pieces = [p for v in verdicts for p in v.pieces]
    assert "".join(pieces) == text and _text(verdicts) == text
    assert pieces == [
        "The city of Paris is large,",
        " and it has many museums.",
        " Its river is the Seine,",
        " which is long.",
    ]
    # The first clause came out before the sentence's end was pushed.
    first_out = next(i for i, v in enumerate(verdicts) if v.text)
    assert first_out < _words(text).index(" museums.")
    assert classifier.scored == [
        "The city of Paris is large,",
        "The city of Paris is large, and it has many museums.",
        " Its river is the Seine,",
        " Its river is the Seine, which is long.",
    ]


async def test_clause_release_blocks_when_the_completed_sentence_fails(clause_policy: SafetyPolicy) -> None:
    """A sentence whose last clause makes it unsafe ends the stream: its earlier clause was released, the
    failing clause and everything after it never are."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(clause_policy, classifier, clauses=Chunker(ChunkingMode.CLAUSE))
    verdicts = await _run(stream, _words("You asked about the weather, and here is a nasty answer. More text."))
    assert verdicts[-1].blocked == "toxicity"
    assert _text(verdicts) == "You asked about the weather,"
    assert stream.finished and await stream.push(" more") == SafetyVerdict("", "toxicity")


async def test_sentence_release_holds_the_same_clause_until_the_sentence_is_scored(policy: SafetyPolicy) -> None:
    """The policy's default (sentence) or no splitter: nothing of a sentence is out before it ends."""
    for stream in (
        SafetyStream(policy, ScriptedClassifier(), clauses=Chunker(ChunkingMode.CLAUSE)),
        SafetyStream(load_policy(), ScriptedClassifier()),
    ):
        assert not stream.chunks
        words = _words("You asked about the weather, and here it is. Done.")
        verdicts = await _run(stream, words)
        assert all(v.text == "" for v in verdicts[: words.index(" is.")])
        assert all(v.pieces == () for v in verdicts)


async def test_clause_release_without_a_boundary_holds_at_most_the_window(clause_policy: SafetyPolicy) -> None:
    """No clause mark or sentence end: the held run is scored and released once it reaches the window."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(clause_policy, classifier, clauses=Chunker(ChunkingMode.CLAUSE))
    window = min(clause_policy.classifier.window_chars, clause_policy.max_hold_chars)
    for word in _words("word " * 40):
        await stream.push(word)
        assert stream.held_chars <= window + len(" word")
    assert classifier.scored  # something was scored and released before the end


async def test_clause_context_is_bounded_by_the_window(clause_policy: SafetyPolicy) -> None:
    """A sentence of many clauses: what is scored never exceeds the window (plus the clause itself)."""
    classifier = ScriptedClassifier()
    stream = SafetyStream(clause_policy, classifier, clauses=Chunker(ChunkingMode.CLAUSE))
    await _run(stream, _words("one two three four five, " * 12 + "end."))
    window = min(clause_policy.classifier.window_chars, clause_policy.max_hold_chars)
    assert max(len(t) for t in classifier.scored) <= 2 * window
    assert len(classifier.scored) >= 12
