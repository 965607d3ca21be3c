"""A data mixture (``data.mixture``): several sources read, renamed, split and weighted into one list of raw rows.

Each source is read in full on the driver (no Ray), its columns renamed (``columns``), its prompts split into
training and held-out rows by ``data/split.py`` (the same rule as ``data.eval_fraction``), and its training rows
weighted: ``weight`` 2.5 keeps every row twice plus a seeded half. Every output row has the shape a JSONL row of
``read_rows`` has (``_source``, ``_row``, the row as JSON in ``_json``, plus ``_unit``: line or row), so rows of
sources with different column types fit one Arrow table, and validation parses and names them as it does any
row. The result depends only on the sources and ``seed``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

from zephyr_ray.config import ConfigError, MixtureSource, resolve_path
from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE, detect_format
from zephyr_ray.data.rows import UNIT
from zephyr_ray.data.split import held_out, prompt_text

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass
class SourceReport:
    """One source's counts, for ``data_report.json``: rows read, held out, and used for training (after weight)."""

    index: int
    path: str
    weight: float
    eval_fraction: float
    rows: int = 0
    held_out: int = 0
    used: int = 0


@dataclass
class Mixture:
    """Training rows (weighted) and held-out rows (each once) of all sources, in source order."""

    train: list[dict[str, Any]] = field(default_factory=list)
    held_out: list[dict[str, Any]] = field(default_factory=list)
    sources: list[SourceReport] = field(default_factory=list)

    def report(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.sources]


@dataclass
class _Row:
    source: str
    row: int
    unit: str
    data: dict[str, Any] | None  # None: a line that is not a JSON object (kept raw: validation reports it)
    raw: str = ""

    def out(self) -> dict[str, Any]:
        text = self.raw if self.data is None else json.dumps(self.data, ensure_ascii=False, default=str)
        return {SOURCE: self.source, ROW: self.row, UNIT: self.unit, RAW_JSON: text}


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        return [path]
    names = sorted(p for p in fs.ls(root, detail=False) if str(p).lower().endswith(suffixes))
    return [fs.unstrip_protocol(p) if "://" in path else p for p in names]


def _jsonl(path: str, limit: int | None) -> Iterator[_Row]:
    n = 0
    for file in _files(path, _JSONL_SUFFIXES):
        with fsspec.open(file, "rt", encoding="utf-8", compression="infer") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if limit is not None and n >= limit:
                    return
                n += 1
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    data = None
                yield _Row(file, number, "line", data if isinstance(data, dict) else None, line)


def _table_rows(rows: Sequence[dict[str, Any]], source: str, limit: int | None) -> Iterator[_Row]:
    for i, data in enumerate(rows[:limit] if limit is not None else rows):
        yield _Row(source, i, "row", dict(data))


def _parquet(path: str, limit: int | None) -> Iterator[_Row]:
    n = 0
    for file in _files(path, (".parquet",)):
        with fsspec.open(file, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        for row in _table_rows(rows, file, None if limit is None else limit - n):
            n += 1
            yield row
        if limit is not None and n >= limit:
            return


def _hf(source: MixtureSource, fmt: str, split: str, limit: int | None) -> Iterator[_Row]:
    import datasets  # optional: only for `datasets` folders and hub ids

    if fmt == "hf_disk":
        loaded = datasets.load_from_disk(source.path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source.path}: no split {split!r}; it has {list(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(source.path, source.config, split=split)
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    yield from _table_rows(loaded.to_list(), f"{source.path}[{split}]", None)


def read_source(source: MixtureSource, split: str, limit: int | None = None) -> list[_Row]:
    """Every row of one source (at most ``limit``), parsed, in file order."""
    path = resolve_path(source.path)
    fmt = detect_format(path)
    if fmt == "jsonl":
        return list(_jsonl(path, limit))
    if fmt == "parquet":
        return list(_parquet(path, limit))
    return list(_hf(MixtureSource(**{**asdict(source), "path": path}), fmt, source.split or split, limit))


def rename_columns(rows: list[_Row], source: MixtureSource, index: int) -> None:
    """Apply ``source.columns`` in place; a mapped column that no row has is a :class:`ConfigError`."""
    if not source.columns:
        return
    seen = set().union(*(r.data for r in rows if r.data is not None))
    for column in source.columns:
        if column not in seen:
            files = sorted({r.source for r in rows}) or [source.path]
            raise ConfigError(f"data.mixture[{index}] ({source.path}): columns maps {column!r}, which no row of "
                              f"{', '.join(files)} has; its columns: {', '.join(sorted(seen)) or 'none'}")
    for r in rows:
        if r.data is None:
            continue
        renamed = {k: v for k, v in r.data.items() if k not in source.columns}
        renamed.update({ours: r.data[theirs] for theirs, ours in source.columns.items() if theirs in r.data})
        r.data = renamed


def weighted(rows: list[Any], weight: float, rng: random.Random) -> list[Any]:
    """``floor(weight)`` copies of ``rows`` plus a sample (without replacement, in source order) of the rest:
    ``round(frac(weight) * len(rows))`` rows, halves rounded up."""
    whole = math.floor(weight)
    extra = math.floor((weight - whole) * len(rows) + 0.5)
    picked = sorted(rng.sample(range(len(rows)), extra))
    return rows * whole + [rows[i] for i in picked]


def mix(sources: Sequence[MixtureSource], seed: int, split: str = "train", limit: int | None = None) -> Mixture:
    """Read, rename, split (per source ``eval_fraction``, by prompt text) and weight every source; ``split`` is the
    default split of ``datasets`` sources, ``limit`` caps the rows read from each source."""
    out = Mixture()
    for index, source in enumerate(sources):
        try:
            rows = read_source(source, split, limit)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"data.mixture[{index}] ({source.path}): {exc}") from None
        rename_columns(rows, source, index)
        report = SourceReport(index, source.path, source.weight, source.eval_fraction, rows=len(rows))
        train = []
        for r in rows:
            text = prompt_text(r.data) if r.data is not None else None
            if held_out(text, seed, source.eval_fraction):
                out.held_out.append(r.out())
                report.held_out += 1
            else:
                train.append(r)
        used = weighted(train, source.weight, random.Random(f"{seed}:mixture:{index}"))
        out.train += [r.out() for r in used]
        report.used = len(used)
        out.sources.append(report)
    return out


def describe(mixture: Mixture) -> str:
    """One line per source for the log."""
    return "\n".join(f"  mixture[{s.index}] {s.path}: read {s.rows}, held out {s.held_out}, used {s.used} "
                     f"(weight {s.weight})" for s in mixture.sources)

