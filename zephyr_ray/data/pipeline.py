"""Raw rows → a stage's training rows, as Ray Data ``map_batches`` tasks.

A stage supplies ``examples(rows, tokenizer, cfg) -> (training rows, DataReport)`` and the Arrow
schema of its rows. The same function gives the driver's planning pass (validation, counts, steps)
and the stream the train workers consume, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zephyr_ray.config import DataConfig
from zephyr_ray.data.rows import DataReport, raise_bad_row
from zephyr_ray.data.tokenize import cached_tokenizer

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

Examples = Callable[[list[dict[str, Any]], Any, DataConfig], tuple[list[dict[str, Any]], DataReport]]


def _rows(batch: pa.Table, examples: Examples, schema: pa.Schema, tokenizer_path: str, cfg: DataConfig,
          chat_template: str | None = None) -> pa.Table:
    import pyarrow as pa

    out, _ = examples(batch.to_pylist(), cached_tokenizer(tokenizer_path, chat_template), cfg)
    return pa.Table.from_pylist(out, schema=schema)


def _report(batch: pa.Table, examples: Examples, tokenizer_path: str, cfg: DataConfig,
            chat_template: str | None = None) -> pa.Table:
    import pyarrow as pa

    _, report = examples(batch.to_pylist(), cached_tokenizer(tokenizer_path, chat_template), cfg)
    return pa.table({"report": [report.to_json()]})


def stage_dataset(rows: ray.data.Dataset, examples: Examples, schema: pa.Schema, tokenizer_path: str,
                  cfg: DataConfig, chat_template: str | None = None) -> ray.data.Dataset:
    """Training rows, streamed (shuffled first when ``cfg.shuffle``, with a fixed seed); tokenized with
    ``chat_template`` (``model.chat_template``) when given."""
    return _shuffled(rows, cfg).map_batches(
        _rows, batch_format="pyarrow", batch_size=cfg.pack_window,
        fn_kwargs={"examples": examples, "schema": schema, "tokenizer_path": tokenizer_path, "cfg": cfg,
                   "chat_template": chat_template})


def plan(rows: ray.data.Dataset, examples: Examples, tokenizer_path: str, cfg: DataConfig,
         chat_template: str | None = None) -> DataReport:
    """One streaming pass on the cluster: validates every row and counts training rows and tokens.
    A bad row under ``on_bad_row=error`` surfaces here as :class:`BadRowError`, before training."""
    reports = _shuffled(rows, cfg).map_batches(
        _report, batch_format="pyarrow", batch_size=cfg.pack_window,
        fn_kwargs={"examples": examples, "tokenizer_path": tokenizer_path, "cfg": cfg, "chat_template": chat_template})
    total = DataReport()
    try:
        for item in reports.iter_rows():
            total.merge(DataReport.from_json(item["report"]))
    except Exception as exc:
        raise_bad_row(exc)
        raise
    return total


def _shuffled(rows: ray.data.Dataset, cfg: DataConfig) -> ray.data.Dataset:
    return rows.random_shuffle(seed=cfg.seed) if cfg.shuffle else rows
