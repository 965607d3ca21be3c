"""The eval stage's side of LLM-as-a-judge: the judge pool's work and the rows it writes.

Judge prompts (FastChat's ``judge_prompts.jsonl``), the ``[[rating]]`` / ``[[verdict]]`` parsers, the retry loop
and the ``expected`` mode are shared with AI feedback in :mod:`zephyr_ray.judging`; here they are applied to the
eval stage's units (MT-Bench grading, both orders of every AlpacaEval pair, agreement rows):

- **generate** (``eval.judge.mode``, FastChat's way; for GPT-4-class judges): the judge writes its judgment;
  ``[[x]]`` (single grading, 1-10) or ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (pairwise) is read from it; what cannot
  be read is asked again (:func:`~zephyr_ray.judging.judge_with_retries`) and kept as ``None`` after
  ``max_attempts``, counted, never dropped.
- **expected** (local judges only): one forward pass gives the judge's distribution over the options
  (:func:`~zephyr_ray.judging.judge_expected`); a rating is ``sum_k k * P(k)``, a verdict is kept as its
  probabilities, and the win rate uses the probability-weighted preference
  (:func:`zephyr_ray.eval.pairwise.ordering_score`).
"""

from __future__ import annotations

from typing import Any

from zephyr_ray.generation.pool import KEY
from zephyr_ray.generation.types import SamplingParams
from zephyr_ray.judging import (
    EXPECTED,
    GENERATE,
    PAIRWISE,
    PARSERS,
    SINGLE,
    VERDICTS,
    judge_expected,
    judge_with_retries,
)


def judge_label(name: str, mode: str) -> str:
    """How a judge's numbers were made, for results.json and the report."""
    how = "probability-weighted" if mode == EXPECTED else "parsed [[rating]] / [[verdict]] from its text"
    return f"{name} ({mode}: {how})"


def verdict_of(row: dict[str, Any]) -> Any:
    """A pairwise judgment's verdict: ``{"A": p, "B": p, tie: p}`` in expected mode (its ``probs``), else the
    parsed verdict (``None``: unreadable)."""
    probs = row.get("probs")
    return dict(zip(VERDICTS, probs, strict=True)) if probs is not None else row["verdict"]


def judge_work(engine: Any, units: list[dict[str, Any]], *, params: SamplingParams, max_attempts: int,
               judge: str, mode: str = GENERATE) -> list[dict[str, Any]]:
    """Pool work: judge every unit (``kind`` single or pairwise, ``messages``, ``meta`` JSON), one row each.
    ``mode`` generate: FastChat's text, parsed, with retries; expected: option probabilities."""
    if mode == EXPECTED:
        results = judge_expected(engine, [u["messages"] for u in units], [u["kind"] for u in units])
    elif mode == GENERATE:
        results = judge_with_retries(engine, [u["messages"] for u in units], [PARSERS[u["kind"]] for u in units],
                                     params, max_attempts)
    else:
        raise ValueError(f"judge mode must be {GENERATE!r} or {EXPECTED!r}, got {mode!r}")
    return [
        {KEY: u[KEY], "kind": u["kind"], "meta": u["meta"], "judge": judge, "mode": mode, "judgment": r.text,
         "score": r.value if u["kind"] == SINGLE else None, "verdict": r.value if u["kind"] == PAIRWISE else None,
         "probs": r.probs, "attempts": r.attempts, "prompt_tokens": r.prompt_tokens,
         "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason}
        for u, r in zip(units, results, strict=True)
    ]
