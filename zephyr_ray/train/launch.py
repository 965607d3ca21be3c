"""Driver side of a training stage: connect to Ray, size the run, start the TorchTrainer with the stage's
description (``loop.Stage``), which every worker turns back into the typed recipe and its objective."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import DataConfig, TrainingRecipe, resolve_path
from zephyr_ray.data.mixture import describe, mix
from zephyr_ray.data.pipeline import plan, stage_dataset, stream_options
from zephyr_ray.data.readers import read_rows
from zephyr_ray.data.split import split_held_out
from zephyr_ray.models import chat_template_source, resolve_model_path
from zephyr_ray.publish import push_stage
from zephyr_ray.tracking import read_metrics
from zephyr_ray.train.curves import plot_curves
from zephyr_ray.train.loop import Stage, StepPlan, extensions_cache, ray_storage, train_loop_per_worker

log = logging.getLogger(__name__)


def plan_steps(train_rows: int, world: int, cfg: TrainingRecipe) -> tuple[StepPlan, int]:
    """Steps per run from the planned row count. Returns the plan and the rows an equal split drops."""
    per_worker = train_rows // world
    if per_worker == 0:
        raise ValueError(f"{train_rows} training rows cannot feed {world} workers")
    micro = math.ceil(per_worker / cfg.train.micro_batch_size)
    steps_per_epoch = math.ceil(micro / cfg.train.gradient_accumulation_steps)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    return StepPlan(total_steps=total, micro_batches_per_epoch=micro), train_rows - per_worker * world


def held_out_rows(rows: Any, data: DataConfig) -> tuple[Any, Any, str | None]:
    """(training rows, held-out raw rows or None, where the held-out rows come from) per ``data.eval_path`` /
    ``data.eval_fraction``."""
    if data.eval_path:
        split = data.eval_split or data.split
        held = read_rows(resolve_path(data.eval_path), data.format, split, data.limit)
        return rows, held, f"data.eval_path {data.eval_path} (split {split})"
    if data.eval_fraction:
        train, held = split_held_out(rows, data.seed, data.eval_fraction)
        return train, held, f"data.eval_fraction={data.eval_fraction} of the prompts of {data.path} (seed {data.seed})"
    return rows, None, None


def stage_rows(data: DataConfig) -> tuple[Any, Any, str | None, list[dict[str, Any]] | None]:
    """(training rows, held-out raw rows or None, where those come from, per-source report or None): ``data.path``
    through ``held_out_rows``, or ``data.mixture`` mixed on the driver (``data/mixture.py``) into Ray Datasets of
    the same raw-row shape."""
    if not data.mixture:
        rows = read_rows(resolve_path(data.path), data.format, data.split, data.limit)
        return (*held_out_rows(rows, data), None)
    mixed = mix(data.mixture, data.seed, data.split, data.limit)
    log.info("data mixture (seed %d):\n%s", data.seed, describe(mixed))
    if not mixed.train:
        raise ValueError(f"data.mixture left no training rows:\n{describe(mixed)}")
    train = ray.data.from_items(mixed.train)
    if data.eval_path:
        _, held, source = held_out_rows(train, data)
    elif mixed.held_out:
        held = ray.data.from_items(mixed.held_out)
        source = f"data.mixture[*].eval_fraction of each source's prompts (seed {data.seed})"
    else:
        held, source = None, None
    return train, held, source, mixed.report()


def eval_shares(dataset: Any, world: int) -> list[tuple[Any, bool]]:
    """The stage's held-out rows (tokenized, with any precomputed columns), gathered once on the driver and dealt
    round-robin to ``world`` ranks: one object-store table per rank, each row in exactly one share. A rank left
    without a row gets a stand-in row and ``False`` (it runs the forward passes, its sums count 0)."""
    blocks = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(blocks) if blocks else None
    if table is None or table.num_rows == 0:
        raise ValueError("the held-out set has no rows to evaluate on (data.eval_path / data.eval_fraction)")
    shares = []
    for rank in range(world):
        rows = list(range(rank, table.num_rows, world))
        shares.append((ray.put(table.take(rows or [0])), bool(rows)))
    return shares


def fit(cfg: TrainingRecipe, stage: Stage, dataset: Any) -> Any:
    """Run the one generic ``train_loop_per_worker`` on ``cfg.scaling`` workers with ``stage`` (the recipe, start
    model, step plan and held-out shares it rebuilds everything from), streaming ``dataset`` into them (order
    preserved, so a restart sees the same shard order and can skip exactly what it had trained on)."""
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    storage = ray_storage(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": extensions_cache()}},
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=stream_options(cfg.data)),
    )
    return trainer.fit()


@dataclass
class StageResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_metrics: dict[str, Any]
    # Where the chat template trained with came from: models.chat_template_source of the input model.
    chat_template: str = ""


def run_stage(cfg: TrainingRecipe, *, examples: Callable, schema: Any, curves: Sequence[Sequence[str]],
              prepare: Callable[..., Any] | None = None) -> StageResult:
    """A training stage end to end: resolve the model, plan the data on the cluster (validating every
    row; ``examples`` turns raw rows into ``schema``'s), optionally ``prepare`` the stream (the frozen pass: e.g.
    add reference log-probs; ``split="eval"`` for the held-out rows), train (the workers rebuild ``cfg`` and its
    objective from a ``loop.Stage``; evaluating on the held-out rows, if any), export, plot ``curves`` (panels of
    metric keys) to ``curves.png``."""
    cfg, out = open_run(cfg)
    log.info("%s run directory: %s", cfg.run.name, out.absolute())
    model_path = resolve_model_path(cfg.model.path, out, cfg.model.tiny_seed, cfg.model.tiny_arch)
    template = chat_template_source(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                                    chat_template=cfg.model.chat_template)
    log.info("chat template of %s: %s", model_path, template)
    ensure_ray()
    rows, eval_rows, eval_source, mixture = stage_rows(cfg.data)
    template_spec = cfg.model.chat_template
    report = plan(rows, examples, model_path, cfg.data, template_spec)
    step_plan, dropped = plan_steps(report.packed_rows, cfg.scaling.num_workers, cfg)
    summary = {**json.loads(report.to_json()), "dropped_by_equal_split": dropped, "total_steps": step_plan.total_steps}
    if mixture is not None:
        summary["mixture"] = mixture
    eval_report, eval_cfg = None, replace(cfg.data, shuffle=False)  # held-out rows: order does not matter
    if eval_rows is not None:
        eval_report = plan(eval_rows, examples, model_path, eval_cfg, template_spec)
        summary["eval"] = {"source": eval_source, **json.loads(eval_report.to_json())}
    (out / "data_report.json").write_text(json.dumps(summary, indent=2))
    log.info("data: %s", report.summary())
    if eval_report is not None:
        log.info("held out for evaluation (%s): %s", eval_source, eval_report.summary())
        if eval_report.packed_rows == 0:
            raise ValueError(f"no rows held out for evaluation by {eval_source}: {eval_report.summary()}")
    if dropped:
        log.warning("%d of %d training rows are left out so that each of %d workers gets the same number",
                    dropped, report.packed_rows, cfg.scaling.num_workers)
    dataset = stage_dataset(rows, examples, schema, model_path, cfg.data, template_spec)
    if prepare is not None:
        dataset = prepare(dataset, model_path, out)
    eval_data = None
    if eval_rows is not None:
        eval_dataset = stage_dataset(eval_rows, examples, schema, model_path, eval_cfg, template_spec)
        if prepare is not None:
            eval_dataset = prepare(eval_dataset, model_path, out, split="eval")
        eval_data = eval_shares(eval_dataset, cfg.scaling.num_workers)
    log.info("training %d steps on %d workers", step_plan.total_steps, cfg.scaling.num_workers)
    fit(cfg, Stage.of(cfg, model_path, step_plan, eval_data), dataset)
    metrics = read_metrics(out)
    plot_curves(metrics, curves, out / "curves.png", title=f"{cfg.run.name}: training curves")
    log.info("%s done: model in %s", cfg.run.name, (out / "model").absolute())
    push_stage(cfg, out)  # run.push_to_hub: never raises; the outcome goes to out/push.json
    return StageResult(out, out / "model", metrics[-1]["step"] if metrics else 0, metrics[-1] if metrics else {},
                       template)
