"""Unpaired feedback for KTO: rows ``{prompt, completion, label}`` → prompt / completion / mismatched-completion ids.

A row is one answer judged on its own: ``label`` true (desirable) or false (undesirable); no second answer to
the same prompt is needed. KTO's reference point is a KL estimate from mismatched (prompt, completion) pairs, so
each example also carries ``kl_completion_ids``: another row's completion to be scored after this row's prompt.
The pairing is fixed here, when the data is prepared, so a reference model can score it once up front.

Prompt and completion are tokenized as for preference pairs (``data.preference``): the prompt rendered once with
the chat template's generation prompt, each answer on its own (content + EOS) appended to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from zephyr_ray.config import DataConfig
from zephyr_ray.data.packing import longest_first
from zephyr_ray.data.preference import answer_ids, prompt_ids
from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.data.schema import RowProblem, validate_messages

log = logging.getLogger(__name__)

# KTO's advice (Ethayarajh et al., 2024, §4.2; TRL warns likewise): desirable_weight·n_desirable over
# undesirable_weight·n_undesirable should lie in [1, 4/3].
BALANCE_RANGE = (1.0, 4 / 3)


@dataclass(frozen=True)
class Unpaired:
    prompt: list[dict[str, str]]  # every turn before the judged answer, ending with the user's
    completion: str
    desirable: bool


def _prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    value = row.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem("prompt", "empty prompt")
        return [{"role": "user", "content": value}]
    if value is None:
        raise RowProblem("prompt", "missing (a string or a list of messages ending with the user's turn)")
    return validate_messages(value, field="prompt", last_role="user")


def _completion(row: dict[str, Any]) -> list[dict[str, str]]:
    """The completion as turns continuing the prompt: assistant, then alternating user/assistant, ending with the
    assistant (a string or one message is the usual single answer)."""
    value = row.get("completion")
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem("completion", "empty completion")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise RowProblem("completion", "expected a string, an assistant message or a non-empty list of messages, "
                                       f"got {type(value).__name__}")
    turns = []
    for i, msg in enumerate(value):
        where = f"completion[{i}]"
        if not isinstance(msg, dict):
            raise RowProblem(where, f"expected an object with role and content, got {type(msg).__name__}")
        expected = "assistant" if i % 2 == 0 else "user"
        if msg.get("role") != expected:
            raise RowProblem(f"{where}.role", f"expected {expected!r} (the completion continues the prompt: "
                                              f"assistant, then alternating user/assistant), got {msg.get('role')!r}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise RowProblem(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RowProblem(f"{where}.content", "empty turn")
        turns.append({"role": expected, "content": content})
    if turns[-1]["role"] != "assistant":
        raise RowProblem(f"completion[{len(turns) - 1}].role", "the last turn must be the assistant's")
    return turns


def validate_unpaired(row: dict[str, Any]) -> Unpaired:
    """``prompt`` (string or messages ending with the user's turn), ``completion`` (string, assistant message or
    messages continuing the prompt) and a boolean ``label``. As for preference pairs, only the final assistant
    turn is judged: earlier completion turns join the prompt."""
    label = row.get("label")
    if not isinstance(label, (bool, np.bool_)):
        raise RowProblem("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    turns = _prompt(row) + _completion(row)
    return Unpaired(turns[:-1], turns[-1]["content"], bool(label))


def tokenize_unpaired(tokenizer: Any, example: Unpaired) -> dict[str, list[int]]:
    return {"prompt_ids": prompt_ids(tokenizer, example.prompt), "completion_ids": answer_ids(tokenizer, example.completion)}


def truncate_unpaired(ids: dict[str, list[int]], max_length: int, max_prompt_length: int
                      ) -> tuple[dict[str, list[int]], bool]:
    """Prompt cut from the left to ``max_prompt_length``, then the completion from the right so that prompt +
    completion fits ``max_length``. Returns the ids and whether anything was cut."""
    prompt = ids["prompt_ids"][-max_prompt_length:]
    out = {"prompt_ids": prompt, "completion_ids": ids["completion_ids"][: max_length - len(prompt)]}
    return out, any(len(out[k]) != len(ids[k]) for k in out)


def mismatched_partners(prompts: list[list[int]], group_size: int) -> list[int]:
    """For each row, the row whose completion it is paired with for the KL estimate: deterministic, and within its
    group of ``group_size`` consecutive rows (a micro-batch's rows, so its KL pairs use the completions it trains
    on, as TRL's rotation within a batch). A last group of one row joins the group before it.

    Row k takes the nearest row before it, cyclically in its group, whose prompt differs from its own (a
    completion to the same prompt is not mismatched); where every prompt of the group is the same, row k - 1.
    A single row overall has no other completion: it keeps its own (its KL term is then its own log-ratio).
    """
    if group_size < 2:
        raise ValueError(f"the KL estimate needs groups of at least 2 rows, got {group_size}")
    n = len(prompts)
    starts = list(range(0, n, group_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    partners = []
    for g, start in enumerate(starts):
        end = starts[g + 1] if g + 1 < len(starts) else n
        size = end - start
        for k in range(size):
            before = [start + (k - d) % size for d in range(1, size)]
            other = [j for j in before if prompts[j] != prompts[start + k]]
            partners.append(other[0] if other else (before[0] if before else start + k))
    return partners


def with_mismatched(examples: list[dict[str, Any]], group_size: int, max_length: int) -> list[dict[str, Any]]:
    """``examples`` with ``kl_completion_ids``: their partner's completion (``mismatched_partners``), cut to fit
    ``max_length`` after this row's prompt."""
    partners = mismatched_partners([e["prompt_ids"] for e in examples], group_size)
    if len(examples) == 1:
        log.warning("a batch of one unpaired row: its KL pair is its own completion (no other to mismatch it with)")
    return [{**e, "kl_completion_ids": examples[p]["completion_ids"][: max_length - len(e["prompt_ids"])]}
            for e, p in zip(examples, partners)]


def unpaired_examples(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig, max_prompt_length: int,
                      kl_group: int) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized unpaired rows with their mismatched KL completions (groups of ``kl_group`` rows: the training
    micro-batch size), plus the tallies (``cfg.overlong`` applies to prompt + completion). ``label_tokens`` counts
    completions only: the KL pairs are scored, never trained."""
    if max_prompt_length >= cfg.max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} leaves no room in data.max_length={cfg.max_length}")
    report = DataReport()
    out = []
    for ref, example in valid_rows(rows, validate_unpaired, cfg.on_bad_row, report):
        ids = tokenize_unpaired(tokenizer, example)
        cut, truncated = truncate_unpaired(ids, cfg.max_length, max_prompt_length)
        if truncated:
            problem = RowProblem("completion", f"{len(ids['prompt_ids']) + len(ids['completion_ids'])} tokens is longer "
                                               f"than the length limits (max_length={cfg.max_length}, "
                                               f"max_prompt_length={max_prompt_length})")
            if report.overlong(ref, problem, cfg.overlong):
                continue
        report.used += 1
        out.append({**cut, "label": example.desirable, "sample_ids": [f"{ref.source}#{ref.row}"]})
    if cfg.group_by_length:  # neighbours of similar length: little padding, and KL groups of similar length too
        out = longest_first(out, lambda r: len(r["prompt_ids"]) + len(r["completion_ids"]))
    out = with_mismatched(out, kl_group, cfg.max_length) if out else out
    for r in out:
        report.tokens += 2 * len(r["prompt_ids"]) + len(r["completion_ids"]) + len(r["kl_completion_ids"])
        report.label_tokens += len(r["completion_ids"])
    report.packed_rows = len(out)
    return out, report


def pair_layout(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch of unpaired examples under the preference pairs' column names, so the pair collator and reference
    scorer serve KTO unchanged: sequence i is row i's prompt + completion ("chosen"), sequence B + i its prompt +
    mismatched completion ("rejected"). ``label`` is left out: the objective reads it from the batch itself."""
    renamed = {"completion_ids": "chosen_ids", "kl_completion_ids": "rejected_ids"}
    return {renamed.get(k, k): v for k, v in batch.items() if k != "label"}


def balance_warning(num_desirable: int, num_undesirable: int, desirable_weight: float, undesirable_weight: float
                    ) -> str | None:
    """A warning when the weighted desirable:undesirable ratio leaves ``BALANCE_RANGE`` (None when inside, or when
    one label is absent: nothing to balance)."""
    if num_desirable == 0 or num_undesirable == 0:
        return None
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return None
    return (f"KTO: desirable_weight*{num_desirable} / (undesirable_weight*{num_undesirable}) = {ratio:.2f}, outside "
            f"[{low:g}, {high:.3g}] (the KTO paper's advice); e.g. desirable_weight in "
            f"[{low * undesirable_weight * num_undesirable / num_desirable:.3g}, "
            f"{high * undesirable_weight * num_undesirable / num_desirable:.3g}]")


def unpaired_schema() -> pa.Schema:
    ints = pa.list_(pa.int64())
    return pa.schema([("prompt_ids", ints), ("completion_ids", ints), ("kl_completion_ids", ints), ("label", pa.bool_()),
                      ("sample_ids", pa.list_(pa.string()))])
