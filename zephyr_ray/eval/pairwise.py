"""AlpacaEval-style pairwise evaluation: win rate against a reference model, and judge agreement.

The judge sees every (instruction, model output, reference output) twice, once with the model's answer
first (as assistant A) and once with it second, to cancel position bias.

Maths (pure; :func:`pairwise_stats`, :func:`agreement_stats`):

- per ordering, the model scores 1 for a win, 0.5 for a tie, 0 for a loss (``None``: unreadable verdict); a
  judge in expected mode gives probabilities instead of a verdict, and the model's score is then its
  probability-weighted preference P(its letter) + 0.5 * P(tie) (a verdict is the one-hot case);
- per instruction, the mean over its readable orderings (an instruction with none is ``unjudged`` and left
  out); the **win rate** is the mean over instructions and its **standard error** the sample standard
  deviation (n - 1) over instructions divided by sqrt(n);
- **position consistency**: among instructions with both orderings readable, the share where the two agree
  (the same winner, or a tie both times; in expected mode the most likely verdicts are compared);
  **first-position rate**: the share of decisive verdicts that picked the answer shown first (0.5 = no position
  preference; in expected mode P(A) / (P(A) + P(B)) summed over orderings).

Agreement: for preference rows (``output_1`` vs ``output_2`` with a label = P(output_1 is better): 1, 0 or
0.5 for a tie) the judge's preference p is computed as above with output_1 in the model's place; agreement
per row is ``1 - |p - label|`` (a split or tied judge against a clear label counts half), averaged, with its
standard error; ``exact`` is the share of rows where the judge lands on the label's side (tie = tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from zephyr_ray.data.preference import validate_pair
from zephyr_ray.data.prompts import prompt_id_of
from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.data.schema import RowProblem
from zephyr_ray.judging import TIE, Verdict, decided, instruction_text, verdict_probs

Outcome = tuple[Verdict, Verdict]  # (with the model shown first, with it shown second)


def ordering_score(verdict: Verdict, model_first: bool) -> float | None:
    """The model's score from one ordering: 1 win, 0.5 tie, 0 loss, or with probabilities the preference
    P(model's letter) + 0.5 * P(tie); ``None`` when unreadable."""
    probs = verdict_probs(verdict)
    if probs is None:
        return None
    return probs["A" if model_first else "B"] + 0.5 * probs[TIE]


def instruction_score(outcome: Outcome) -> float | None:
    """The mean of the model's scores over the readable orderings of one instruction."""
    scores = [s for s in (ordering_score(outcome[0], True), ordering_score(outcome[1], False)) if s is not None]
    return sum(scores) / len(scores) if scores else None


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample standard deviation, n - 1); ``None`` below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


@dataclass
class PairwiseStats:
    instructions: int = 0
    judged: int = 0
    unjudged: int = 0
    win_rate: float | None = None
    standard_error: float | None = None
    wins: int = 0
    ties: int = 0
    losses: int = 0
    both_orders: int = 0
    consistent: int = 0
    position_consistency: float | None = None
    first_position_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _position(outcomes: Sequence[Outcome]) -> tuple[int, int, float | None, float | None]:
    both = [(ordering_score(decided(a), True), ordering_score(decided(b), False)) for a, b in outcomes
            if decided(a) is not None and decided(b) is not None]
    consistent = sum(x == y for x, y in both)
    mass = [p for o in outcomes for p in map(verdict_probs, o) if p is not None]
    decisive = sum(p["A"] + p["B"] for p in mass)
    first = sum(p["A"] for p in mass) / decisive if decisive > 0 else None
    return len(both), consistent, consistent / len(both) if both else None, first


def pairwise_stats(outcomes: Sequence[Outcome]) -> PairwiseStats:
    """Win rate (ties half), its standard error, wins/ties/losses per instruction and position statistics."""
    scores = [s for s in (instruction_score(o) for o in outcomes) if s is not None]
    both, consistent, consistency, first = _position(outcomes)
    return PairwiseStats(
        instructions=len(outcomes), judged=len(scores), unjudged=len(outcomes) - len(scores),
        win_rate=sum(scores) / len(scores) if scores else None, standard_error=standard_error(scores),
        wins=sum(s > 0.5 for s in scores), ties=sum(s == 0.5 for s in scores), losses=sum(s < 0.5 for s in scores),
        both_orders=both, consistent=consistent, position_consistency=consistency, first_position_rate=first)


@dataclass
class AgreementStats:
    rows: int = 0
    judged: int = 0
    unjudged: int = 0
    agreement: float | None = None
    standard_error: float | None = None
    exact: float | None = None
    both_orders: int = 0
    consistent: int = 0
    position_consistency: float | None = None
    first_position_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _side(x: float) -> int:
    return (x > 0.5) - (x < 0.5)


def agreement_stats(outcomes: Sequence[Outcome], labels: Sequence[float]) -> AgreementStats:
    """How often the judge agrees with preference labels (P(output_1 is better)), output_1 in the model's place."""
    if len(outcomes) != len(labels):
        raise ValueError(f"{len(outcomes)} outcomes for {len(labels)} labels")
    per_row = [(instruction_score(o), float(label)) for o, label in zip(outcomes, labels)]
    judged = [(p, label) for p, label in per_row if p is not None]
    agree = [1 - abs(p - label) for p, label in judged]
    both, consistent, consistency, first = _position(outcomes)
    return AgreementStats(
        rows=len(outcomes), judged=len(judged), unjudged=len(outcomes) - len(judged),
        agreement=sum(agree) / len(agree) if agree else None, standard_error=standard_error(agree),
        exact=sum(_side(p) == _side(label) for p, label in judged) / len(judged) if judged else None,
        both_orders=both, consistent=consistent, position_consistency=consistency, first_position_rate=first)


# ---------------------------------------------------------------------------------------------------
# Input rows
# ---------------------------------------------------------------------------------------------------

def _text(row: dict[str, Any]) -> str:
    for name in ("instruction", "prompt"):
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise RowProblem(name, f"expected a non-empty string, got {value!r:.60}")
            return value
    raise RowProblem("instruction", "missing (an `instruction` or `prompt` string is needed)")


def _output(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(field, f"expected a string, got {type(value).__name__}")
    return value


def validate_instruction(row: dict[str, Any]) -> dict[str, Any]:
    """``{instruction_id, instruction, outputs: [(model, text)]}`` from an instruction row; outputs may come
    grouped (``completions: [{model, text}]``) or flat (``output``/``completion`` + ``generator``/``model``)."""
    text = _text(row)
    pid = row.get("prompt_id", row.get("instruction_id"))
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == ""):
        raise RowProblem("prompt_id", f"expected a non-empty string, got {pid!r:.60}")
    outputs = []
    if row.get("completions") is not None:
        items = row["completions"]
        if not isinstance(items, list):
            raise RowProblem("completions", "expected a list of {model, text}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RowProblem(f"completions[{i}]", f"expected an object, got {type(item).__name__}")
            model = item.get("model", item.get("generator"))
            if not isinstance(model, str) or not model:
                raise RowProblem(f"completions[{i}].model", f"expected a model name, got {model!r:.60}")
            outputs.append((model, _output(item.get("text", item.get("completion", item.get("output"))),
                                           f"completions[{i}].text")))
    else:
        for field in ("output", "completion"):
            if field in row:
                model = row.get("generator", row.get("model"))
                if not isinstance(model, str) or not model:
                    raise RowProblem("generator", f"an output needs its model name (generator or model), got {model!r:.60}")
                outputs.append((model, _output(row[field], field)))
                break
    return {"instruction_id": str(pid) if pid is not None else prompt_id_of(text), "instruction": text,
            "outputs": outputs}


@dataclass
class Instructions:
    """Unique instructions in file order, and every model's first output for each (keyed by instruction text)."""

    items: list[dict[str, str]]
    outputs: dict[str, dict[str, str]]
    report: DataReport
    repeated_outputs: int = 0


def collect_instructions(rows: list[dict[str, Any]], on_bad_row: str, source: str) -> Instructions:
    report = DataReport()
    items: list[dict[str, str]] = []
    outputs: dict[str, dict[str, str]] = {}
    ids: dict[str, str] = {}
    repeated = 0
    for _, row in valid_rows(rows, validate_instruction, on_bad_row, report):
        text, iid = row["instruction"], row["instruction_id"]
        if text not in outputs:
            if ids.setdefault(iid, text) != text:
                raise ValueError(f"{source}: id {iid!r} names two different instructions")
            items.append({"instruction_id": iid, "instruction": text})
            outputs[text] = {}
        for model, out in row["outputs"]:
            if model in outputs[text]:
                repeated += 1  # a second sample of the same model: the first one is used
            else:
                outputs[text][model] = out
    report.used = len(items)
    return Instructions(items, outputs, report, repeated)


def validate_preference(row: dict[str, Any]) -> dict[str, Any]:
    """``{instruction, output_1, output_2, label}`` (label = P(output_1 is better)) from a preference row:
    ``chosen``/``rejected`` (the ``ultrafeedback_binarized`` schema; output_1 = chosen, label 1) or AlpacaEval
    annotations (``instruction``, ``output_1``, ``output_2``, ``preference`` in [1, 2]: 1 = output_1 better,
    2 = output_2 better, 1.5 = tie)."""
    if "output_1" in row or "output_2" in row:
        text = _text(row)
        out1, out2 = _output(row.get("output_1"), "output_1"), _output(row.get("output_2"), "output_2")
        pref = row.get("preference")
        if isinstance(pref, bool) or not isinstance(pref, (int, float)) or not 1 <= pref <= 2:
            raise RowProblem("preference", f"expected a number in [1, 2] (1: output_1 better, 2: output_2), got {pref!r:.60}")
        return {"instruction": text, "output_1": out1, "output_2": out2, "label": 2.0 - float(pref)}
    if "chosen" in row or "rejected" in row:
        pair = validate_pair(row)
        return {"instruction": instruction_text(pair.prompt), "output_1": pair.chosen, "output_2": pair.rejected,
                "label": 1.0}
    raise RowProblem("chosen", "expected chosen/rejected, or output_1/output_2/preference")
