"""The dSFT data pipeline: raw rows → validated dialogues → token ids with assistant labels → packed rows.

Runs inside Ray Data ``map_batches`` tasks; the same code gives the driver's planning pass (counts,
skips, steps) and the stream the train workers consume, so the two always agree.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zephyr_ray.config import DataConfig
from zephyr_ray.data.packing import pack_sequences
from zephyr_ray.data.rows import DataReport, raise_bad_row, valid_rows
from zephyr_ray.data.schema import RowProblem, validate_messages
from zephyr_ray.data.tokenize import IGNORE_INDEX, cached_tokenizer, tokenize_messages

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)


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
            if cfg.overlong == "error":
                raise ref.error(problem)
            if cfg.overlong == "skip":
                report.skip(ref, problem)
                continue
            tok = {k: v[: cfg.max_length] for k, v in tok.items()}
            report.truncated += 1
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
    else:
        out = [{"input_ids": s["input_ids"], "labels": s["labels"], "position_ids": list(range(len(s["input_ids"]))),
                "sample_ids": [s["sample_id"]]} for s in seqs]
    report.packed_rows = len(out)
    return out, report


def _schema() -> pa.Schema:
    import pyarrow as pa

    ints = pa.list_(pa.int64())
    return pa.schema([("input_ids", ints), ("labels", ints), ("position_ids", ints), ("sample_ids", pa.list_(pa.string()))])


def _sft_batch(batch: pa.Table, tokenizer_path: str, cfg: DataConfig) -> pa.Table:
    import pyarrow as pa

    out, _ = sft_examples(batch.to_pylist(), cached_tokenizer(tokenizer_path), cfg)
    return pa.Table.from_pylist(out, schema=_schema())


def _sft_report(batch: pa.Table, tokenizer_path: str, cfg: DataConfig) -> pa.Table:
    import pyarrow as pa

    _, report = sft_examples(batch.to_pylist(), cached_tokenizer(tokenizer_path), cfg)
    return pa.table({"report": [report.to_json()]})


def sft_dataset(rows: ray.data.Dataset, tokenizer_path: str, cfg: DataConfig, report: bool = False) -> ray.data.Dataset:
    """Training rows (or, with ``report``, one DataReport per batch) from raw rows."""
    if cfg.shuffle:
        rows = rows.random_shuffle(seed=cfg.seed)
    fn = _sft_report if report else _sft_batch
    return rows.map_batches(fn, batch_format="pyarrow", batch_size=cfg.pack_window,
                            fn_kwargs={"tokenizer_path": tokenizer_path, "cfg": cfg})


def plan(rows: ray.data.Dataset, tokenizer_path: str, cfg: DataConfig) -> DataReport:
    """One streaming pass on the cluster: validates every row and counts training rows and tokens."""
    total = DataReport()
    try:
        for item in sft_dataset(rows, tokenizer_path, cfg, report=True).iter_rows():
            total.merge(DataReport.from_json(item["report"]))
    except Exception as exc:
        raise_bad_row(exc)
        raise
    return total
