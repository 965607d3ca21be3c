"""Leaderboard-style multiple-choice scoring, as lm-evaluation-harness does it: pure functions, no Ray, no torch.

A task is a JSONL file of rows ``{question | context, choices: [...], gold: int}`` (TruthfulQA-MC2 rows carry
``labels: [1/0 per choice]`` instead of, or beside, ``gold``; MMLU rows may carry ``subject``). A row becomes
one *context* (task description + few-shot examples + the row's own prompt) and one *continuation* per choice
(``" " + choice``); the model scores each continuation by the sum of its tokens' log-probabilities given the
context (``zephyr_ray/eval/loglikelihood.py``), and the metrics follow lm-eval:

* ``acc``: the choice with the largest summed log-probability is the gold one;
* ``acc_norm``: the same after dividing each sum by the length of the choice text (lm-eval calls this byte-length
  normalisation; its code divides by ``len(choice)``, the characters of the choice without the leading space, which
  is the byte length for ASCII text; we do the same);
* ``mc2`` (TruthfulQA): the probability mass on the true answers, normalised over all answers,
  ``sum_true exp(ll) / sum_all exp(ll)`` (computed with log-sum-exp, so very negative sums do not underflow);
* the standard error of each mean is the sample standard deviation over rows / sqrt(n) (lm-eval's
  ``mean_stderr``).

Prompt formats (``format``), fewshot examples joined by ``"\\n\\n"``, the answer after a single space:

* ``qa`` (ARC): ``"Question: {question}\\nAnswer:"``, answers are the choice texts;
* ``continuation`` (HellaSwag): the context itself, answers are the endings;
* ``mmlu``: ``"{question}\\nA. ..\\nB. ..\\n...\\nAnswer:"``, answers are the letters ``" A"``, ``" B"`` ...
  (``acc_norm`` over letters equals ``acc``); the task description may name the row's ``{subject}``;
* ``truthfulqa``: ``"Q: {question}\\nA:"``, answers are the choice texts (lm-eval also puts a fixed six-question
  preamble before it; give it as the task's ``description`` to reproduce that).

Token boundary (lm-eval's ``_encode_pair``): trailing whitespace of the context moves to the front of the
continuation; the context is tokenized alone, context + continuation together, and the continuation tokens are
the whole's tokens after the context's length. An empty context is replaced by one BOS/EOS token.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
FORMATS = ("qa", "continuation", "mmlu", "truthfulqa")
METRICS = ("acc", "acc_norm", "mc2")


@dataclass(frozen=True)
class Doc:
    """One task row: the question (or context), its choices, the gold index and, for mc2, a 0/1 label per choice."""

    question: str
    choices: tuple[str, ...]
    gold: int | None = None
    labels: tuple[int, ...] | None = None
    subject: str = ""


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------

def parse_doc(row: dict[str, Any], metric: str, where: str = "row") -> Doc:
    """A validated :class:`Doc`; a bad row raises ``ValueError`` naming ``where`` and the field."""
    question = row.get("question", row.get("context"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: needs a non-empty string `question` or `context`")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: `choices` must be a list of at least 2 non-empty strings")
    gold, labels = row.get("gold"), row.get("labels")
    if gold is not None and (isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices)):
        raise ValueError(f"{where}: `gold` must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) != len(choices) or any(v not in (0, 1) for v in labels) \
                or any(isinstance(v, bool) for v in labels):
            raise ValueError(f"{where}: `labels` must be one 0/1 per choice ({len(choices)}), got {labels!r}")
        if 1 not in labels:
            raise ValueError(f"{where}: `labels` has no true (1) answer")
        if gold is None:
            gold = labels.index(1)
    if metric == "mc2" and labels is None:
        raise ValueError(f"{where}: metric mc2 needs `labels` (1 = true answer, per choice)")
    if gold is None:
        raise ValueError(f"{where}: needs `gold` (the index of the right choice)")
    subject = row.get("subject", "")
    if not isinstance(subject, str):
        raise ValueError(f"{where}: `subject` must be a string")
    return Doc(question, tuple(choices), gold, tuple(labels) if labels is not None else None, subject)


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------

def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def doc_to_text(doc: Doc, fmt: str) -> str:
    """The row's own prompt, without the answer."""
    if fmt == "qa":
        return f"Question: {doc.question}\nAnswer:"
    if fmt == "continuation":
        return doc.question
    if fmt == "mmlu":
        lines = [doc.question.strip(), *(f"{letter}. {c}" for letter, c in zip(_letters(len(doc.choices)), doc.choices))]
        return "\n".join(lines) + "\nAnswer:"
    if fmt == "truthfulqa":
        return f"Q: {doc.question}\nA:"
    raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")


def doc_to_choices(doc: Doc, fmt: str) -> list[str]:
    """The scored answer texts (without the target delimiter): the choices, or the letters for ``mmlu``."""
    return _letters(len(doc.choices)) if fmt == "mmlu" else list(doc.choices)


def doc_to_target(doc: Doc, fmt: str) -> str:
    """The gold answer text a few-shot example shows."""
    return doc_to_choices(doc, fmt)[doc.gold]


def fewshot_context(doc: Doc, fmt: str, examples: Sequence[Doc], description: str = "") -> str:
    """``description`` + each example's prompt and gold answer, then the row's prompt (lm-eval's layout)."""
    shots = "".join(doc_to_text(ex, fmt) + TARGET_DELIMITER + doc_to_target(ex, fmt) + FEWSHOT_DELIMITER
                    for ex in examples)
    desc = description.format(subject=doc.subject.replace("_", " ")) if description else ""
    return desc + shots + doc_to_text(doc, fmt)


def sample_fewshot(pool: Sequence[Doc], k: int, seed: int, task: str, index: int, exclude: Doc | None = None
                   ) -> list[Doc]:
    """``k`` examples drawn from ``pool`` without replacement, reproducibly per (seed, task, row); ``exclude``
    (the row itself, when the pool is its own split) is never drawn."""
    if k <= 0:
        return []
    candidates = [d for d in pool if d is not exclude and d != exclude]
    if len(candidates) < k:
        raise ValueError(f"task {task}: {k} few-shot examples asked, the pool has {len(candidates)}")
    return random.Random(f"{seed}:{task}:{index}").sample(candidates, k)


def requests_for(doc: Doc, fmt: str, context: str) -> list[tuple[str, str]]:
    """One (context, continuation) pair per choice."""
    return [(context, TARGET_DELIMITER + choice) for choice in doc_to_choices(doc, fmt)]


# ---------------------------------------------------------------------------------------------------
# Token boundary
# ---------------------------------------------------------------------------------------------------

def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int | None = None
                ) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-eval's ``_encode_pair``: the context's trailing whitespace moves
    to the continuation, the continuation ids are those of ``encode(context + continuation)`` after the first
    ``len(encode(context))``. An empty context becomes ``[prefix_id]`` (lm-eval: the EOT/BOS token)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(encode(context + continuation))
    if not context:
        if prefix_id is None:
            raise ValueError("an empty context needs a prefix token (BOS or EOS)")
        return [prefix_id], whole
    ctx = list(encode(context))
    return ctx, whole[len(ctx):]


def hf_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``encode`` for :func:`encode_pair` from a HF tokenizer, without special tokens (lm-eval's HFLM default)."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def prefix_token(tokenizer: Any) -> int:
    """What an empty context is replaced with: BOS when the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima, as numpy's argmax


def acc(lls: Sequence[float], gold: int) -> float:
    return float(_argmax(lls) == gold)


def acc_norm(lls: Sequence[float], choices: Sequence[str], gold: int) -> float:
    return float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold)


def mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
    """Normalised probability of the true answers: sum over labels == 1 of exp(ll), over the sum of all."""
    top = max(lls)
    weights = [math.exp(ll - top) for ll in lls]
    return sum(w for w, label in zip(weights, labels) if label == 1) / sum(weights)


def doc_metrics(doc: Doc, fmt: str, lls: Sequence[float]) -> dict[str, float]:
    """acc and acc_norm of one row (and mc2 when it has labels)."""
    if len(lls) != len(doc.choices):
        raise ValueError(f"{len(lls)} log-likelihoods for {len(doc.choices)} choices")
    out = {"acc": acc(lls, doc.gold), "acc_norm": acc_norm(lls, doc_to_choices(doc, fmt), doc.gold)}
    if doc.labels is not None:
        out["mc2"] = mc2(lls, doc.labels)
    return out


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample sd / sqrt(n); None for fewer than 2 values)."""
    n = len(values)
    if not n:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(per_doc: Sequence[dict[str, float]], metric: str, num_fewshot: int) -> dict[str, Any]:
    """One task's results: every metric the rows have, with ``<metric>_stderr``; ``metric`` / ``value`` /
    ``stderr`` name the headline one; ``n`` rows; ``num_fewshot``."""
    out: dict[str, Any] = {"metric": metric}
    names = [m for m in METRICS if per_doc and all(m in d for d in per_doc)]
    for m in names:
        out[m], out[f"{m}_stderr"] = mean_stderr([d[m] for d in per_doc])
    out.update({"value": out[metric], "stderr": out[f"{metric}_stderr"], "n": len(per_doc),
                "num_fewshot": num_fewshot})
    return out


def markdown_table(results: dict[str, Any]) -> str:
    """``report.md``: one row per model, the headline metric of each task (± stderr) and their average; then
    every metric of every task."""
    tasks = list(results["tasks"])
    models = results["models"]

    def cell(r: dict[str, Any]) -> str:
        return f"{100 * r['value']:.1f} ± {100 * r['stderr']:.1f}" if r.get("stderr") is not None \
            else f"{100 * r['value']:.1f}"

    head = [f"{t} ({results['tasks'][t]['metric']}, {results['tasks'][t]['num_fewshot']}-shot)" for t in tasks]
    lines = [f"# Leaderboard-style evaluation ({results['backend']})", "",
             "| model | " + " | ".join(head) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for name, m in models.items():
        avg = m.get("average")
        lines.append(f"| {name} | " + " | ".join(cell(m["tasks"][t]) if t in m["tasks"] else "n/a" for t in tasks)
                     + f" | {'n/a' if avg is None else f'{100 * avg:.1f}'} |")
    lines += ["", "Scores in %, ± one standard error (sample sd / √n). Average: mean of the headline metrics.", "",
              "| model | task | n | shots | acc | acc_norm | mc2 |", "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for t in tasks:
            r = m["tasks"].get(t)
            if r is None:
                continue
            vals = [f"{100 * r[k]:.1f}" if r.get(k) is not None else "" for k in ("acc", "acc_norm", "mc2")]
            lines.append(f"| {name} | {t} | {r.get('n', '')} | {r['num_fewshot']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
