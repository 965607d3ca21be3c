"""dSFT: next-token loss on the assistant turns of teacher-written dialogues, on Ray Train + DeepSpeed."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zephyr_ray.config import SFTRecipe, to_dict
from zephyr_ray.data.packing import collate
from zephyr_ray.train.losses import shifted_labels, token_nll_sum

log = logging.getLogger(__name__)


@dataclass
class SFTObjective:
    pad_id: int

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = collate(batch, self.pad_id)
        out["num_tokens"] = sum(len(r) for r in batch["input_ids"])
        return out

    def units(self, batch: dict[str, Any]) -> int:
        return int((shifted_labels(batch["labels"], batch["position_ids"]) != -100).sum())

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # No attention mask: position_ids alone give each packed sequence its own causal block.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss, _ = token_nll_sum(logits, batch["labels"], batch["position_ids"])
        return loss, {}


def sft_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the dSFT TorchTrainer."""
    from zephyr_ray.data.tokenize import cached_tokenizer
    from zephyr_ray.train.loop import run_worker

    run_worker(config, SFTObjective(cached_tokenizer(config["model_path"]).pad_token_id), SFTRecipe)


@dataclass
class SFTResult:
    output_dir: Path
    model_dir: Path
    steps: int
    final_loss: float | None


def run_sft(cfg: SFTRecipe) -> SFTResult:
    """Plan the data on the cluster (validating every row), then train and export the model."""
    from zephyr_ray.data.readers import read_rows
    from zephyr_ray.data.sft import plan, sft_dataset
    from zephyr_ray.models import resolve_model_path
    from zephyr_ray.train.launch import ensure_ray, fit, plan_steps
    from zephyr_ray.train.metrics import read_metrics

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("dSFT run directory: %s", out.absolute())
    model_path = resolve_model_path(cfg.model.path, out, cfg.model.tiny_seed)
    ensure_ray()
    rows = read_rows(cfg.data.path, cfg.data.format, cfg.data.split, cfg.data.limit)
    report = plan(rows, model_path, cfg.data)
    step_plan, dropped = plan_steps(report.packed_rows, cfg.scaling.num_workers, cfg)
    (out / "data_report.json").write_text(json.dumps({**json.loads(report.to_json()), "dropped_by_equal_split": dropped,
                                                       "total_steps": step_plan.total_steps}, indent=2))
    log.info("data: %s", report.summary())
    if dropped:
        log.warning("%d of %d training rows are left out so that each of %d workers gets the same number",
                    dropped, report.packed_rows, cfg.scaling.num_workers)
    log.info("training %d steps on %d workers", step_plan.total_steps, cfg.scaling.num_workers)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    fit(sft_train_loop, cfg, sft_dataset(rows, model_path, cfg.data), model_path, step_plan)
    metrics = read_metrics(out)
    log.info("dSFT done: model in %s", (out / "model").absolute())
    return SFTResult(out, out / "model", metrics[-1]["step"] if metrics else 0, metrics[-1]["loss"] if metrics else None)
