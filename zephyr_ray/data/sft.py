"""dSFT examples: validated dialogues → token ids with assistant labels → packed rows."""

from __future__ import annotations

import random
from typing import Any

import pyarrow as pa

from zephyr_ray.config import DataConfig
from zephyr_ray.data.packing import longest_first, pack_sequences
from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.data.schema import RowProblem, validate_messages
from zephyr_ray.data.tokenize import IGNORE_INDEX, tokenize_messages


def _validate(row: dict[str, Any]) -> list[dict[str, str]]:
    return validate_messages(row.get("messages"))


def sft_examples(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig) -> tuple[list[dict[str, Any]], DataReport]:
    """Tokenized (and, if configured, packed) training rows plus the tallies of what happened."""
    report = DataReport()
    seqs = []
    for ref, messages in valid_rows(rows, _validate, cfg.on_bad_row, report):
        tok = tokenize_messages(tokenizer, messages)
        n = len(tok["input_ids"])
        if n > cfg.max_length:
            problem = RowProblem("messages", f"{n} tokens is longer than data.max_length={cfg.max_length}")
            if report.overlong(ref, problem, cfg.overlong):
                continue
            tok = {k: v[: cfg.max_length] for k, v in tok.items()}
        trained = sum(1 for t in tok["labels"][1:] if t != IGNORE_INDEX)
        if trained == 0:
            report.skip(ref, RowProblem("messages", "no assistant token within data.max_length"))
            continue
        report.used += 1
        report.tokens += len(tok["input_ids"])
        report.label_tokens += trained
        seqs.append({**tok, "sample_id": f"{ref.source}#{ref.row}"})
    if cfg.packing:
        out = pack_sequences(seqs, cfg.max_length)
        if cfg.shuffle and seqs:
            # Best-fit decreasing emits the fullest rows first (long dialogues, then packed short ones);
            # mix them so a window's steps are alike. Seeded by the window's content: reruns match.
            random.Random(f"{cfg.seed}:{seqs[0]['sample_id']}").shuffle(out)
    else:
        out = [{"input_ids": s["input_ids"], "labels": s["labels"], "position_ids": list(range(len(s["input_ids"]))),
                "sample_ids": [s["sample_id"]]} for s in seqs]
        if cfg.group_by_length:
            out = longest_first(out, lambda r: len(r["input_ids"]))
    report.packed_rows = len(out)
    return out, report


def sft_schema() -> pa.Schema:
    ints = pa.list_(pa.int64())
    return pa.schema([("input_ids", ints), ("labels", ints), ("position_ids", ints), ("sample_ids", pa.list_(pa.string()))])
