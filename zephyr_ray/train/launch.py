"""Driver side of a training stage: connect to Ray, size the run, start the TorchTrainer."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import TrainingRecipe, resolve_path, to_dict
from zephyr_ray.train.loop import StepPlan, extensions_cache, ray_storage

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


def fit(train_fn: Callable[[dict[str, Any]], None], cfg: TrainingRecipe, dataset: Any, model_path: str, plan: StepPlan) -> Any:
    """Run ``train_fn`` on ``cfg.scaling`` workers, streaming ``dataset`` into them (order preserved, so a
    restart sees the same shard order and can skip exactly what it had trained on)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    storage = ray_storage(cfg)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"recipe": to_dict(cfg), "plan": plan.__dict__, "model_path": model_path},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": extensions_cache()}},
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)),
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


def run_stage(cfg: TrainingRecipe, *, examples: Callable, schema: Any, train_fn: Callable[[dict[str, Any]], None],
              curves: Sequence[Sequence[str]], prepare: Callable[[Any, str, Path], Any] | None = None) -> StageResult:
    """A training stage end to end: resolve the model, plan the data on the cluster (validating every
    row), optionally ``prepare`` the stream (e.g. add reference log-probs), train, export, plot ``curves``
    (panels of metric keys) to ``curves.png``."""
    from zephyr_ray.data.pipeline import plan, stage_dataset
    from zephyr_ray.data.readers import read_rows
    from zephyr_ray.models import chat_template_source, resolve_model_path
    from zephyr_ray.train.curves import plot_curves
    from zephyr_ray.train.metrics import read_metrics

    out = open_run(cfg)
    log.info("%s run directory: %s", cfg.run.name, out.absolute())
    model_path = resolve_model_path(cfg.model.path, out, cfg.model.tiny_seed, cfg.model.tiny_arch)
    template = chat_template_source(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    log.info("chat template of %s: %s", model_path, template)
    ensure_ray()
    rows = read_rows(resolve_path(cfg.data.path), cfg.data.format, cfg.data.split, cfg.data.limit)
    report = plan(rows, examples, model_path, cfg.data)
    step_plan, dropped = plan_steps(report.packed_rows, cfg.scaling.num_workers, cfg)
    summary = {**json.loads(report.to_json()), "dropped_by_equal_split": dropped, "total_steps": step_plan.total_steps}
    (out / "data_report.json").write_text(json.dumps(summary, indent=2))
    log.info("data: %s", report.summary())
    if dropped:
        log.warning("%d of %d training rows are left out so that each of %d workers gets the same number",
                    dropped, report.packed_rows, cfg.scaling.num_workers)
    dataset = stage_dataset(rows, examples, schema, model_path, cfg.data)
    if prepare is not None:
        dataset = prepare(dataset, model_path, out)
    log.info("training %d steps on %d workers", step_plan.total_steps, cfg.scaling.num_workers)
    fit(train_fn, cfg, dataset, model_path, step_plan)
    metrics = read_metrics(out)
    plot_curves(metrics, curves, out / "curves.png", title=f"{cfg.run.name}: training curves")
    log.info("%s done: model in %s", cfg.run.name, (out / "model").absolute())
    return StageResult(out, out / "model", metrics[-1]["step"] if metrics else 0, metrics[-1] if metrics else {},
                       template)
