"""Losses as sums over tokens (or pairs): the training loop divides by the global count itself, so a
gradient step weights every token equally across micro-batches, accumulation steps and workers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zephyr_ray.data.tokenize import IGNORE_INDEX


def shifted_labels(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets; a token never predicts the first token of the next packed sequence."""
    target = labels[:, 1:].clone()
    target[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return target


def label_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only at positions whose next token is trained, their targets, and where they are.

    ``logits_to_keep`` (a boolean mask) skips the LM head on prompts and padding: for small models the
    head is the largest matmul, and at any size the full-vocab logits are the largest activation.
    No attention mask is passed: position_ids alone give each packed sequence its own causal block.
    """
    target = shifted_labels(batch["labels"], batch["position_ids"])
    valid = target != IGNORE_INDEX
    keep = F.pad(valid, (0, 1))  # position t predicts t + 1; the last position predicts nothing
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   logits_to_keep=keep).logits
    return logits.reshape(-1, logits.shape[-1]), target[valid], keep


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over the selected positions."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence sums of target log-probs, target counts and summed mean-logits, where ``seq_ids``
    says which sequence each selected position belongs to (several may share a packed row)."""
    logits = logits.float()
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    zeros = torch.zeros(num_seqs, dtype=torch.float32, device=logits.device)
    return (zeros.index_add(0, seq_ids, token_logps), zeros.index_add(0, seq_ids, torch.ones_like(token_logps)),
            zeros.index_add(0, seq_ids, logits.detach().mean(-1)))


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and implicit rewards ``beta * (log pi - log pi_ref)``.

    sigmoid: -log σ(β·Δ) (DPO), with ``label_smoothing`` ε: (1-ε)·that + ε·(-log σ(-β·Δ)) (cDPO);
    ipo: (Δ - 1/(2β))²; hinge: max(0, 1 - β·Δ); where Δ is the chosen-minus-rejected log-ratio margin.
    ``logsigmoid`` keeps losses and gradients finite at any margin.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
