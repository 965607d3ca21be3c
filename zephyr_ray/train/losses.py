"""Losses as sums over tokens (or pairs): the training loop divides by the global count itself, so a
gradient step weights every token equally across micro-batches, accumulation steps and workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zephyr_ray.data.tokenize import IGNORE_INDEX


def shifted_labels(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets; a token never predicts the first token of the next packed sequence."""
    target = labels[:, 1:].clone()
    target[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return target


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and how many there were."""
    target = shifted_labels(labels, position_ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())
