"""MT-Bench (Zheng et al., 2023) in FastChat's file formats: questions, reference answers, answering, grading.

- **Questions** (``question.jsonl``): ``question_id`` (int or string), ``category``, ``turns`` (exactly two
  user turns), optional ``reference`` (a list of up to two strings, one per turn).
- **Reference answers** (``reference_answer/gpt-4.jsonl``, FastChat's model-answer format): ``question_id``
  and ``choices[0].turns``. The reference-guided categories (math, reasoning, coding by default) are graded
  against the file's answer, else against the question's own ``reference``; a question of those categories
  with neither (or an empty one) is graded with the general prompt and counted (``no_reference``).
- **Answering**: turn 1, then turn 2 with the model's own turn-1 answer in the context; the temperature is the
  category's (FastChat's ``temperature_config``), other sampling parameters are shared.
- **Grading** (single-answer, 1-10): turn 1 with ``single-v1`` (``single-math-v1`` with the reference), turn
  2 with the ``-multi-turn`` variants, which show the whole conversation and grade the second answer.
- **Scores**: the mean rating per turn, per category (both turns) and overall (every rated turn), per model;
  unreadable judgments are left out of the means and counted.

Everything here is pure (no Ray); :mod:`zephyr_ray.eval.run` runs the answers and the judge on actor pools.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from zephyr_ray.config import MTBenchConfig, resolve_path
from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.data.schema import RowProblem
from zephyr_ray.eval.inputs import read_input_rows
from zephyr_ray.generation.pool import KEY
from zephyr_ray.generation.types import Conversation, Engine, SamplingParams
from zephyr_ray.judging import SINGLE, JudgePrompt

TURNS = 2


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (unit keys change whenever what a unit asks changes)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None

    @property
    def qid(self) -> str:
        return str(self.question_id)


def _question_id(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise RowProblem("question_id", f"expected an integer or a non-empty string, got {value!r:.60}")
    return value


def validate_question(row: dict[str, Any], categories: Sequence[str]) -> Question:
    qid = _question_id(row.get("question_id"))
    category = row.get("category")
    if not isinstance(category, str) or category not in categories:
        raise RowProblem("category", f"unknown category {category!r:.60}; expected one of {list(categories)} "
                                     "(eval.mt_bench.categories)")
    turns = row.get("turns")
    if not isinstance(turns, list):
        raise RowProblem("turns", f"expected a list of {TURNS} strings, got {type(turns).__name__}")
    if len(turns) != TURNS:
        raise RowProblem("turns", f"expected {TURNS} turns (MT-Bench questions are two-turn), got {len(turns)}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise RowProblem(f"turns[{i}]", f"expected a non-empty string, got {turn!r:.60}")
    reference = row.get("reference")
    if reference is not None:
        if not isinstance(reference, list) or len(reference) > TURNS:
            raise RowProblem("reference", f"expected a list of up to {TURNS} strings (one per turn)")
        for i, ref in enumerate(reference):
            if not isinstance(ref, str):
                raise RowProblem(f"reference[{i}]", f"expected a string, got {type(ref).__name__}")
    return Question(qid, category, tuple(turns), tuple(reference) if reference is not None else None)


def _unique(items: Iterable[tuple[Any, Any]], key: Any, what: str, on_bad_row: str, report: DataReport) -> list[Any]:
    """Items whose ``key(item)`` was not seen before; a repeat is a bad row (raised or counted)."""
    seen: dict[str, Any] = {}
    out = []
    for ref, item in items:
        k = key(item)
        if k in seen:
            problem = RowProblem("question_id", f"{what} {k} is repeated (first at {seen[k]})")
            if on_bad_row == "error":
                raise ref.error(problem)
            report.skip(ref, problem)
            continue
        seen[k] = ref
        out.append(item)
    return out


def select(questions: list[Question], per_category: int | None, limit: int | None) -> list[Question]:
    """The first ``per_category`` questions of each category (file order kept), then the first ``limit``."""
    if per_category is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for q in questions:
            if taken[q.category] < per_category:
                taken[q.category] += 1
                kept.append(q)
        questions = kept
    return questions[:limit] if limit is not None else questions


def load_questions(cfg: MTBenchConfig) -> tuple[list[Question], DataReport]:
    """Validated questions (file order) after ``per_category`` / ``limit``; a bad row names file, line, field."""
    path = resolve_path(cfg.questions)
    report = DataReport()
    rows = read_input_rows(path)
    checked = valid_rows(rows, lambda r: validate_question(r, cfg.categories), cfg.on_bad_row, report)
    questions = _unique(checked, lambda q: q.qid, "question_id", cfg.on_bad_row, report)
    questions = select(questions, cfg.per_category, cfg.limit)
    report.used = len(questions)
    if not questions:
        raise ValueError(f"{path}: no usable MT-Bench questions")
    return questions, report


def validate_reference_answer(row: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """``(question_id, turns)`` from a FastChat model-answer row (``choices[0].turns``)."""
    qid = _question_id(row.get("question_id"))
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RowProblem("choices", "expected a non-empty list of {index, turns}")
    turns = choices[0].get("turns")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("choices[0].turns", "expected a non-empty list of strings")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise RowProblem(f"choices[0].turns[{i}]", f"expected a string, got {type(turn).__name__}")
    return str(qid), tuple(turns)


def load_reference_answers(path: str, on_bad_row: str = "error") -> dict[str, tuple[str, ...]]:
    path = resolve_path(path)
    report = DataReport()
    checked = valid_rows(read_input_rows(path), validate_reference_answer, on_bad_row, report)
    return dict(_unique(((ref, a) for ref, a in checked), lambda a: a[0], "reference answer for question_id",
                        on_bad_row, report))


def references(questions: Sequence[Question], answers: dict[str, tuple[str, ...]],
               categories: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
    """For each question of a reference-guided category: its reference turns (the file's answer, else the
    question's own ``reference``; ``None`` when neither exists). Other questions are absent."""
    return {q.qid: answers.get(q.qid) or q.reference for q in questions if q.category in categories}


# ---------------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------------

def answer_messages(q: Question, turn: int, first_answer: str | None = None) -> Conversation:
    """What the model sees for ``turn`` (1 or 2): turn 2 carries its own turn-1 answer."""
    if turn == 1:
        return [{"role": "user", "content": q.turns[0]}]
    if first_answer is None:
        raise ValueError(f"question {q.qid}: turn 2 needs the turn-1 answer")
    return [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": first_answer},
            {"role": "user", "content": q.turns[1]}]


def temperature(q: Question, temperatures: dict[str, float], sampling: SamplingParams) -> float:
    return float(temperatures.get(q.category, sampling.temperature))


def answer_units(questions: Sequence[Question], turn: int, first_answers: dict[str, str] | None,
                 temperatures: dict[str, float], sampling: SamplingParams) -> list[dict[str, Any]]:
    """Pool units of one turn; a unit's key changes with its prompt, temperature and sampling parameters."""
    units = []
    for q in questions:
        messages = answer_messages(q, turn, first_answers[q.qid] if turn == 2 and first_answers else None)
        t = temperature(q, temperatures, sampling)
        units.append({KEY: f"{q.qid}#{digest(messages, t, asdict(sampling))}", "question_id": q.qid,
                      "category": q.category, "turn": turn, "temperature": t, "messages": messages})
    return units


def answer_work(engine: Engine, units: list[dict[str, Any]], *, params: SamplingParams, model: str
                ) -> list[dict[str, Any]]:
    """Pool work: one greedy/sampled answer per unit, one engine call per distinct temperature."""
    groups: dict[float, list[int]] = defaultdict(list)
    for i, u in enumerate(units):
        groups[float(u["temperature"])].append(i)
    out: list[dict[str, Any]] = [{} for _ in units]
    for t, idx in groups.items():
        completions = engine.generate([units[i]["messages"] for i in idx], replace(params, temperature=t, n=1))
        for i, outs in zip(idx, completions, strict=True):
            c, u = outs[0], units[i]
            out[i] = {KEY: u[KEY], "question_id": u["question_id"], "category": u["category"], "turn": u["turn"],
                      "model": model, "messages": u["messages"], "answer": c.text.strip(), "temperature": t,
                      "prompt_tokens": c.prompt_tokens,
                      "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
    return out


# ---------------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GradingPrompts:
    single: JudgePrompt
    reference: JudgePrompt
    multi_turn: JudgePrompt
    reference_multi_turn: JudgePrompt


def judge_units(model: str, questions: Sequence[Question], answers: dict[str, tuple[str, str]],
                refs: dict[str, tuple[str, ...] | None], prompts: GradingPrompts, salt: str) -> list[dict[str, Any]]:
    """The judge's units for one model: each question's turn 1 and turn 2 (``salt``: the judge's settings)."""
    units = []
    for q in questions:
        a1, a2 = answers[q.qid]
        ref = refs.get(q.qid) or ()
        for turn in (1, 2):
            has_ref = len(ref) >= turn and all(r.strip() for r in ref[:turn])
            values = {"ref_answer_1": ref[0] if has_ref else "", "ref_answer_2": ref[1] if has_ref and turn == 2 else ""}
            if turn == 1:
                prompt = prompts.reference if has_ref else prompts.single
                values.update(question=q.turns[0], answer=a1)
            else:
                prompt = prompts.reference_multi_turn if has_ref else prompts.multi_turn
                values.update(question_1=q.turns[0], answer_1=a1, question_2=q.turns[1], answer_2=a2)
            messages = prompt.conversation(**values)
            meta = {"bench": "mt_bench", "model": model, "question_id": q.question_id, "category": q.category,
                    "turn": turn, "prompt": prompt.name, "reference": has_ref,
                    "no_reference": q.qid in refs and not has_ref}
            units.append({KEY: f"mt_bench|{model}|{q.qid}|{turn}#{digest(messages, salt)}", "kind": SINGLE,
                          "messages": messages, "meta": json.dumps(meta)})
    return units



# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def scores(judgments: Iterable[dict[str, Any]], models: Sequence[str], categories: Sequence[str]
           ) -> dict[str, dict[str, Any]]:
    """Per model: mean rating of turn 1, of turn 2, overall (every rated turn) and per category (both turns),
    with the counts behind them. ``judgments``: rows with ``model``, ``category``, ``turn``, ``score`` (None =
    unreadable, left out of every mean) and ``attempts``."""
    out: dict[str, dict[str, Any]] = {}
    rows_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in judgments:
        rows_of[row["model"]].append(row)
    for model in models:
        rows = rows_of.get(model, [])
        rated = [r for r in rows if r["score"] is not None]
        out[model] = {
            "turn_1": _mean([r["score"] for r in rated if r["turn"] == 1]),
            "turn_2": _mean([r["score"] for r in rated if r["turn"] == 2]),
            "overall": _mean([r["score"] for r in rated]),
            "categories": {c: _mean([r["score"] for r in rated if r["category"] == c]) for c in categories},
            "judgments": len(rows),
            "rated": len(rated),
            "parse_failures": len(rows) - len(rated),
            "judge_calls": sum(int(r.get("attempts") or 0) for r in rows),
            "no_reference": sum(bool(r.get("no_reference")) for r in rows),
        }
    return out
