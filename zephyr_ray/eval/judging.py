"""LLM-as-a-judge in FastChat's formats: judge prompts, the rating and verdict parsers, retries.

Pure and Ray-free: the eval stage calls :func:`judge_work` inside the judge's actor pool.

- **Prompts** come from a file in FastChat's ``judge_prompts.jsonl`` format, one JSON object a line:
  ``name``, ``type`` (``single`` or ``pairwise``), ``system_prompt`` (may be empty), ``prompt_template``
  with ``{placeholders}``, and optional ``description``, ``category``, ``output_format``. The judge sees a
  system turn (when the system prompt is not blank) and one user turn, the template filled in one pass
  (:func:`zephyr_ray.feedback.judge.fill`: text put in for one placeholder is never scanned for another,
  and other braces stay as written).
- **Ratings** (single-answer grading, 1-10): :func:`parse_score` reads ``[[x]]``, else ``[x]``.
- **Verdicts** (pairwise): :func:`parse_verdict` reads ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).
- **Retries**: :func:`judge_with_retries` re-asks the judge about the judgments it could not read (new
  seed; sampling on when the first attempt was greedy), up to ``max_attempts`` calls each; what is still
  unreadable after that is kept with the value ``None`` and counted, never dropped.
- **Modes** (``eval.judge.mode``): ``generate`` is all of the above (FastChat's way; for GPT-4-class judges).
  ``expected`` (:func:`judge_expected`, local judges only) asks nothing to be written: the judge's answer is
  prefilled up to where the verdict goes (``Rating: [[`` for a rating, ``[[`` for a pairwise verdict; the
  FastChat prompt is unchanged, it asks for an explanation first, but the prefill skips it) and one forward pass
  gives the distribution over the options ``1``..``10`` (or ``A``, ``B``, ``C`` = tie), each scored with its
  closing ``]]`` as a whole token sequence (``ScoringEngine.option_probs``). A rating is then
  ``sum_k k * P(k)``; a verdict is kept as its probabilities, and the win rate uses the probability-weighted
  preference (:func:`zephyr_ray.eval.pairwise.ordering_score`). A small local judge that never writes a
  readable ``[[rating]]`` still scores every answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zephyr_ray.data.schema import BadRowError, RowProblem, RowRef
from zephyr_ray.feedback.judge import RETRY_TEMPERATURE, expected_rating, fill
from zephyr_ray.generation.pool import KEY
from zephyr_ray.generation.types import Conversation, SamplingParams

SINGLE, PAIRWISE = "single", "pairwise"
TIE = "tie"
SCORE_LOW, SCORE_HIGH = 1.0, 10.0
GENERATE, EXPECTED = "generate", "expected"
# Expected mode: the judge's answer up to where FastChat's format puts the verdict, the options scored there, and
# the closing marker each option is scored with ("1]]" vs "10]]": P("1") must not swallow "10").
EXPECTED_PREFIX = {SINGLE: "Rating: [[", PAIRWISE: "[["}
EXPECTED_OPTIONS = {SINGLE: [str(k) for k in range(int(SCORE_LOW), int(SCORE_HIGH) + 1)], PAIRWISE: ["A", "B", "C"]}
EXPECTED_SUFFIX = "]]"
# What the pairwise options mean (C is FastChat's tie).
VERDICTS = ("A", "B", TIE)
# A verdict ("A", "B" or tie; None: unreadable) or, in expected mode, the judge's probabilities {"A", "B", tie}.
Verdict = str | dict[str, float] | None

# What a prompt of each role must be able to show the judge.
ROLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "single": (SINGLE, ("question", "answer")),
    "single-reference": (SINGLE, ("question", "answer", "ref_answer_1")),
    "single-multi-turn": (SINGLE, ("question_1", "answer_1", "question_2", "answer_2")),
    "single-reference-multi-turn": (SINGLE, ("question_1", "answer_1", "question_2", "answer_2", "ref_answer_1",
                                             "ref_answer_2")),
    "pairwise": (PAIRWISE, ("question", "answer_a", "answer_b")),
}


# ---------------------------------------------------------------------------------------------------
# Judge prompts
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str = ""

    def conversation(self, **values: str) -> Conversation:
        """The judge's chat: the system prompt (if any), then the template filled with ``values``."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        messages.append({"role": "user", "content": fill(self.prompt_template, **values)})
        return messages


def _validate_prompt(row: dict[str, Any]) -> JudgePrompt:
    for name in ("name", "prompt_template"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise RowProblem(name, f"expected a non-empty string, got {row.get(name)!r:.60}")
    if row.get("type") not in (SINGLE, PAIRWISE):
        raise RowProblem("type", f"expected 'single' or 'pairwise', got {row.get('type')!r:.60}")
    system = row.get("system_prompt", "")
    if not isinstance(system, str):
        raise RowProblem("system_prompt", f"expected a string, got {type(system).__name__}")
    fmt = row.get("output_format", "")
    return JudgePrompt(row["name"], row["type"], system, row["prompt_template"], fmt if isinstance(fmt, str) else "")


def load_judge_prompts(path: str) -> dict[str, JudgePrompt]:
    """``{name: JudgePrompt}`` from a FastChat ``judge_prompts.jsonl``; a bad line raises naming file, line, field."""
    import fsspec

    prompts: dict[str, JudgePrompt] = {}
    with fsspec.open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            ref = RowRef(path, number, "line")
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowProblem("<json>", f"expected an object, got {type(row).__name__}")
                prompt = _validate_prompt(row)
            except json.JSONDecodeError as exc:
                raise BadRowError(f"{ref}: field <json>: malformed JSON ({exc.msg} at column {exc.colno})") from None
            except RowProblem as problem:
                raise BadRowError(f"{ref}: {problem}") from None
            if prompt.name in prompts:
                raise BadRowError(f"{ref}: field name: judge prompt {prompt.name!r} is defined twice")
            prompts[prompt.name] = prompt
    if not prompts:
        raise ValueError(f"{path}: no judge prompts")
    return prompts


def require_prompt(prompts: dict[str, JudgePrompt], name: str, role: str, source: str) -> JudgePrompt:
    """The prompt ``name``, checked to be of the right type and to hold every placeholder ``role`` needs."""
    kind, needed = ROLES[role]
    if name not in prompts:
        raise ValueError(f"{source}: no judge prompt named {name!r} (needed for {role} grading); "
                         f"the file has {sorted(prompts)}")
    prompt = prompts[name]
    if prompt.type != kind:
        raise ValueError(f"{source}: judge prompt {name!r} has type {prompt.type!r}; {role} grading needs {kind!r}")
    missing = [p for p in needed if "{" + p + "}" not in prompt.prompt_template]
    if missing:
        raise ValueError(f"{source}: judge prompt {name!r}: prompt_template lacks "
                         f"{', '.join('{' + p + '}' for p in missing)}")
    return prompt


# ---------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_DOUBLE = re.compile(r"\[\[" + _NUMBER + r"\]\]")
_SINGLE = re.compile(r"(?<!\[)\[" + _NUMBER + r"\](?!\])")
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


# ---------------------------------------------------------------------------------------------------
# Asking the judge
# ---------------------------------------------------------------------------------------------------

@dataclass
class Judged:
    """One judgment: the last text the judge wrote, what was read from it, and what it cost."""

    text: str
    value: Any  # a float rating or a verdict; None when unreadable after every attempt
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    # Expected mode: the option probabilities (EXPECTED_OPTIONS order); None in generate mode.
    probs: list[float] | None = None


def judge_with_retries(engine: Any, conversations: Sequence[Conversation], parsers: Sequence[Callable[[str], Any]],
                       params: SamplingParams, max_attempts: int, retry_temperature: float = RETRY_TEMPERATURE
                       ) -> list[Judged]:
    """Ask the judge about every conversation (one batched call per attempt, over those still unread).

    Attempt ``k`` (0-based) uses ``seed + k``; retries sample at ``retry_temperature`` when ``params`` is greedy
    (a greedy rerun would repeat itself). Token counts add up over attempts.
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


def judge_label(name: str, mode: str) -> str:
    """How a judge's numbers were made, for results.json and the report."""
    how = "probability-weighted" if mode == EXPECTED else "parsed [[rating]] / [[verdict]] from its text"
    return f"{name} ({mode}: {how})"


def verdict_of(row: dict[str, Any]) -> Any:
    """A pairwise judgment's verdict: ``{"A": p, "B": p, tie: p}`` in expected mode (its ``probs``), else the
    parsed verdict (``None``: unreadable)."""
    probs = row.get("probs")
    return dict(zip(VERDICTS, probs, strict=True)) if probs is not None else row["verdict"]


def _prompt_lengths(engine: Any, conversations: list[Conversation], prefix: str) -> list[int]:
    """Tokens of each prompt the judge read (conversation + generation prompt + prefix, cut from the left to
    max_prompt_length) where the engine can tell (transformers, vllm), else 0: truncation is counted from them."""
    if not callable(getattr(engine, "prompt_ids", None)) or getattr(engine, "tokenizer", None) is None:
        return [0] * len(conversations)
    prefix_ids = list(engine.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    return [len(ids) for ids in engine.prompt_ids(conversations, prefix_ids)]


def judge_expected(engine: Any, conversations: Sequence[Conversation], kinds: Sequence[str]) -> list[Judged]:
    """Expected-mode judgments: one ``option_probs`` call per kind (one forward pass per conversation), no text.

    ``Judged.value`` is the expected rating (single) or the most likely verdict (pairwise); ``probs`` holds the
    option probabilities (``EXPECTED_OPTIONS`` order). A degenerate distribution (NaN) leaves the value ``None``.
    """
    if not callable(getattr(engine, "option_probs", None)):
        raise TypeError(f"judge mode 'expected' needs a local judge with option_probs (a ScoringEngine: the "
                        f"transformers or vllm backend); {type(engine).__name__} has none; use mode 'generate'")
    if len(kinds) != len(conversations):
        raise ValueError(f"{len(kinds)} kinds for {len(conversations)} conversations")
    results = [Judged("", None, 1) for _ in conversations]
    for kind in (SINGLE, PAIRWISE):
        index = [i for i, k in enumerate(kinds) if k == kind]
        if not index:
            continue
        convs = [conversations[i] for i in index]
        probs = engine.option_probs(convs, EXPECTED_OPTIONS[kind], prefix=EXPECTED_PREFIX[kind], suffix=EXPECTED_SUFFIX)
        if len(probs) != len(index):
            raise RuntimeError(f"judge engine returned {len(probs)} results for {len(index)} conversations")
        lengths = _prompt_lengths(engine, convs, EXPECTED_PREFIX[kind])
        for i, p, length in zip(index, probs, lengths, strict=True):
            p = [float(x) for x in p]
            r = results[i]
            r.probs, r.prompt_tokens, r.finish_reason = p, length, EXPECTED
            if kind == SINGLE:
                r.value = expected_rating(p, int(SCORE_LOW), int(SCORE_HIGH))
            else:
                r.value = decided(dict(zip(VERDICTS, p, strict=True)))
    return results


def judge_work(engine: Any, units: list[dict[str, Any]], *, params: SamplingParams, max_attempts: int,
               judge: str, mode: str = GENERATE) -> list[dict[str, Any]]:
    """Pool work: judge every unit (``kind`` single or pairwise, ``messages``, ``meta`` JSON), one row each.
    ``mode`` generate: FastChat's text, parsed, with retries; expected: :func:`judge_expected`."""
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
