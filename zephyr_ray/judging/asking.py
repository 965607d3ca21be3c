"""Asking a judge: the one retry loop (``generate`` mode) and option probabilities (``expected`` mode).

- **generate**: :func:`judge_with_retries` sends every conversation in one batched call, parses each answer,
  and re-asks only about the answers it could not read (new seed; sampling on when the first attempt was
  greedy), up to ``max_attempts`` calls each. What is still unreadable after that keeps the value ``None``
  and is counted by the caller, never dropped. AIF (UltraFeedback ratings) and evaluation (MT-Bench grades,
  pairwise verdicts) both go through it.
- **expected** (local judges only, a :class:`~zephyr_ray.generation.types.ScoringEngine`): nothing is written;
  :func:`option_distributions` reads the judge's distribution over the options after a prefilled prefix in one
  forward pass per conversation. AIF scores ``"1".."5"`` after ``"Rating: "`` (:data:`RATING_PREFIX`);
  evaluation (:func:`judge_expected`) prefills FastChat's format up to where the verdict goes (``Rating: [[``
  for a rating, ``[[`` for a pairwise verdict; the FastChat prompt is unchanged, it asks for an explanation
  first, but the prefill skips it) and scores ``1``..``10`` (or ``A``, ``B``, ``C`` = tie), each with its
  closing ``]]`` as a whole token sequence. A rating is then ``sum_k k * P(k)``; a verdict is kept as its
  probabilities. A small local judge that never writes a readable rating still scores every answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zephyr_ray.generation.types import Conversation, SamplingParams
from zephyr_ray.judging.parsing import SCORE_HIGH, SCORE_LOW, VERDICTS, decided, expected_rating
from zephyr_ray.judging.prompts import PAIRWISE, SINGLE

GENERATE, EXPECTED = "generate", "expected"
# Sampling temperature for retries when the first attempt was greedy (a greedy rerun repeats itself).
RETRY_TEMPERATURE = 0.7
# AIF's expected mode: the UltraFeedback answer prefilled up to its rating.
RATING_PREFIX = "Rating: "
# Evaluation's expected mode: the judge's answer up to where FastChat's format puts the verdict, the options scored
# there, and the closing marker each option is scored with ("1]]" vs "10]]": P("1") must not swallow "10").
EXPECTED_PREFIX = {SINGLE: "Rating: [[", PAIRWISE: "[["}
EXPECTED_OPTIONS = {SINGLE: [str(k) for k in range(int(SCORE_LOW), int(SCORE_HIGH) + 1)], PAIRWISE: ["A", "B", "C"]}
EXPECTED_SUFFIX = "]]"


@dataclass
class Judged:
    """One judgment: the last text the judge wrote, what was read from it, and what it cost."""

    text: str
    value: Any  # a float rating or a verdict; None when unreadable after every attempt
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    # Expected mode: the option probabilities (in the order of the options asked); None in generate mode.
    probs: list[float] | None = None


def judge_with_retries(engine: Any, conversations: Sequence[Conversation], parsers: Sequence[Callable[[str], Any]],
                       params: SamplingParams, max_attempts: int, retry_temperature: float = RETRY_TEMPERATURE
                       ) -> list[Judged]:
    """Ask the judge about every conversation (one batched call per attempt, over those still unread).

    ``parsers[i]`` reads conversation ``i``'s answer (``None``: unreadable, ask again). Attempt ``k`` (0-based)
    uses ``seed + k``; retries sample at ``retry_temperature`` when ``params`` is greedy (a greedy rerun would
    repeat itself). One completion per conversation (``n`` is set to 1). Token counts add up over attempts;
    ``Judged.attempts - 1`` is the number of retries.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if len(parsers) != len(conversations):
        raise ValueError(f"{len(parsers)} parsers for {len(conversations)} conversations")
    results = [Judged("", None, 0) for _ in conversations]
    todo = list(range(len(conversations)))
    for attempt in range(max_attempts):
        if not todo:
            break
        p = dataclasses.replace(params, n=1)
        if attempt:
            p = dataclasses.replace(p, seed=params.seed + attempt,
                                    temperature=params.temperature if params.temperature > 0 else retry_temperature)
        outputs = engine.generate([conversations[i] for i in todo], p)
        if len(outputs) != len(todo):
            raise RuntimeError(f"judge engine returned {len(outputs)} results for {len(todo)} conversations")
        still = []
        for i, out in zip(todo, outputs):
            r = results[i]
            r.attempts += 1
            if out:
                c = out[0]
                r.text, r.finish_reason = c.text, c.finish_reason
                r.prompt_tokens += c.prompt_tokens
                r.completion_tokens += c.completion_tokens
            else:
                r.text = ""
            r.value = parsers[i](r.text)
            if r.value is None:
                still.append(i)
        todo = still
    return results


def _require_scoring(engine: Any) -> None:
    if not callable(getattr(engine, "option_probs", None)):
        raise TypeError(f"judge mode 'expected' needs a local judge with option_probs (a ScoringEngine: the "
                        f"transformers or vllm backend); {type(engine).__name__} has none; use mode 'generate'")


def option_distributions(engine: Any, conversations: Sequence[Conversation], options: list[str], prefix: str,
                         suffix: str = "") -> list[list[float]]:
    """The judge's probabilities of ``options`` after ``prefix`` (``ScoringEngine.option_probs``), one list per
    conversation, checked: the engine must be able to score, and answer for every conversation."""
    _require_scoring(engine)
    probs = engine.option_probs(list(conversations), options, prefix=prefix, suffix=suffix)
    if len(probs) != len(conversations):
        raise RuntimeError(f"judge engine returned {len(probs)} results for {len(conversations)} conversations")
    return [[float(x) for x in p] for p in probs]


def _prompt_lengths(engine: Any, conversations: list[Conversation], prefix: str) -> list[int]:
    """Tokens of each prompt the judge read (conversation + generation prompt + prefix, cut from the left to
    max_prompt_length) where the engine can tell (transformers, vllm), else 0: truncation is counted from them."""
    if not callable(getattr(engine, "prompt_ids", None)) or getattr(engine, "tokenizer", None) is None:
        return [0] * len(conversations)
    prefix_ids = list(engine.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    return [len(ids) for ids in engine.prompt_ids(conversations, prefix_ids)]


def judge_expected(engine: Any, conversations: Sequence[Conversation], kinds: Sequence[str]) -> list[Judged]:
    """FastChat judgments in expected mode: one ``option_probs`` call per kind (``single`` / ``pairwise``), no text.

    ``Judged.value`` is the expected rating (single) or the most likely verdict (pairwise); ``probs`` holds the
    option probabilities (``EXPECTED_OPTIONS`` order). A degenerate distribution (NaN) leaves the value ``None``.
    """
    _require_scoring(engine)
    if len(kinds) != len(conversations):
        raise ValueError(f"{len(kinds)} kinds for {len(conversations)} conversations")
    results = [Judged("", None, 1) for _ in conversations]
    for kind in (SINGLE, PAIRWISE):
        index = [i for i, k in enumerate(kinds) if k == kind]
        if not index:
            continue
        convs = [conversations[i] for i in index]
        probs = option_distributions(engine, convs, EXPECTED_OPTIONS[kind], EXPECTED_PREFIX[kind], EXPECTED_SUFFIX)
        lengths = _prompt_lengths(engine, convs, EXPECTED_PREFIX[kind])
        for i, p, length in zip(index, probs, lengths, strict=True):
            r = results[i]
            r.probs, r.prompt_tokens, r.finish_reason = p, length, EXPECTED
            if kind == SINGLE:
                r.value = expected_rating(p, int(SCORE_LOW), int(SCORE_HIGH))
            else:
                r.value = decided(dict(zip(VERDICTS, p, strict=True)))
    return results
