"""Frozen models next to training: a model loaded for inference only, and one pass of a stage's rows through
it in a Ray Data actor pool that adds columns and keeps them as Parquet in the run folder.

dDPO's reference log-probs and dSFT's distillation teacher both run this way, so the training workers never
hold the frozen model, and a rerun with the same settings reads the stored pass instead of redoing it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data
import torch

from zephyr_ray.config import ActorPoolConfig
from zephyr_ray.train.objectives import load_frozen

log = logging.getLogger(__name__)


class FrozenModel:
    """Ray Data actor holding a frozen model; a subclass's ``columns`` says what a batch of rows gets."""

    def __init__(self, path: str, dtype: str, attn: str, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_frozen(path, self.device, getattr(torch, dtype), attn)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.no_grad():
            columns = self.columns(batch.to_pydict())
        for name, values in columns.items():
            batch = batch.append_column(name, values)
        return batch

    def columns(self, rows: dict[str, list]) -> dict[str, pa.Array]:
        raise NotImplementedError

    def on_device(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in tensors.items()}


def pass_dir(out: Path, name: str, split: str) -> Path:
    """Where a stage's pass over ``split`` (``train``, or ``eval``: the held-out rows) is kept: ``out/name``,
    ``out/name_eval``."""
    return out / (name if split == "train" else f"{name}_{split}")


def _part_sizes(target: Path) -> dict[str, int]:
    """Name -> size of the pass's Parquet files (recorded in ``_SUCCESS``, checked before reuse)."""
    return {p.name: p.stat().st_size for p in sorted(target.glob("*.parquet"))}


def _read_success(done: Path) -> dict[str, Any]:
    try:
        return json.loads(done.read_text())
    except (OSError, ValueError):
        return {}


def frozen_pass(dataset: ray.data.Dataset, actor: type[FrozenModel], kwargs: dict[str, Any], pool: ActorPoolConfig,
                target: Path, fingerprint: dict[str, Any]) -> ray.data.Dataset:
    """``dataset`` with ``actor``'s columns, streamed once through ``pool`` and written to Parquet at ``target``;
    training then streams from there. ``target/_SUCCESS`` records ``fingerprint`` (everything the columns depend
    on), the pass's seconds and each part's size: a rerun reuses the folder only if the fingerprint still matches
    and no part was cut off since; otherwise (or for a half-written folder) it is cleared and redone."""
    done = target / "_SUCCESS"
    record = _read_success(done)
    if record.get("fingerprint") == fingerprint and record.get("files") == _part_sizes(target):
        log.info("reusing %s", target)
    else:
        if target.exists():
            why = ("other settings" if record.get("fingerprint", fingerprint) != fingerprint
                   else "parts changed or cut off since" if record else "an unfinished pass")
            log.info("clearing %s (%s)", target, why)
            shutil.rmtree(target)
        t0 = time.perf_counter()
        dataset.map_batches(
            actor, batch_size=pool.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
            num_gpus=pool.num_gpus_per_actor, num_cpus=pool.num_cpus_per_actor,
            fn_constructor_kwargs={**kwargs, "threads": pool.threads_per_actor},
        ).write_parquet(str(target))
        seconds = time.perf_counter() - t0
        tmp = target / "_SUCCESS.tmp"  # written whole, then renamed: a cut-off marker is no marker
        tmp.write_text(json.dumps({"seconds": round(seconds, 3), "fingerprint": fingerprint,
                                   "files": _part_sizes(target)}))
        tmp.replace(done)
        log.info("%s written in %.1f s", target, seconds)
    return ray.data.read_parquet(str(target))
