"""Preference pairs in the ``ultrafeedback_binarized`` schema → prompt / chosen / rejected token ids.

The prompt is rendered once, with the chat template and its generation prompt, and each response is
tokenized on its own (content + EOS) and appended, so chosen and rejected share the prompt ids token
for token even where a string concatenation would let BPE merge across the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from zephyr_ray.config import DataConfig
from zephyr_ray.data.packing import longest_first
from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.data.schema import RowProblem, validate_messages


@dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]  # every turn before the final assistant answer
    chosen: str
    rejected: str


def _side(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    value = row.get(name)
    if isinstance(value, str):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowProblem("prompt", f"a non-empty string is needed when {name} is a string")
        value = [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
    return validate_messages(value, field=name)


def validate_pair(row: dict[str, Any]) -> Pair:
    """``chosen``/``rejected`` as message lists (sharing every turn but the last) or strings with a
    ``prompt`` string. Identical answers are a bad row: the pair carries no preference."""
    chosen, rejected = _side(row, "chosen"), _side(row, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem("rejected", "its prompt turns differ from chosen's")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RowProblem("rejected", "identical to chosen")
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def prompt_ids(tokenizer: Any, prompt: list[dict[str, str]]) -> list[int]:
    """The prompt turns rendered by the chat template, generation prompt included."""
    return list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """An answer tokenized on its own (content + EOS), to be appended to its prompt's ids."""
    return tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def tokenize_pair(tokenizer: Any, pair: Pair) -> dict[str, list[int]]:
    return {"prompt_ids": prompt_ids(tokenizer, pair.prompt), "chosen_ids": answer_ids(tokenizer, pair.chosen),
            "rejected_ids": answer_ids(tokenizer, pair.rejected)}


def truncate_pair(ids: dict[str, list[int]], max_length: int, max_prompt_length: int) -> tuple[dict[str, list[int]], bool]:
    """Prompt cut from the left to ``max_prompt_length``, then responses from the right so that
    prompt + response fits ``max_length``. Returns the ids and whether anything was cut."""
    prompt = ids["prompt_ids"][-max_prompt_length:]
    room = max_length - len(prompt)
    out = {"prompt_ids": prompt, "chosen_ids": ids["chosen_ids"][:room], "rejected_ids": ids["rejected_ids"][:room]}
    return out, any(len(out[k]) != len(ids[k]) for k in ids)


def preference_examples(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig, max_prompt_length: int
                        ) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized pairs plus the tallies of what happened (``cfg.overlong`` applies to the pair).
    ``max_prompt_length < cfg.max_length`` is ``DPORecipe.problems``' rule, checked when the config loads."""
    report = DataReport()
    out = []
    for ref, pair in valid_rows(rows, validate_pair, cfg.on_bad_row, report):
        ids = tokenize_pair(tokenizer, pair)
        cut, truncated = truncate_pair(ids, cfg.max_length, max_prompt_length)
        if truncated:
            longest = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
            problem = RowProblem("prompt", f"{longest} tokens is longer than the length limits "
                                           f"(max_length={cfg.max_length}, max_prompt_length={max_prompt_length})")
            if report.overlong(ref, problem, cfg.overlong):
                continue
        report.used += 1
        report.tokens += 2 * len(cut["prompt_ids"]) + len(cut["chosen_ids"]) + len(cut["rejected_ids"])
        report.label_tokens += len(cut["chosen_ids"]) + len(cut["rejected_ids"])
        out.append({**cut, "sample_ids": [f"{ref.source}#{ref.row}"]})
    if cfg.group_by_length:  # padded: little padding; packed: the workers' micro-batches alike (less waiting)
        out = longest_first(out, lambda r: len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])))
    report.packed_rows = len(out)
    return out, report


def preference_schema() -> pa.Schema:
    ints = pa.list_(pa.int64())
    return pa.schema([("prompt_ids", ints), ("chosen_ids", ints), ("rejected_ids", ints),
                      ("sample_ids", pa.list_(pa.string()))])
