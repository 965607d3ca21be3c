"""AI feedback: a teacher model rates completions on the UltraFeedback aspects.

Pure, Ray-free functions: the AIF stage calls :func:`score_batch` inside Ray Data ``map_batches``
actors on batches of rows (dicts with at least ``prompt`` and ``completion``), with an engine that
implements :mod:`zephyr_ray.generation.types`.

Two scoring modes:

- ``generate``: the judge writes ``Rating: N`` and a rationale; :func:`~zephyr_ray.judging.parse_rating` reads
  the rating. Ratings that cannot be read are retried (:func:`~zephyr_ray.judging.judge_with_retries`: one
  batched call per attempt, new seed, sampling on), and after ``max_attempts`` they are marked: the
  aspect's rating is ``None`` and the row's ``judge_failures`` counts it. Nothing is dropped silently.
- ``expected``: for local judges (:class:`~zephyr_ray.generation.types.ScoringEngine`), the rating is
  the expectation of the judge's next-token distribution over ``"1".."5"`` after ``"Rating: "``.

Templates, parsing and the asking itself live in :mod:`zephyr_ray.judging` (shared with evaluation).

Several judges: run :func:`score_batch` once per judge on the same rows; each run appends its
``judgements`` entry and the row's ``score`` / ``rating_<aspect>`` become the mean over judges.
:func:`combine_judges` averages aligned per-judge score lists and measures agreement.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from typing import Any, Literal

from zephyr_ray.generation.types import Conversation, SamplingParams
from zephyr_ray.judging import (
    EXPECTED,
    GENERATE,
    RATING_PREFIX,
    RETRY_TEMPERATURE,
    expected_rating,
    judge_conversation,
    judge_with_retries,
    option_distributions,
    parse_rating,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Scoring a batch
# ---------------------------------------------------------------------------------------------------

def rating_column(aspect: str) -> str:
    return f"rating_{aspect}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(present) / len(present) if present else None


def _generate_ratings(engine: Any, conversations: list[Conversation], params: SamplingParams, max_attempts: int,
                      retry_temperature: float, low: int, high: int) -> tuple[list[float | None], list[int]]:
    """Ratings per conversation (the shared retry loop) and the number of extra attempts each one took."""
    judged = judge_with_retries(engine, conversations, [partial(parse_rating, low=low, high=high)] * len(conversations),
                                params, max_attempts, retry_temperature)
    failed = [j for j in judged if j.value is None]
    if failed:
        log.warning("judge: %d of %d ratings unreadable after %d attempts (marked as missing); e.g. %r",
                    len(failed), len(conversations), max_attempts, failed[0].text[:200])
    return [j.value for j in judged], [j.attempts - 1 for j in judged]


def _expected_ratings(engine: Any, conversations: list[Conversation], low: int, high: int) -> list[float | None]:
    options = [str(k) for k in range(low, high + 1)]
    probs = option_distributions(engine, conversations, options, prefix=RATING_PREFIX)
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
    if mode not in (GENERATE, EXPECTED):
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
    if mode == GENERATE:
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
