"""Raw rows → a stage's training rows, as Ray Data ``map_batches`` tasks.

A stage supplies ``examples(rows, tokenizer, cfg) -> (training rows, DataReport)`` and the Arrow
schema of its rows. The same function gives the driver's planning pass (validation, counts, steps)
and the stream the train workers consume, so the two always agree.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data import ExecutionOptions, ExecutionResources

from zephyr_ray.config import DataConfig
from zephyr_ray.data.rows import DataReport, raise_bad_row
from zephyr_ray.data.tokenize import cached_tokenizer

if TYPE_CHECKING:
    import ray.data

Examples = Callable[[list[dict[str, Any]], Any, DataConfig], tuple[list[dict[str, Any]], DataReport]]


def _rows(batch: pa.Table, examples: Examples, schema: pa.Schema, tokenizer_path: str, cfg: DataConfig,
          chat_template: str | None = None) -> pa.Table:
    out, _ = examples(batch.to_pylist(), cached_tokenizer(tokenizer_path, chat_template), cfg)
    return pa.Table.from_pylist(out, schema=schema)


def _report(batch: pa.Table, examples: Examples, tokenizer_path: str, cfg: DataConfig,
            chat_template: str | None = None) -> pa.Table:
    _, report = examples(batch.to_pylist(), cached_tokenizer(tokenizer_path, chat_template), cfg)
    return pa.table({"report": [report.to_json()]})


def stage_dataset(rows: ray.data.Dataset, examples: Examples, schema: pa.Schema, tokenizer_path: str,
                  cfg: DataConfig, chat_template: str | None = None) -> ray.data.Dataset:
    """Training rows, streamed (shuffled first when ``cfg.shuffle``, with a fixed seed); tokenized with
    ``chat_template`` (``model.chat_template``) when given."""
    return bounded(_shuffled(rows, cfg).map_batches(
        _rows, batch_format="pyarrow", batch_size=cfg.pack_window,
        fn_kwargs={"examples": examples, "schema": schema, "tokenizer_path": tokenizer_path, "cfg": cfg,
                   "chat_template": chat_template}), cfg)


def plan(rows: ray.data.Dataset, examples: Examples, tokenizer_path: str, cfg: DataConfig,
         chat_template: str | None = None) -> DataReport:
    """One streaming pass on the cluster: validates every row and counts training rows and tokens.
    A bad row under ``on_bad_row=error`` surfaces here as :class:`BadRowError`, before training."""
    reports = _shuffled(rows, cfg).map_batches(
        _report, batch_format="pyarrow", batch_size=cfg.pack_window,
        fn_kwargs={"examples": examples, "tokenizer_path": tokenizer_path, "cfg": cfg, "chat_template": chat_template})
    # The same shuffle and pack windows as the training stream (Ray Train preserves order), so the counts agree.
    bounded(reports, cfg)
    total = DataReport()
    try:
        for item in reports.iter_rows():
            total.merge(DataReport.from_json(item["report"]))
    except Exception as exc:
        raise_bad_row(exc)
        raise
    return total


def stream_options(cfg: DataConfig) -> ExecutionOptions:
    """Ray Data's execution options for a stage's data: order kept, object store bounded by
    ``data.stream_buffer_mb`` (with JSONL read in shards, the data never sits whole in the store)."""
    return ExecutionOptions(preserve_order=True,
                            resource_limits=ExecutionResources(object_store_memory=cfg.stream_buffer_mb * 2**20))


def bounded(ds: ray.data.Dataset, cfg: DataConfig) -> ray.data.Dataset:
    """``ds`` with :func:`stream_options` and blocks of at most a quarter of ``data.stream_buffer_mb``: the
    budget holds back tasks not yet started, while a running task (tokenizing a shuffle window: tens of MB of
    token ids) stops after two unconsumed blocks, so small blocks keep it from running far ahead."""
    ds.context.execution_options = stream_options(cfg)
    ds.context.target_max_block_size = max(cfg.stream_buffer_mb * 2**20 // 4, 2**20)
    return ds


def window_order(n: int, seed: int, first_row: dict[str, Any]) -> list[int]:
    """The permutation of a window of ``n`` rows: seeded by ``seed`` and a digest of the window's first row, never by
    process state (Python's ``hash`` is salted per process), so every run and every restart sees the same order
    and a resume that skips the micro-batches already trained skips exactly those rows."""
    key = json.dumps(first_row, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def _shuffle_window(batch: pa.Table, seed: int) -> pa.Table:
    if batch.num_rows < 2:
        return batch
    return batch.take(window_order(batch.num_rows, seed, batch.slice(0, 1).to_pylist()[0]))


def _shuffled(rows: ray.data.Dataset, cfg: DataConfig) -> ray.data.Dataset:
    """Windowed shuffle: each ``shuffle_window`` rows in a seeded order. Ray Data's ``random_shuffle`` is an
    all-to-all barrier that holds the whole dataset before its first row goes out; this streams."""
    if not cfg.shuffle:
        return rows
    return rows.map_batches(_shuffle_window, batch_format="pyarrow", batch_size=cfg.shuffle_window,
                            fn_kwargs={"seed": cfg.seed})
