"""Scored completions → preference pairs in the ``ultrafeedback_binarized`` schema (the dDPO input).

Per prompt: ``chosen`` is the completion with the highest score; ``rejected`` is drawn at random from
the completions with a strictly lower score. The draw is seeded from ``(seed, prompt_id)`` with a
stable hash and made over the candidates in a canonical order, so the pairs do not depend on the
order of rows or prompts, on the process, or on how Ray Data batches the data.

Pure and Ray-free: the AIF stage calls :func:`binarize` on groups of rows (all completions of one
prompt, e.g. from ``groupby("prompt_id").map_groups``) and merges the :class:`BinarizeReport`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zephyr_ray.feedback.judge import Agreement, group_agreement

RATING_PREFIX = "rating_"
# Why a prompt gave no pair (keys of BinarizeReport.skipped).
NO_SCORED = "no scored completion"
ONE_SCORED = "only one scored completion"
NO_LOWER = "no completion with a strictly lower score"


@dataclass
class BinarizeReport:
    """Tallies of one :func:`binarize` call; :meth:`merge` adds up batches."""

    prompts: int = 0
    pairs: int = 0
    completions: int = 0
    unscored: int = 0  # completions without a usable score (None / NaN), left out
    empty: int = 0  # completions that are empty after stripping whitespace, left out
    skipped: Counter = field(default_factory=Counter)  # prompts without a pair, by reason
    agreement: Agreement = field(default_factory=Agreement)  # when rows carry several judges' scores

    def merge(self, other: BinarizeReport) -> BinarizeReport:
        self.prompts += other.prompts
        self.pairs += other.pairs
        self.completions += other.completions
        self.unscored += other.unscored
        self.empty += other.empty
        self.skipped.update(other.skipped)
        self.agreement.merge(other.agreement)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "pairs": self.pairs, "completions": self.completions,
                "unscored": self.unscored, "empty": self.empty, "skipped": dict(self.skipped),
                "agreement": self.agreement.to_dict()}

    def summary(self) -> str:
        lines = [f"prompts {self.prompts}, pairs {self.pairs}; completions {self.completions} "
                 f"({self.unscored} unscored, {self.empty} empty, left out)"]
        lines += [f"  skipped {n:>6} x {reason}" for reason, n in self.skipped.most_common()]
        a = self.agreement
        if a.judges > 1:
            lines.append(f"  judges {a.judges}: same best completion on {a.best_agree}/{a.prompts} prompts, "
                         f"pair order agreement {a.pair_agreement}, gamma {a.gamma}")
        return "\n".join(lines)


def stable_prompt_id(prompt: Any) -> str:
    """SHA-256 of the prompt (its text, or its messages as canonical JSON), as in ultrafeedback_binarized."""
    text = prompt if isinstance(prompt, str) else json.dumps(list(prompt), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_rng(seed: int, prompt_id: str) -> random.Random:
    """An RNG that depends only on ``(seed, prompt_id)`` (not on Python's randomised ``hash()``)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _prompt_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _prompt_text(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def _usable(score: Any) -> float | None:
    if score is None:
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ratings(row: dict[str, Any]) -> dict[str, float | None]:
    return {k[len(RATING_PREFIX):]: _usable(v) for k, v in sorted(row.items()) if k.startswith(RATING_PREFIX)}


def _judge_scores(row: dict[str, Any]) -> list[dict[str, Any]]:
    judgements = row.get("judgements")
    if judgements is None:
        return []
    return [{"judge": str(j["judge"]), "score": _usable(j.get("score"))} for j in judgements]


def group_by_prompt(rows: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by ``prompt_id`` (or by the prompt itself when there is none), first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        pid = row.get("prompt_id") or stable_prompt_id(row["prompt"])
        groups.setdefault(str(pid), []).append(row)
    return list(groups.values())


def _agreement(candidates: list[dict[str, Any]]) -> Agreement:
    judges = sorted({j["judge"] for c in candidates for j in c["judge_scores"]})
    if len(judges) < 2:
        return Agreement(judges=len(judges))
    table = [[next((j["score"] for j in c["judge_scores"] if j["judge"] == name), None) for c in candidates]
             for name in judges]
    return group_agreement(table)


def binarize_group(rows: Sequence[dict[str, Any]], *, seed: int) -> tuple[dict[str, Any] | None, BinarizeReport]:
    """One prompt's completions → one pair (or ``None``, with the reason in the report)."""
    report = BinarizeReport(prompts=1, completions=len(rows))
    if not rows:
        report.skipped[NO_SCORED] += 1
        return None, report
    first = rows[0]
    messages = _prompt_messages(first["prompt"])
    prompt_id = str(first.get("prompt_id") or stable_prompt_id(first["prompt"]))
    for row in rows[1:]:
        if str(row.get("prompt_id") or stable_prompt_id(row["prompt"])) != prompt_id:
            raise ValueError(f"a group holds several prompts: {prompt_id!r} and {row.get('prompt_id')!r}")

    candidates = []
    for row in rows:
        text = row.get("completion")
        text = text if isinstance(text, str) else ""
        candidates.append({"model": str(row.get("model") or ""), "completion": text,
                           "score": _usable(row.get("score")), "ratings": _ratings(row),
                           "judge_scores": _judge_scores(row), "judge": str(row.get("judge") or "")})
    # Canonical order: what is picked does not depend on the order the rows arrived in.
    candidates.sort(key=lambda c: (c["model"], c["completion"], -math.inf if c["score"] is None else c["score"],
                                   json.dumps(c["ratings"], sort_keys=True)))
    report.agreement = _agreement(candidates)

    valid = []
    for c in candidates:
        if not c["completion"].strip():
            report.empty += 1
        elif c["score"] is None:
            report.unscored += 1
        else:
            valid.append(c)
    if len(valid) < 2:
        report.skipped[NO_SCORED if not valid else ONE_SCORED] += 1
        return None, report

    rng = prompt_rng(seed, prompt_id)
    top = max(c["score"] for c in valid)
    chosen = rng.choice([c for c in valid if c["score"] == top])
    lower = [c for c in valid if c["score"] < top and c["completion"].strip() != chosen["completion"].strip()]
    if not lower:
        report.skipped[NO_LOWER] += 1
        return None, report
    rejected = rng.choice(lower)
    report.pairs = 1
    chosen_messages = messages + [{"role": "assistant", "content": chosen["completion"]}]
    pair = {
        "prompt": _prompt_text(messages),
        "prompt_id": prompt_id,
        "chosen": chosen_messages,
        "rejected": messages + [{"role": "assistant", "content": rejected["completion"]}],
        "messages": chosen_messages,
        "score_chosen": chosen["score"],
        "score_rejected": rejected["score"],
        "chosen_model": chosen["model"],
        "rejected_model": rejected["model"],
        "judge": chosen["judge"],
        "candidates": [{"model": c["model"], "score": c["score"], "ratings": c["ratings"],
                        "judge_scores": c["judge_scores"]} for c in candidates],
    }
    return pair, report


def binarize(groups: Iterable[Sequence[dict[str, Any]]], *, seed: int) -> tuple[list[dict[str, Any]], BinarizeReport]:
    """Preference pairs from groups of scored completions (one group = every completion of one prompt).

    A row holds ``prompt`` (a string, or a message list ending with a user turn, e.g. with a system
    turn), ``completion``, ``score`` and optionally ``prompt_id``, ``model``, ``judge``,
    ``rating_<aspect>`` and ``judgements`` (as written by :func:`~zephyr_ray.feedback.judge.score_batch`).

    - Completions with no usable score (``None``/NaN) or empty text are left out and counted.
    - ``chosen``: the highest score. Ties at the top are broken by the prompt's seeded RNG over the
      candidates in canonical order (model, completion), so no model wins ties by its name or its
      position in the data.
    - ``rejected``: drawn by the same RNG from the completions scoring strictly lower than the chosen
      one (a completion with the chosen one's text is never drawn: the pair would carry no preference).
    - Prompts with fewer than two usable completions, or no strictly lower one, give no pair; the
      report counts them by reason.

    Pair rows: ``prompt`` (str), ``prompt_id``, ``chosen``/``rejected``/``messages`` (message lists
    sharing the prompt turns), ``score_chosen``, ``score_rejected``, ``chosen_model``,
    ``rejected_model``, ``judge``, ``candidates`` (every completion's ``model``, ``score``,
    ``ratings``, ``judge_scores``, canonical order). They pass
    :func:`zephyr_ray.data.preference.validate_pair`.
    """
    pairs, report = [], BinarizeReport()
    for group in groups:
        pair, one = binarize_group(list(group), seed=seed)
        report.merge(one)
        if pair is not None:
            pairs.append(pair)
    return pairs, report
