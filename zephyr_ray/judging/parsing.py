"""Reading what a judge said: free-text UltraFeedback ratings (AIF), FastChat's ``[[rating]]`` and
``[[verdict]]`` (evaluation), and expected ratings from option probabilities (both, in ``expected`` mode).

- :func:`parse_rating`: a 1-5 rating in free text (``Rating: 4``, ``I'd rate this a 3 out of 5``...);
- :func:`parse_score`: single-answer grading (1-10): ``[[x]]``, else ``[x]``;
- :func:`parse_verdict`: pairwise: ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie);
- :func:`expected_rating`: ``sum_k k * P(k)`` over a judge's option probabilities.

Every parser returns ``None`` for what it cannot read; the caller retries or counts it, never drops it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from zephyr_ray.judging.prompts import PAIRWISE, SINGLE

# ---------------------------------------------------------------------------------------------------
# Free-text ratings (UltraFeedback, AIF)
# ---------------------------------------------------------------------------------------------------

_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10}
# Words allowed between a rating keyword and its number ("I'd rate this response a 4", "Rating for
# honesty: 5", "the score would be 3"). Any other word breaks the link, which keeps stray numbers in
# prose from being read as ratings.
_FILLER_WORDS = (
    r"i['’]d|it['’]s|is|of|would|will|should|must|be|i|id|give|it|this|that|the|response|text|answer|output|"
    r"completion|a|an|as|at|final|overall|my|for|to|here|its|gets?|deserves?|earns?|receives?|solid|and|in|on|"
    r"terms|aspect|instruction|following|honesty|truthfulness|helpfulness|rating|score|one"
)
_GAP_TOKEN = r"(?:[\s*_:#=\-–—>\[\](){}\"'`|~,]|\b(?:" + _FILLER_WORDS + r")\b)"
_NUMBER = (
    r"(?P<neg>-)?(?P<num>\d+(?:\.\d+)?)"
    r"|(?P<word>" + "|".join(_WORDS) + r")\b(?=\s*(?:$|[.!,;:)\]*_/]|out\s+of\b|stars?\b|points?\b))"
    r"|(?P<na>n/?a\b|none\b|not\s+applicable\b|unrat(?:ed|able)\b)"
)
_AFTER_KEYWORD = re.compile(rf"(?P<gap>{_GAP_TOKEN}*?)(?:{_NUMBER})", re.I)
_KEYWORD = re.compile(r"\b(?:(?P<noun>ratings?|scores?|grades?)|rate|rated|scored|graded)\b", re.I)
_LINE_PREFIX = re.compile(rf"{_GAP_TOKEN}*", re.I)
# A negation up to three words before the keyword, in the same clause: "I would not rate this a 5",
# "I wouldn't give it a rating of 5"; "It is not wrong; I rate it 4" is not negated.
_NEGATED = re.compile(r"(?:\bnot|n['’]t|\bnever|\bcannot)(?:\s+\w+){0,3}\s+$", re.I)
_SCALE = re.compile(
    r"(?:\bon\s+a\s+(?:\d+\s*-?\s*point\s+)?scale\s+(?:of|from)\s+|\bfrom\s+)?"
    r"(?:(?P<open>[(\[])\s*)?(?P<lo>\d+)\s*(?:-|–|to)\s*(?P<hi>\d+)(?:\s*(?P<close>[)\]]))?", re.I)
_DENOMINATOR = re.compile(r"\s*(?:/|out\s+of\b)\s*(?P<den>\d+(?:\.\d+)?)", re.I)
_RANGE_AFTER = re.compile(r"\s*(?:-|–|to\b|or\b)\s*\d", re.I)
_FRACTION = re.compile(
    r"(?<![\w.])(?P<num>\d+(?:\.\d+)?)\s*(?:/|out\s+of\b)\s*(?P<den>\d+(?:\.\d+)?)(?!\w|\.\d)"
    r"(?=\s*(?:$|[.!,;:)\]*_\n]|stars?\b|points?\b))", re.I)
_BARE = re.compile(r"[*#\[(\s]*(?P<num>\d+(?:\.\d+)?)")
_BARE_END = re.compile(r"[-–—:]\s")

_INVALID = object()  # a rating-shaped answer that is not a usable rating (N/A, out of range, a range...)


def _strip_scales(text: str, low: int, high: int) -> str:
    """Blank out scale descriptions such as ``(1-5)``, ``on a scale of 1 to 5``, so that their numbers
    are not read as ratings. Only the judge's own scale is removed; ``Rating: 4-5`` stays a range."""
    def blank(m: re.Match) -> str:
        described = m.group(0).lower().startswith(("on", "from")) or (m.group("open") and m.group("close"))
        if described and int(m.group("lo")) == low and int(m.group("hi")) == high:
            return " " * len(m.group(0))
        return m.group(0)
    return _SCALE.sub(blank, text)


def _value(num: str, den: str | None, low: int, high: int) -> Any:
    value = float(num)
    if den is not None and float(den) != high:
        return _INVALID  # "8/10": another scale; not rescaled
    return value if low <= value <= high else _INVALID


def _keyword_candidates(text: str, low: int, high: int) -> list[tuple[bool, Any]]:
    """``(at_line_start, value)`` for each rating keyword linked to a number (or to N/A)."""
    out = []
    for kw in _KEYWORD.finditer(text):
        if _NEGATED.search(text, max(0, kw.start() - 40), kw.start()):
            continue  # "I would not rate this a 5"
        m = _AFTER_KEYWORD.match(text, kw.end())
        if m is None or len(m.group("gap")) > 60:
            continue
        line_start = text.rfind("\n", 0, kw.start()) + 1
        heading = bool(kw.group("noun")) and _LINE_PREFIX.fullmatch(text, line_start, kw.start()) is not None
        if m.group("na"):
            out.append((heading, _INVALID))
            continue
        if m.group("word"):
            out.append((heading, _value(str(_WORDS[m.group("word").lower()]), None, low, high)))
            continue
        rest = text[m.end():]
        if rest[:1].isalnum() or rest[:1] == "%":
            continue  # "the error rate is 5%", "rated 4th": not a rating
        if m.group("neg") or _RANGE_AFTER.match(rest):
            out.append((heading, _INVALID))  # "-1", "4-5", "3 or 4"
            continue
        den = _DENOMINATOR.match(rest)
        out.append((heading, _value(m.group("num"), den.group("den") if den else None, low, high)))
    return out


def _decide(values: list[Any]) -> float | None:
    distinct = set(values)
    if len(distinct) == 1 and _INVALID not in distinct:
        return float(distinct.pop())
    return None


def parse_rating(text: str | None, low: int = 1, high: int = 5) -> float | None:
    """The rating a judge gave in free text, or ``None`` when there is none or it is ambiguous.

    Evidence is read in order of strength, and the first kind found decides:

    1. a line that starts with a rating keyword: ``Rating: 4``, ``**Rating**: 4/5``, ``Score - 5``,
       ``Final rating (1-5): [[3]]``;
    2. a rating keyword anywhere, linked to a number by filler words only: ``I'd rate this a 3 out of
       5``, ``it gets a rating of 4.5``; a negated one (``I would not rate it a 5``) is ignored;
    3. a fraction on the judge's scale: ``4/5``, ``4 out of 5 stars`` (``3 out of 5 steps`` is prose);
    4. a first line that is only a number (``4``, ``4/5``, ``4 - good``).

    Within that kind, every candidate must agree: two different ratings, a rating outside
    ``[low, high]``, a fraction on another scale (``8/10``), a range (``4-5``), a negative number or
    ``N/A`` give ``None``. Decimals are kept (``4.5``). Scale descriptions such as ``(1-5)`` or
    ``on a scale of 1 to 5`` are not ratings.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    text = _strip_scales(text, low, high)
    keyword = _keyword_candidates(text, low, high)
    for level in ([v for heading, v in keyword if heading], [v for _, v in keyword]):
        if level:
            return _decide(level)
    fractions = [_value(m.group("num"), m.group("den"), low, high) for m in _FRACTION.finditer(text)]
    if fractions:
        return _decide(fractions)
    first = next((line for line in text.splitlines() if line.strip()), "")
    m = _BARE.match(first)
    if m:
        rest = first[m.end():].lstrip(" \t*])")
        den = _DENOMINATOR.match(rest)
        if den:
            rest = rest[den.end():]
        rest = rest.lstrip(" \t*]).")
        if not rest or _BARE_END.match(rest):  # "4", "**4/5**", "4 - solid answer"
            return _decide([_value(m.group("num"), den.group("den") if den else None, low, high)])
    return None




def expected_rating(probs: Sequence[float], low: int = 1, high: int = 5) -> float | None:
    """``sum(p_k * k)`` over ratings ``low..high`` (renormalised); ``None`` for a degenerate vector."""
    if len(probs) != high - low + 1:
        raise ValueError(f"expected {high - low + 1} probabilities for ratings {low}..{high}, got {len(probs)}")
    total = float(sum(probs))
    if not math.isfinite(total) or total <= 0 or any(p < 0 for p in probs):
        return None
    return sum(float(p) * k for p, k in zip(probs, range(low, high + 1))) / total


# ---------------------------------------------------------------------------------------------------
# FastChat ratings and verdicts (evaluation)
# ---------------------------------------------------------------------------------------------------

TIE = "tie"
SCORE_LOW, SCORE_HIGH = 1.0, 10.0
# What the pairwise options mean (C is FastChat's tie).
VERDICTS = ("A", "B", TIE)
# A verdict ("A", "B" or tie; None: unreadable) or, in expected mode, the judge's probabilities {"A", "B", tie}.
Verdict = str | dict[str, float] | None

_SCORE_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_DOUBLE = re.compile(r"\[\[" + _SCORE_NUMBER + r"\]\]")
_SINGLE = re.compile(r"(?<!\[)\[" + _SCORE_NUMBER + r"\](?!\])")
_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)


def parse_score(text: str | None, low: float = SCORE_LOW, high: float = SCORE_HIGH) -> float | None:
    """The judge's rating: the last ``[[x]]`` in the text, or when there is none the last ``[x]``.

    Decimals are kept (``[[7.5]]``); a rating outside ``[low, high]`` (``[[0]]``, ``[[11]]``, ``[[-2]]``) gives
    ``None`` (the double-bracket form, once present, decides: no fallback to ``[x]``). FastChat reads the
    first match; the last is read here because the rating is asked for after the explanation, and judges
    sometimes quote the format's example (``Rating: [[5]]``) before it.
    """
    if not isinstance(text, str):
        return None
    found = _DOUBLE.findall(text) or _SINGLE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if low <= value <= high else None


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]`` / ``[[B]]`` / ``[[C]]`` in the text (``None``: none)."""
    if not isinstance(text, str):
        return None
    found = _VERDICT.findall(text)
    if not found:
        return None
    last = found[-1].upper()
    return TIE if last in ("C", "TIE") else last


PARSERS: dict[str, Callable[[str | None], Any]] = {SINGLE: parse_score, PAIRWISE: parse_verdict}


def verdict_probs(verdict: Verdict) -> dict[str, float] | None:
    """``{"A": p, "B": p, tie: p}`` summing to 1: a verdict as its one-hot distribution, probabilities
    renormalised; ``None`` when unreadable (or no probability mass)."""
    if verdict is None:
        return None
    if isinstance(verdict, str):
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; expected 'A', 'B' or {TIE!r}")
        return {v: float(v == verdict) for v in VERDICTS}
    unknown = set(verdict) - set(VERDICTS)
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)} in {verdict!r}; expected 'A', 'B' or {TIE!r}")
    values = {v: float(verdict.get(v, 0.0)) for v in VERDICTS}
    total = sum(values.values())
    if not math.isfinite(total) or total <= 0 or any(x < 0 for x in values.values()):
        return None
    return {v: x / total for v, x in values.items()}


def decided(verdict: Verdict) -> str | None:
    """The verdict itself, or the most likely one of a distribution (an exact draw goes to tie, then A)."""
    probs = verdict_probs(verdict)
    if probs is None:
        return None
    return max((TIE, "A", "B"), key=lambda v: probs[v])
