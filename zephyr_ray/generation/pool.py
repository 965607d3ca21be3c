"""Model work on a Ray Data actor pool: streamed, resumable, retried.

Each actor loads one engine. Each Ray task is ``rows_per_task`` units; its outputs go to one Parquet
part file, written atomically (temp file + rename), so a part is either whole or absent. A rerun reads
the keys already written and only schedules the rest (resume after a kill); Ray restarts a crashed
actor and retries its task (bounded), and the task's part is then written once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from zephyr_ray.config import EngineConfig, from_dict, to_dict
from zephyr_ray.generation import make_engine
from zephyr_ray.generation.types import Engine
from zephyr_ray.models import resolve_model_path, tiny_label

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

KEY = "key"  # every unit and every output row carries its unit's key
Work = Callable[[Engine, list[dict[str, Any]]], list[dict[str, Any]]]
_CRASH_MARKER = ".crash-injected"
# Bounded, unlike Ray Data's default (-1): an engine that crashes on every try must fail the run.
_MAX_RETRIES = 3


def resolve_engine(cfg: EngineConfig, models_dir: Path) -> EngineConfig:
    """``cfg`` with its model as an HF folder the actors load: the tiny model built (once, on the driver) when a
    local backend names no model, a GGUF file or embedded name imported."""
    if cfg.backend == "openai":
        return cfg
    if cfg.path:
        return replace(cfg, path=resolve_model_path(cfg.path, models_dir))
    return replace(cfg, path=resolve_model_path(None, models_dir / tiny_label(cfg.tiny_seed, cfg.tiny_arch), cfg.tiny_seed,
                                                 cfg.tiny_arch))


def done_keys(out_dir: Path) -> set[str]:
    """Keys of every readable part. A part cut off on disk (no Parquet footer, unreadable column) is deleted
    with a warning, so its units are redone rather than loaded."""
    keys: set[str] = set()
    for part in sorted(out_dir.glob("part-*.parquet")):
        try:
            keys.update(pq.read_table(part, columns=[KEY]).column(KEY).to_pylist())
        except (pa.ArrowException, OSError) as e:
            log.warning("%s is cut off or unreadable (%s): deleted, its units are redone", part, e)
            part.unlink()
    return keys


def read_parts(out_dir: Path) -> pa.Table | None:
    """Every part in ``out_dir`` as one table, in a stable order (None when nothing was written)."""
    parts = sorted(out_dir.glob("part-*.parquet"))
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")


def _write_part(out_dir: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    name = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    tmp = out_dir / f".tmp-{name}-{os.getpid()}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out_dir / f"part-{name}.parquet")


class _EngineActor:
    """``map_batches`` callable: one engine per actor, one part file per task."""

    def __init__(self, engine: dict[str, Any], work: Work, out_dir: str):
        self.cfg = from_dict(engine, EngineConfig)
        if self.cfg.threads_per_actor:
            import torch

            torch.set_num_threads(self.cfg.threads_per_actor)
        self.engine = make_engine(self.cfg, out_dir)
        self.work = work
        self.out_dir = Path(out_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.to_pylist()
        outputs = self.work(self.engine, units)
        if self.cfg.inject_crash_once and not (self.out_dir / _CRASH_MARKER).exists():
            (self.out_dir / _CRASH_MARKER).touch()
            os._exit(1)  # dies with the task's work done but not written: the retry must redo it
        _write_part(self.out_dir, [u[KEY] for u in units], outputs)
        return pa.table({"units": [len(units)], "rows": [len(outputs)]})


def _drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch[KEY], done)))


def run_pool(units: ray.data.Dataset, engine: EngineConfig, work: Work, out_dir: Path, desc: str) -> pa.Table | None:
    """Apply ``work(engine, units)`` to every unit not yet done in ``out_dir``; all outputs so far."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # a killed run's unfinished writes
        stale.unlink()
    done = done_keys(out_dir)
    units = units.materialize()
    total = units.count()
    if done:
        units = units.map_batches(_drop_done, batch_format="pyarrow", fn_kwargs={"done": pa.array(sorted(done), pa.string())}).materialize()
    todo = units.count()
    skipped = total - todo
    log.info("%s: %d units, %d already done in %s", desc, total, skipped, out_dir)
    if todo:
        results = units.map_batches(
            _EngineActor,
            fn_constructor_kwargs={"engine": to_dict(engine), "work": work, "out_dir": str(out_dir)},
            batch_size=engine.rows_per_task,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=engine.num_actors),
            num_cpus=engine.num_cpus_per_actor,
            num_gpus=engine.num_gpus_per_actor,
            max_restarts=_MAX_RETRIES,
            max_task_retries=_MAX_RETRIES,
        )
        with tqdm(total=total, initial=skipped, desc=desc, unit="unit", dynamic_ncols=True) as bar:
            for row in results.iter_rows():
                bar.update(row["units"])
    return read_parts(out_dir)
