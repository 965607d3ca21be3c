"""Readers from JSONL, Parquet and `datasets` folders (local or any fsspec/pyarrow URL) into Ray Data.

Every row keeps where it came from (``_source`` and ``_row``) so a bad one can be named. JSONL lines
are carried raw (``_json``) and parsed during validation: a malformed line is a bad row, not a crash
of the whole file.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

SOURCE, ROW, RAW_JSON = "_source", "_row", "_json"
_BLOCK_ROWS = 4096
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class JsonlRows(FileBasedDatasource):
    """One row per non-blank line: ``_source``, ``_row`` (1-based line number), ``_json`` (the line)."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        lines, numbers = [], []
        for number, line in enumerate(io.TextIOWrapper(f, encoding="utf-8", newline="\n"), 1):
            if line.strip():
                lines.append(line)
                numbers.append(number)
            if len(lines) == _BLOCK_ROWS:
                yield pa.table({SOURCE: [path] * len(lines), ROW: numbers, RAW_JSON: lines})
                lines, numbers = [], []
        if lines:
            yield pa.table({SOURCE: [path] * len(lines), ROW: numbers, RAW_JSON: lines})


class ParquetRows(FileBasedDatasource):
    """Parquet rows with ``_source`` and ``_row`` (0-based row in the file) added."""

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        start = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_BLOCK_ROWS):
            table = pa.Table.from_batches([batch])
            n = table.num_rows
            table = table.append_column(SOURCE, pa.array([path] * n)).append_column(ROW, pa.array(range(start, start + n)))
            start += n
            yield table


def detect_format(path: str) -> str:
    """``jsonl``, ``parquet``, ``hf_disk`` or ``hf_hub`` from the path's shape."""
    lowered = path.lower().rstrip("/")
    if lowered.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if lowered.endswith(".parquet"):
        return "parquet"
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        names = [Path(p).name for p in fs.ls(root, detail=False)]
        if {"dataset_info.json", "state.json", "dataset_dict.json"} & set(names):
            return "hf_disk"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".jsonl", ".json")) for n in names):
            return "jsonl"
        raise ValueError(f"{path}: a folder with no .jsonl, .parquet or `datasets` files")
    if "://" not in path and _HUB_ID.match(path) and not fs.exists(root):
        return "hf_hub"
    raise FileNotFoundError(f"{path}: no such file or folder (and not a hub dataset id)")


def _from_hf(ds, source: str) -> ray.data.Dataset:
    ds = ds.add_column(SOURCE, [source] * len(ds)).add_column(ROW, list(range(len(ds))))
    return ray.data.from_huggingface(ds)


def read_rows(path: str, fmt: str = "auto", split: str = "train", limit: int | None = None) -> ray.data.Dataset:
    """A Ray Dataset of raw rows with their provenance columns; nothing is validated here."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        ds = ray.data.read_datasource(JsonlRows(path, file_extensions=["jsonl", "json", "gz"]))
    elif fmt == "parquet":
        ds = ray.data.read_datasource(ParquetRows(path, file_extensions=["parquet"]))
    elif fmt == "hf_disk":
        import datasets

        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split {split!r}; it has {list(loaded)}")
            loaded = loaded[split]
        ds = _from_hf(loaded, f"{path}[{split}]")
    elif fmt == "hf_hub":
        import datasets

        ds = _from_hf(datasets.load_dataset(path, split=split), f"{path}[{split}]")
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return ds.limit(limit) if limit else ds
