"""AI feedback: a teacher model rates completions on the UltraFeedback aspects.

Pure, Ray-free functions: the AIF stage calls :func:`score_batch` inside Ray Data ``map_batches``
actors on batches of rows (dicts with at least ``prompt`` and ``completion``), with an engine that
implements :mod:`zephyr_ray.generation.types`.

Two scoring modes:

- ``generate``: the judge writes ``Rating: N`` and a rationale; :func:`parse_rating` reads the rating.
  Ratings that cannot be read are retried (one batched call per attempt, new seed, sampling on), and
  after ``max_attempts`` they are marked: the aspect's rating is ``None`` and the row's
  ``judge_failures`` counts it. Nothing is dropped silently.
- ``expected``: for local judges (:class:`~zephyr_ray.generation.types.ScoringEngine`), the rating is
  the expectation of the judge's next-token distribution over ``"1".."5"`` after ``"Rating: "``.

Several judges: run :func:`score_batch` once per judge on the same rows; each run appends its
``judgements`` entry and the row's ``score`` / ``rating_<aspect>`` become the mean over judges.
:func:`combine_judges` averages aligned per-judge score lists and measures agreement.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from zephyr_ray.generation.types import Conversation, SamplingParams

log = logging.getLogger(__name__)

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
# Judge templates hold these placeholders; anything else in braces is literal text.
PLACEHOLDERS = ("instruction", "completion")
RATING_PREFIX = "Rating: "
# Sampling temperature for retries when the first attempt was greedy (a greedy rerun repeats itself).
RETRY_TEMPERATURE = 0.7


# ---------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------

def fill(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders in one pass: text inserted for one placeholder is never
    scanned for another (a completion that contains ``{instruction}`` stays as written), and other
    braces are left alone."""
    return re.sub(r"\{(" + "|".join(map(re.escape, values)) + r")\}", lambda m: values[m.group(1)], template)


def load_templates(directory: str | Path, aspects: Sequence[str] = ASPECTS) -> dict[str, str]:
    """``{aspect: template}`` from ``<directory>/<aspect>.txt``; each must contain every placeholder."""
    directory = Path(directory)
    templates = {}
    for aspect in aspects:
        path = directory / f"{aspect}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no judge template for aspect {aspect!r}: {path} does not exist")
        text = path.read_text(encoding="utf-8")
        missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in text]
        if missing:
            raise ValueError(f"{path}: missing placeholder(s) {', '.join('{' + p + '}' for p in missing)}")
        templates[aspect] = text
    return templates


def instruction_text(prompt: Any) -> str:
    """The instruction shown to the judge: the prompt string, or a message list as a transcript
    (a single user turn is shown as its bare text)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_conversation(template: str, prompt: Any, completion: str) -> Conversation:
    """The chat the judge sees: one user turn, the template filled with instruction and completion."""
    return [{"role": "user", "content": fill(template, instruction=instruction_text(prompt), completion=completion)}]


# ---------------------------------------------------------------------------------------------------
# Rating parser
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


# ---------------------------------------------------------------------------------------------------
# Scoring a batch
# ---------------------------------------------------------------------------------------------------

def rating_column(aspect: str) -> str:
    return f"rating_{aspect}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(present) / len(present) if present else None


def expected_rating(probs: Sequence[float], low: int = 1, high: int = 5) -> float | None:
    """``sum(p_k * k)`` over ratings ``low..high`` (renormalised); ``None`` for a degenerate vector."""
    if len(probs) != high - low + 1:
        raise ValueError(f"expected {high - low + 1} probabilities for ratings {low}..{high}, got {len(probs)}")
    total = float(sum(probs))
    if not math.isfinite(total) or total <= 0 or any(p < 0 for p in probs):
        return None
    return sum(float(p) * k for p, k in zip(probs, range(low, high + 1))) / total


def _generate_ratings(engine: Any, conversations: list[Conversation], params: SamplingParams,
                      max_attempts: int, retry_temperature: float, low: int, high: int
                      ) -> tuple[list[float | None], list[int]]:
    """Ratings per conversation and the number of extra attempts each one took."""
    ratings: list[float | None] = [None] * len(conversations)
    retries = [0] * len(conversations)
    todo = list(range(len(conversations)))
    last_text: dict[int, str] = {}
    for attempt in range(max_attempts):
        if not todo:
            break
        p = params
        if attempt:
            p = dataclasses.replace(params, seed=params.seed + attempt,
                                    temperature=params.temperature if params.temperature > 0 else retry_temperature)
            for i in todo:
                retries[i] += 1
        outputs = engine.generate([conversations[i] for i in todo], p)
        if len(outputs) != len(todo):
            raise RuntimeError(f"judge engine returned {len(outputs)} results for {len(todo)} conversations")
        still = []
        for i, out in zip(todo, outputs):
            text = out[0].text if out else ""
            ratings[i] = parse_rating(text, low, high)
            if ratings[i] is None:
                still.append(i)
                last_text[i] = text
        todo = still
    if todo:
        log.warning("judge: %d of %d ratings unreadable after %d attempts (marked as missing); e.g. %r",
                    len(todo), len(conversations), max_attempts, last_text[todo[0]][:200])
    return ratings, retries


def _expected_ratings(engine: Any, conversations: list[Conversation], low: int, high: int) -> list[float | None]:
    if not callable(getattr(engine, "option_probs", None)):
        raise TypeError(f"mode='expected' needs a local judge with option_probs (a ScoringEngine); "
                        f"{type(engine).__name__} has none; use mode='generate'")
    options = [str(k) for k in range(low, high + 1)]
    probs = engine.option_probs(conversations, options, prefix=RATING_PREFIX)
    if len(probs) != len(conversations):
        raise RuntimeError(f"judge engine returned {len(probs)} results for {len(conversations)} conversations")
    return [expected_rating(p, low, high) for p in probs]


def score_batch(engine: Any, rows: Sequence[dict[str, Any]], *, templates: dict[str, str],
                mode: Literal["generate", "expected"] = "generate", params: SamplingParams | None = None,
                max_attempts: int = 3, judge: str | None = None, retry_temperature: float = RETRY_TEMPERATURE,
                low: int = 1, high: int = 5) -> list[dict[str, Any]]:
    """Rate every row's ``completion`` for ``prompt`` on each aspect of ``templates``.

    All (row, aspect) conversations go to the engine in one batched call (plus one per retry in
    ``generate`` mode). Returns new rows: the input fields plus

    - ``judgements``: the earlier judges' entries plus this judge's ``{judge, score, ratings,
      failures, retries}`` (``ratings``: ``{aspect: rating or None}``);
    - ``rating_<aspect>``: mean over judges of that aspect's rating (``None`` if no judge has it);
    - ``score``: mean over judges of each judge's score (the mean of its available aspect ratings);
      ``None`` if no rating at all;
    - ``judge``: the judge names joined by ``+``; ``judge_failures`` / ``judge_retries``: unreadable
      ratings after all attempts / extra attempts, summed over judges.

    ``judge`` names this judge (default: the engine's class name); a row already judged by a judge
    of the same name is an error.
    """
    if mode not in ("generate", "expected"):
        raise ValueError(f"mode must be 'generate' or 'expected', got {mode!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if not templates:
        raise ValueError("no judge templates")
    name = judge or type(engine).__name__
    aspects = list(templates)
    conversations = []
    for index, row in enumerate(rows):
        for key in ("prompt", "completion"):
            if row.get(key) is None:
                raise ValueError(f"row {index} has no {key!r} field (fields: {sorted(row)})")
        for aspect in aspects:
            conversations.append(judge_conversation(templates[aspect], row["prompt"], str(row["completion"])))
    if mode == "generate":
        params = dataclasses.replace(params or SamplingParams(), n=1)
        ratings, retries = _generate_ratings(engine, conversations, params, max_attempts, retry_temperature,
                                             low, high)
    else:
        ratings, retries = _expected_ratings(engine, conversations, low, high), [0] * len(conversations)

    out = []
    width = len(aspects)
    for index, row in enumerate(rows):
        mine = dict(zip(aspects, ratings[index * width:(index + 1) * width]))
        judgement = {
            "judge": name,
            "score": _mean(mine.values()),
            "ratings": mine,
            "failures": sum(v is None for v in mine.values()),
            "retries": sum(retries[index * width:(index + 1) * width]),
        }
        earlier = row.get("judgements")
        judgements = [] if earlier is None else [dict(j) for j in earlier]
        if any(j["judge"] == name for j in judgements):
            raise ValueError(f"row {index} was already rated by judge {name!r}; give each judge a distinct name")
        judgements.append(judgement)
        new = dict(row)
        new["judgements"] = judgements
        for aspect in aspects:
            new[rating_column(aspect)] = _mean((j.get("ratings") or {}).get(aspect) for j in judgements)
        new["score"] = _mean(j["score"] for j in judgements)
        new["judge"] = "+".join(j["judge"] for j in judgements)
        new["judge_failures"] = sum(int(j["failures"]) for j in judgements)
        new["judge_retries"] = sum(int(j["retries"]) for j in judgements)
        out.append(new)
    return out


def summarize_judging(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Totals over scored rows: completions, unreadable ratings, retries, completions with no score."""
    totals = {"completions": 0, "failed_ratings": 0, "retries": 0, "unscored": 0}
    for row in rows:
        totals["completions"] += 1
        totals["failed_ratings"] += int(row.get("judge_failures") or 0)
        totals["retries"] += int(row.get("judge_retries") or 0)
        totals["unscored"] += row.get("score") is None
    return totals


# ---------------------------------------------------------------------------------------------------
# Several judges
# ---------------------------------------------------------------------------------------------------

@dataclass
class Agreement:
    """How far judges agree, in counts that add up across batches and prompts.

    - ``best_agree`` / ``prompts``: prompts (with >= 2 completions scored by every judge) on which
      every judge's set of top-scored completions is the same.
    - ``concordant`` / ``discordant`` / ``tied``: over judge pairs and pairs of completions of the same
      prompt scored by both, whether the two judges order the completions the same way, the opposite
      way, or at least one of them ties them. ``gamma`` = (C - D) / (C + D) is Goodman and Kruskal's
      gamma (Kendall's tau over untied pairs), pooled within prompts.
    """

    judges: int = 0
    prompts: int = 0
    best_agree: int = 0
    concordant: int = 0
    discordant: int = 0
    tied: int = 0

    @property
    def best_agreement(self) -> float | None:
        return self.best_agree / self.prompts if self.prompts else None

    @property
    def pair_agreement(self) -> float | None:
        n = self.concordant + self.discordant
        return self.concordant / n if n else None

    @property
    def gamma(self) -> float | None:
        n = self.concordant + self.discordant
        return (self.concordant - self.discordant) / n if n else None

    def merge(self, other: Agreement) -> Agreement:
        self.judges = max(self.judges, other.judges)
        self.prompts += other.prompts
        self.best_agree += other.best_agree
        self.concordant += other.concordant
        self.discordant += other.discordant
        self.tied += other.tied
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "best_agreement": self.best_agreement,
                "pair_agreement": self.pair_agreement, "gamma": self.gamma}


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def group_agreement(scores: Sequence[Sequence[float | None]]) -> Agreement:
    """Agreement of judges on one prompt: ``scores[j][i]`` = judge ``j``'s score of completion ``i``."""
    report = Agreement(judges=len(scores))
    if len(scores) < 2:
        return report
    n = len(scores[0])
    for a, b in combinations(scores, 2):
        for i, k in combinations(range(n), 2):
            if None in (a[i], a[k], b[i], b[k]):
                continue
            sa, sb = _sign(a[i] - a[k]), _sign(b[i] - b[k])
            if sa == 0 or sb == 0:
                report.tied += 1
            elif sa == sb:
                report.concordant += 1
            else:
                report.discordant += 1
    common = [i for i in range(n) if all(s[i] is not None for s in scores)]
    if len(common) >= 2:
        report.prompts = 1
        bests = []
        for s in scores:
            top = max(s[i] for i in common)
            bests.append(frozenset(i for i in common if s[i] == top))
        report.best_agree = int(len(set(bests)) == 1)
    return report


def combine_judges(scores: Sequence[Sequence[float | None]], prompt_ids: Sequence[Hashable]
                   ) -> tuple[list[float | None], Agreement]:
    """Average several judges' scores of the same completions and measure their agreement.

    ``scores[j][i]`` is judge ``j``'s score of completion ``i`` (``None``: no score); ``prompt_ids[i]``
    is the prompt of completion ``i`` (agreement is measured within prompts). Returns the mean score
    per completion over the judges that scored it (``None`` if none did) and the :class:`Agreement`.
    """
    if not scores:
        raise ValueError("no judges")
    n = len(prompt_ids)
    if any(len(s) != n for s in scores):
        raise ValueError(f"every judge needs one score per completion ({n}); got {[len(s) for s in scores]}")
    combined = [_mean(s[i] for s in scores) for i in range(n)]
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, pid in enumerate(prompt_ids):
        groups[pid].append(i)
    report = Agreement(judges=len(scores))
    for members in groups.values():
        report.merge(group_agreement([[s[i] for i in members] for s in scores]))
    return combined, report
