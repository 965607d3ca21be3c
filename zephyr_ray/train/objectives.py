"""Worker-side objectives shared by stages: the dSFT next-token objective (the distillation objective extends it),
kept apart from the stage drivers so ``train/sft.py`` and ``train/distill.py`` do not import each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from zephyr_ray.data.packing import collate
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
