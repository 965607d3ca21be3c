"""Driver side of a training stage: connect to Ray, size the run, start the TorchTrainer."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zephyr_ray.config import SFTRecipe, to_dict
from zephyr_ray.train.loop import StepPlan, extensions_cache

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Join the cluster at ``RAY_ADDRESS`` (or the job's), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def plan_steps(train_rows: int, world: int, cfg: SFTRecipe) -> tuple[StepPlan, int]:
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


def fit(train_fn: Callable[[dict[str, Any]], None], cfg: SFTRecipe, dataset: Any, model_path: str, plan: StepPlan) -> Any:
    """Run ``train_fn`` on ``cfg.scaling`` workers, streaming ``dataset`` into them (order preserved, so a
    restart sees the same shard order and can skip exactly what it had trained on)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    storage = cfg.run.storage_path or str(Path(cfg.run.output_dir, "ray").absolute())
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
