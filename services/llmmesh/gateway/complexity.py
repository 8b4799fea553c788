"""How hard a request looks, from its text alone: a score in [0, 1] for the `tiers` route kind.

No model and no I/O: precompiled regular expressions over the request's text. On this project's shared
2-core machine, ~100 µs per prompt of the labelled set (mostly one line), ~2 ms for 1,000 characters of
code and math, and at most ~3 ms at any length: a long text is scanned at its start and end only
(`tests/unit/gateway/test_complexity.py` prints the figures). Six features each add a contribution; the
score is their sum, clipped to [0, 1]:

- length: words, with each CJK or kana character counted as `CJK_CHAR_WORDS` of a word (those scripts
  put no spaces between words), saturating: `LENGTH_WEIGHT * (1 - exp(-words / LENGTH_SCALE))`.
- task words: verbs and phrases that ask for reasoning rather than recall, in English, French, German,
  Spanish, Chinese, Japanese and Russian. "Strong" ones (prove, derive, design, implement, analyse,
  optimise, refactor, justify) weigh more than "moderate" ones (explain, compare, why, step by step,
  in detail, essay, translate). Each distinct word counts once.
- code: a fenced or indented block, syntax (`def f(`, `x => y`, `==`, `#include <`, `SELECT ... FROM`),
  the names of programming languages and code nouns (function, algorithm, regex, 函数, функция...), and
  the density of code symbols.
- math: LaTeX, equations with a variable (`3x^2 - 5x = 2`, `x² + 1`), arithmetic operators between
  numbers (multiplication and division of multi-digit numbers weigh most: a 135M model adds 2 + 2 but
  does not multiply 347 × 29), long numbers and math nouns (integral, theorem, 方程, уравнение...).
- multi-step: numbered or bulleted items, sequencing words ("first ... then ... finally", "d'abord ...
  ensuite", "首先……然后"), and more than one question.
- language: the share of letters outside the Latin script (CJK, kana, Hangul, Cyrillic, Greek, Arabic,
  ...), which a small English-first model handles worse.

The scale: the weights are set so that the shipped `auto` route's threshold, 0.4, falls between what a
135M chat model answers well and what it does not. Chit-chat and one-line facts ("hi", "What is the
capital of France?", "法国的首都是哪里？") stay under 0.1; one signal alone (an "explain", a small sum, a
Chinese question) stays under 0.4; a request needs two kinds of evidence (a proof with an equation, a
design request naming a language, a multi-part question with task words) to reach it, and a multi-part
proof or a code design request lands well above it (0.6-1.0). Each feature is capped, so no single one
(a long but easy text, say) decides alone. The figures on the labelled prompt set
(`loadtest/prompts/routing.jsonl`) are in loadtest/README.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from llmmesh.v1 import generation_pb2

__all__ = [
    "CJK_CHAR_WORDS",
    "CODE_CAP",
    "CONTEXT_CHARS",
    "LANGUAGE_WEIGHT",
    "LENGTH_SCALE",
    "LENGTH_WEIGHT",
    "MATH_CAP",
    "MULTI_STEP_CAP",
    "TASK_CAP",
    "Complexity",
    "request_text",
    "score",
    "score_request",
]

# Length: at most LENGTH_WEIGHT, reached smoothly; LENGTH_SCALE words give 63 % of it. A 6-word question
# adds 0.02, a 40-word request 0.09, a 200-word one 0.21.
LENGTH_WEIGHT = 0.35
LENGTH_SCALE = 60.0
# A Chinese or Japanese character carries about as much as 0.7 of an English word ("法国的首都是哪里" is
# 8 characters for "What is the capital of France", 6 words).
CJK_CHAR_WORDS = 0.7

# Task words: per distinct word, capped.
TASK_STRONG = 0.35
TASK_MODERATE = 0.25
TASK_CAP = 0.5

# Code: a block alone nearly reaches the threshold; syntax and language names add up, capped.
CODE_BLOCK = 0.3
CODE_SYNTAX = 0.1
CODE_WORD = 0.15
CODE_SYMBOLS = 0.15  # at a density of CODE_SYMBOL_DENSITY or more
CODE_SYMBOL_DENSITY = 0.06
CODE_CAP = 0.5

# Math.
MATH_LATEX = 0.3
MATH_EQUATION = 0.2  # an equation or power with a variable
MATH_OPERATOR = 0.06  # per operator between numbers, up to three
MATH_HARD_OPERATOR = 0.3  # × or ÷ with a multi-digit operand (once)
MATH_LONG_NUMBER = 0.06  # per number of three or more digits, up to three
MATH_WORD = 0.2
MATH_CAP = 0.5

# Multi-step reasoning.
STEP_ITEM = 0.08  # per numbered or bulleted item, from the second on
STEP_SEQUENCE = 0.1  # per distinct sequencing word, when there are two or more
STEP_QUESTION = 0.1  # per question after the first
MULTI_STEP_CAP = 0.35

# Non-Latin script: the share of such letters times this.
LANGUAGE_WEIGHT = 0.15

# A long text is scanned at its start and its end only (where a pasted document's question is), and its
# length counted in its first LENGTH_CHARS characters (beyond them the length feature is saturated): the
# cost per request stays bounded however long the prompt.
SCAN_HEAD_CHARS = 800
SCAN_TAIL_CHARS = 400
LENGTH_CHARS = 4000

# request_text: how much of the earlier turns joins the last user turn.
CONTEXT_CHARS = 400
# score_request: what the earlier turns' own score adds to the last user turn's.
CONTEXT_WEIGHT = 0.25


@dataclass(frozen=True)
class Complexity:
    """A request's complexity: `value` in [0, 1] and each feature's contribution to it (before clipping)."""

    value: float
    features: dict[str, float] = field(default_factory=dict)


def _words(*alternatives: str) -> re.Pattern[str]:
    """Lower-case stems (`|`-separated) matched at the start of a word, any ending: searched in the
    lower-cased text (3x faster than re.IGNORECASE)."""
    return re.compile(r"\b(?:" + "|".join(alternatives) + ")")


def _cjk(*alternatives: str) -> re.Pattern[str]:
    """Terms (`|`-separated) in scripts that put no spaces between words: matched anywhere."""
    return re.compile("|".join(alternatives))


_STRONG = (
    _words(
        r"prove|proof|deriv|design|architect|implement|analy[sz]|optimi[sz]|refactor|debug|justif|formali[sz]|critique",
        r"démontr|prouv|démonstration|conce[vç]|implément|optimis",  # fr (analys-, justifi- as en)
        r"beweis|herleit|leiten sie|entw[iu]rf|entwerfen|analysier|implementier|optimier|begründ",  # de
        r"demuestr|demostr|diseñ|analiz|optimiz",  # es (justific- as en)
        r"докаж|доказа|вывед|спроектир|проектир|проанализ|анализ|реализ|оптимиз|обоснуй",  # ru
    ),
    _cjk("证明|推导|设计|分析|实现|优化|論証|証明|導出|設計|実装|最適化"),
)
_MODERATE = (
    _words(
        r"explain|compar|contrast|why\b|step[- ]by[- ]step|in detail|detailed|essay|evaluat|pros and cons"
        r"|translat|summari[sz]e|plan\b|reasoning|calculat|compute\b|solve|sonnet|rhyme|story|formal|letter\b"
        r"|report|document|cit(?:e|ing)\b",
        r"expliqu|pourquoi|étape par étape|en détail|détaill|tradui|rédig|avantages et|résum|calcul|résou|lettre",
        r"erklär|vergleich|warum|schritt für schritt|ausführlich|übersetz|bewerten|vor- und nachteil|aufsatz"
        r"|zusammenfass|fassen sie|berechn|lösen",
        r"explic|por qué|paso a paso|detallad|traduc|redact|ventajas y|resum|resuelv|carta\b",
        r"объясн|сравн|почему|пошагов|шаг за шагом|подробн|перевед|эссе|оцени|вычисл|реши",
    ),
    _cjk(
        "解释|比较|为什么|一步一步|逐步|详细|翻译|评价|文章|说明|总结|计算",
        "説明|比較|なぜ|段階的|詳し|翻訳|エッセイ|評価|計算し",
    ),
)

_FENCE = re.compile(r"```|^(?: {4}|\t)\S", re.MULTILINE)
_SYNTAX = (
    re.compile(r"\bdef\s+\w+\s*\("),
    re.compile(r"\bclass\s+\w+\s*[:({]"),
    re.compile(r"\bfunction\s*\w*\s*\("),
    re.compile(r"\b(?:const|let|var)\s+\w+\s*="),
    re.compile(r"=>|->|::|&&|\|\||[=!]=|\+\+|\+="),
    re.compile(r"#include\s*<|\bimport\s+[\w.]+|\bfrom\s+[\w.]+\s+import\b"),
    re.compile(r"\bSELECT\b.*\bFROM\b", re.DOTALL),
    re.compile(r"\b\w+\.\w+\([^()]*\)|\b\w+\([\w, ]*\)\s*[;:{]"),
    re.compile(r"`[^`\n]+`"),
)
_CODE_WORDS = (
    _words(
        r"python|javascript|typescript|java\b|rust\b|golang|go code|c\+\+|c#|sql\b|bash\b|shell script|regex"
        r"|regular expression|html\b|css\b|json\b|apis?\b|function|algorithm|compil|unit[- ]tests?|recursi|database"
        r"|microservice|schema|script|query|big-o|complexit|lru\b|cache\b",
        r"fonction|algorithme|base de données|funktion|klasse|datenbank|función|algoritmo|código|arreglo"
        r"|base de datos|функци|алгоритм|программ|код\b|архитектур",
    ),
    _cjk("函数|代码|程序|算法|架构|系统|复杂度|関数|コード|プログラム|アルゴリズム|計算量|システム"),
)
_CODE_SYMBOLS = re.compile(r"[{}\[\]();=<>_|&$#\\]")

_LATEX = re.compile(r"\\(?:frac|int|sum|sqrt|prod|lim|begin|cdot|alpha|beta|theta|pi)\b|\$[^$\n]+\$")
_EQUATION = re.compile(
    r"(?<![A-Za-z])\d*[a-z](?:\^[\w(]|[²³⁴])"  # x^2, 3x², e^x
    r"|\d[a-z](?![A-Za-z])\s*[-+=−]"  # 3x + / 5x =
    r"|(?<![A-Za-z])[a-z]\s*[-+−]\s*\d*[a-z]?\s*=\s*[-\d]"  # x - y = 1
    r"|(?<![A-Za-z])[a-z]\s*=\s*[-\d(]"  # x = 2
    r"|√\d|(?:sin|cos|tan|ln|log|exp)\s*\("
)
_OPERATOR = re.compile(r"\d\s*(?:[-+*/×÷^−]|plus|minus|times|mal|fois)\s*\d")
_HARD_OPERATOR = re.compile(
    r"\d{2,}\s*[*×÷/]\s*\d|\d\s*[*×÷/]\s*\d{2,}|\d{3,}\s*(?:divided|multiplied|durch)"
    r"|\d\s*%\s*(?:of|de|von|от)\s*\d[\d,]{2,}"  # a percentage of a number
)
_LONG_NUMBER = re.compile(r"(?<![\d.,])\d(?:[\d,]|\s(?=\d{3}\b))*\d{2}(?:\.\d+)?")
_PERCENT = re.compile(r"\d\s*%")
# Every number or equation pattern needs one of these: most prompts skip them all.
_MATHY = re.compile(r"[\d^=√(²³]")
_MATH_WORDS = (
    _words(
        r"integral|derivative|equation|theorem|prime number|primes\b|matri(?:x|ces)|eigen|probabilit|formula"
        r"|logarithm|polynomial|modulo|factorial|induction|irrational|quadratic",
        r"intégrale|dérivée|équation|théorème|récurrence|irrationnel|gleichung|primzahl|ableitung"
        r"|wahrscheinlichkeit|integralrechnung|ecuación|derivada|teorema|probabilidad|irracional|raíz cuadrada",
        r"уравнени|интеграл|производн|вероятност|матриц|теорем|простых чисел|иррациональ",
    ),
    _cjk("方程|积分|导数|概率|矩阵|定理|素数|无理数|無理数|微分|確率|行列|数列|根号"),
)

_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+\S", re.MULTILINE)
_SEQUENCE = (
    _words(
        r"first(?:ly)?\b|then\b|next\b|finally\b|after that|afterwards|lastly\b",
        r"d'abord|ensuite\b|puis\b|enfin\b|zuerst\b|dann\b|danach\b|schließlich",
        r"primero\b|luego\b|después\b|finalmente\b|сначала\b|затем\b|потом\b|наконец\b",
    ),
    _cjk("首先|然后|接着|最后|まず|次に|最後に"),
)
_QUESTION = re.compile(r"[?？]")

_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]+")
_LETTER = re.compile(r"[^\W\d_]")
# Latin letters: Basic Latin, Latin-1, Extended-A/B, IPA, Extended Additional; anything else is another script.
_NON_LATIN_LETTER = re.compile(r"[^\W\d_\u0000-\u02af\u1e00-\u1eff]")


def _distinct(patterns: tuple[re.Pattern[str], ...], text: str) -> int:
    return len({m for p in patterns for m in p.findall(text)})


def _length(text: str) -> float:
    cjk = len(_CJK_CHAR.findall(text))
    words = len(_WORD.findall(_CJK_CHAR.sub(" ", text))) + CJK_CHAR_WORDS * cjk
    return LENGTH_WEIGHT * (1.0 - math.exp(-words / LENGTH_SCALE))


def _task(low: str) -> float:
    return min(TASK_CAP, TASK_STRONG * _distinct(_STRONG, low) + TASK_MODERATE * _distinct(_MODERATE, low))


def _code(text: str, low: str) -> float:
    value = CODE_BLOCK if _FENCE.search(text) else 0.0
    value += CODE_SYNTAX * sum(1 for p in _SYNTAX if p.search(text))
    value += CODE_WORD * _distinct(_CODE_WORDS, low)
    density = len(_CODE_SYMBOLS.findall(text)) / max(1, len(text))
    value += CODE_SYMBOLS * min(1.0, density / CODE_SYMBOL_DENSITY)
    return min(CODE_CAP, value)


def _math(text: str, low: str) -> float:
    value = MATH_LATEX if _LATEX.search(text) else 0.0
    value += MATH_WORD * _distinct(_MATH_WORDS, low)
    if _MATHY.search(text):
        value += MATH_EQUATION if _EQUATION.search(text) else 0.0
        value += MATH_OPERATOR * min(3, len(_OPERATOR.findall(text)) + len(_PERCENT.findall(text)))
        value += MATH_HARD_OPERATOR if _HARD_OPERATOR.search(text) else 0.0
        value += MATH_LONG_NUMBER * min(3, len(_LONG_NUMBER.findall(text)))
    return min(MATH_CAP, value)


def _multi_step(text: str, low: str) -> float:
    items = len(_ITEM.findall(text))
    value = STEP_ITEM * max(0, items - 1)
    sequence = _distinct(_SEQUENCE, low)
    value += STEP_SEQUENCE * sequence if sequence >= 2 else 0.0
    value += STEP_QUESTION * max(0, len(_QUESTION.findall(text)) - 1)
    return min(MULTI_STEP_CAP, value)


def _language(text: str) -> float:
    letters = len(_LETTER.findall(text))
    if not letters:
        return 0.0
    return LANGUAGE_WEIGHT * len(_NON_LATIN_LETTER.findall(text)) / letters


def score(text: str) -> Complexity:
    """The complexity of `text`: each feature's contribution and their sum clipped to [0, 1]."""
    if len(text) > SCAN_HEAD_CHARS + SCAN_TAIL_CHARS:
        scanned = text[:SCAN_HEAD_CHARS] + "\n" + text[-SCAN_TAIL_CHARS:]
    else:
        scanned = text
    return _score(text[:LENGTH_CHARS], scanned)


def _score(text: str, scanned: str) -> Complexity:
    low = scanned.lower()
    features = {
        "length": _length(text),
        "task": _task(low),
        "code": _code(scanned, low),
        "math": _math(scanned, low),
        "multi_step": _multi_step(scanned, low),
        "language": _language(scanned),
    }
    return Complexity(min(1.0, max(0.0, sum(features.values()))), features)


def _split_chat(request: generation_pb2.GenerateRequest) -> tuple[str, list[str]]:
    """The last user turn (or the last turn) and the earlier non-system turns, newest first."""
    messages = list(request.chat.messages)
    if not messages:
        return "", []
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages) - 1)
    return messages[last].content, [m.content for m in reversed(messages[:last]) if m.role != "system"]


def score_request(request: generation_pb2.GenerateRequest) -> Complexity:
    """A request's complexity with the last user turn weighted most: for a chat, the last user turn's score
    plus CONTEXT_WEIGHT times the score of the turns before it (as request_text joins them), so that an easy
    follow-up in a hard conversation scores a little above the same question asked alone, and far below the
    hard question asked last. Features are the last turn's, plus `context` for the earlier turns' share."""
    if request.WhichOneof("input") != "chat":
        return score(request.prompt)
    last, earlier = _split_chat(request)
    own = score(last)
    if not earlier:
        return own
    context = CONTEXT_WEIGHT * score(_bounded(earlier)).value
    return Complexity(min(1.0, own.value + context), {**own.features, "context": context})


def _bounded(turns: list[str]) -> str:
    parts: list[str] = []
    budget = CONTEXT_CHARS
    for turn in turns:
        if budget <= 0:
            break
        parts.append(turn[:budget])
        budget -= len(parts[-1])
    return "\n".join(parts)


def request_text(request: generation_pb2.GenerateRequest) -> str:
    """The text a request's complexity is scored on: the prompt, or for a chat the last user turn in full
    followed by the turns before it (newest first, system prompts left out: they are the deployment's, the
    same on every request) up to `CONTEXT_CHARS` characters, the question being asked first. As one text,
    every part counts alike: `score_request` weights the last user turn most."""
    if request.WhichOneof("input") != "chat":
        return request.prompt
    last, earlier = _split_chat(request)
    return "\n".join([last, _bounded(earlier)]) if earlier else last
