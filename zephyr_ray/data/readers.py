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
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, FileBasedDatasource, ReadTask

SOURCE, ROW, RAW_JSON = "_source", "_row", "_json"
_BLOCK_ROWS = 4096
# A JSONL file is read as shards of about this many bytes, one Ray Data read task each.
SHARD_BYTES = 4 * 2**20
_JSONL_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _lines_table(path: str, lines: list[str], numbers: list[int]) -> pa.Table:
    return pa.table({SOURCE: [path] * len(lines), ROW: numbers, RAW_JSON: lines})


def _shard_starts(f: pa.NativeFile, size: int, shard_bytes: int, chunk_bytes: int = 1 << 20) -> list[tuple[int, int]]:
    """(byte offset, 1-based line number) of each shard's first line: the first line that starts at or after
    ``shard_bytes`` past the previous shard's start; one sequential pass counting newlines."""
    out, target, pos, newlines = [(0, 1)], shard_bytes, 0, 0
    for chunk in iter(lambda: f.read(chunk_bytes), b""):
        while target - 1 - pos < len(chunk):
            i = chunk.find(b"\n", max(target - 1 - pos, 0))  # a line starts after a newline at >= target - 1
            if i < 0 or pos + i + 1 >= size:
                break
            out.append((pos + i + 1, newlines + chunk.count(b"\n", 0, i + 1) + 1))
            target = pos + i + 1 + shard_bytes
        newlines += chunk.count(b"\n")
        pos += len(chunk)
    return out


class JsonlRows(Datasource):
    """One row per non-blank line: ``_source``, ``_row`` (1-based line number), ``_json`` (the line).

    A file is split at line boundaries into shards of about ``SHARD_BYTES``, each its own read task (a ``.gz``
    file, which cannot be entered in the middle, is one): with one task per file, a large file would be pushed
    into the object store whole however slowly the operators after it consume, since Ray Data's backpressure
    can only hold back tasks not yet started. The driver counts each shard's first line number in one pass."""

    def __init__(self, path: str, shard_bytes: int = SHARD_BYTES):
        self._fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(),
                                                                                str(Path(path).absolute()))
        info = self._fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            infos = [f for f in self._fs.get_file_info(pafs.FileSelector(root, recursive=True))
                     if f.type == pafs.FileType.File and f.path.lower().endswith(_JSONL_EXTENSIONS)]
        elif info.type == pafs.FileType.File:
            infos = [info]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        if not infos:
            raise FileNotFoundError(f"{path}: no .jsonl or .json files")
        prefix = path[: path.index("://") + 3] if "://" in path else ""
        self._sizes = {f.path: f.size or 0 for f in infos}  # bytes on disk, from the listing: no second look
        self._names = {f.path: f.path if "://" in f.path else prefix + f.path for f in infos}  # as rows name it
        self._shards: list[tuple[str, int, int | None, int]] = []  # (file, start, end, first line number)
        for file in sorted(self._sizes):
            if file.lower().endswith(".gz"):
                self._shards.append((file, 0, None, 1))  # read whole; its end is not a byte offset
                continue
            with self._fs.open_input_file(file) as f:
                starts = _shard_starts(f, self._sizes[file], shard_bytes)
            ends = [s for s, _ in starts[1:]] + [self._sizes[file]]
            self._shards += [(file, start, end, line) for (start, line), end in zip(starts, ends)]

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self._sizes.values())

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for file, start, end, line in self._shards:
            name = self._names[file]
            size = (self._sizes[file] if end is None else end) - start
            meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=(name,))
            tasks.append(ReadTask(lambda a=(self._fs, file, name, start, end, line): _read_shard(*a), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _read_shard(fs: pafs.FileSystem, file: str, name: str, start: int, end: int | None, first_line: int
                ) -> Iterator[pa.Table]:
    """The lines of bytes [start, end) of ``file`` (a whole ``.gz`` file when ``end`` is None), in tables of
    _BLOCK_ROWS."""
    if file.lower().endswith(".gz"):
        stream = fs.open_input_stream(file, compression="gzip")
    else:
        stream = fs.open_input_file(file)
        stream.seek(start)
    with stream:
        raw = stream.read(end - start) if end is not None else stream.read()
    lines, numbers = [], []
    for number, line in enumerate(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", newline="\n"), first_line):
        if line.strip():
            lines.append(line)
            numbers.append(number)
        if len(lines) == _BLOCK_ROWS:
            yield _lines_table(name, lines, numbers)
            lines, numbers = [], []
    if lines:
        yield _lines_table(name, lines, numbers)


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
        ds = ray.data.read_datasource(JsonlRows(path))
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
