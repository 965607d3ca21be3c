"""dSFT: next-token loss on the assistant turns of teacher-written dialogues, on Ray Train + DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from zephyr_ray.config import SFTRecipe
from zephyr_ray.data.packing import collate
from zephyr_ray.train.curves import SFT_PANELS
from zephyr_ray.train.launch import StageResult, run_stage
from zephyr_ray.train.losses import label_logits, shifted_labels, token_nll_sum


@dataclass
class SFTObjective:
    pad_id: int
    one_row: bool = field(default=False, kw_only=True)  # a micro-batch's rows as one (``attention.trains_one_row``)

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = collate(batch, self.pad_id, one_row=self.one_row)
        out["num_tokens"] = sum(len(r) for r in batch["input_ids"])
        return out

    def units(self, batch: dict[str, Any]) -> int:
        return int((shifted_labels(batch["labels"], batch["position_ids"]) != -100).sum())

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, targets, _ = label_logits(model, batch)
        return token_nll_sum(logits, targets), {}


def _make_objective(cfg: SFTRecipe, model_path: str, device: Any, one_row: bool) -> SFTObjective:
    from zephyr_ray.data.tokenize import cached_tokenizer

    pad_id = cached_tokenizer(model_path).pad_token_id
    if cfg.distill.enabled:
        from zephyr_ray.train.distill import DistillObjective

        return DistillObjective(pad_id, cfg.distill, one_row=one_row)
    return SFTObjective(pad_id, one_row=one_row)


def sft_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the dSFT TorchTrainer."""
    from zephyr_ray.train.loop import run_worker

    run_worker(config, _make_objective, SFTRecipe)


def run_sft(cfg: SFTRecipe) -> StageResult:
    from zephyr_ray.data.sft import sft_examples, sft_schema

    prepare = None
    if cfg.distill.enabled:  # the teacher's top-k join the rows; its tokenizer is checked first, here
        from zephyr_ray.train.distill import teacher_prepare

        prepare = teacher_prepare(cfg)
    return run_stage(cfg, examples=sft_examples, schema=sft_schema(), train_fn=sft_train_loop, curves=SFT_PANELS,
                     prepare=prepare)
