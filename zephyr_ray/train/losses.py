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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, seq_index: torch.Tensor,
                   num_seqs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence sums of response-token log-probs, token counts and summed mean-logits.

    ``seq_index`` gives, per position, which sequence the token belongs to (-1 for padding), so the
    same code serves one sequence per row and several packed into a row.
    """
    target = shifted_labels(labels, position_ids)
    mask = target != IGNORE_INDEX
    lg = logits[:, :-1][mask].float()
    token_logps = -F.cross_entropy(lg, target[mask], reduction="none")
    idx = seq_index[:, 1:][mask]
    logps = torch.zeros(num_seqs, dtype=torch.float32, device=logits.device).index_add(0, idx, token_logps)
    counts = torch.zeros(num_seqs, dtype=torch.float32, device=logits.device).index_add(0, idx, torch.ones_like(token_logps))
    logit_sums = torch.zeros(num_seqs, dtype=torch.float32, device=logits.device).index_add(0, idx, lg.detach().mean(-1))
    return logps, counts, logit_sums


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
