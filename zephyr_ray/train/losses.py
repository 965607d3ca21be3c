"""Losses as sums over tokens (or pairs): the training loop divides by the global count itself, so a
gradient step weights every token equally across micro-batches, accumulation steps and workers."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

from zephyr_ray.config import ConfigError
from zephyr_ray.data.tokenize import IGNORE_INDEX


def shifted_labels(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets; a token never predicts the first token of the next packed sequence."""
    target = labels[:, 1:].clone()
    target[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return target


@functools.cache
def _forward_params(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def _hf_class(model: Any) -> type:
    """The transformers class under DeepSpeed's engine (``.module``) and peft's LoRA wrapper (whose
    ``forward(**kwargs)`` would hide what the model takes)."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)  # peft only
    return type(get_base() if get_base is not None else model)


def packed_inputs(model: Any, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """How a model is told where packed sequences start: the one place that knows families differ.

    Families whose forward takes ``position_ids`` (Mistral, Llama, Qwen2, Gemma, Falcon, GPT-NeoX) get
    them alone: transformers' mask builder finds the restarts and gives each sequence its own causal
    block (and RoPE restarts with them). MPT takes none (ALiBi; its forward swallows ``position_ids``
    in ``**kwargs`` and ignores them, so packed sequences would silently attend to each other): it gets
    an explicit 4D block-diagonal causal mask instead, additive (0 / dtype min), the format every
    attention path accepts as already prepared. ALiBi's bias is relative, so it needs nothing more.
    A family with neither cannot train packed rows: that is a ``ConfigError`` naming it.
    """
    params = _forward_params(_hf_class(model))
    if "position_ids" in params:
        return {"position_ids": position_ids}
    if not bool((position_ids[:, 1:] == 0).any()):
        return {}  # one sequence per row (right padding only): the default causal mask is right
    if "attention_mask" not in params:
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"{name} models take neither position_ids nor an attention mask, so packed "
                          "sequences cannot be kept apart; set data.packing=false")
    return {"attention_mask": block_causal_mask(position_ids, dtype)}


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: token i sees token j iff j <= i in the same packed sequence (a
    sequence starts where ``position_ids`` is 0)."""
    seq = (position_ids == 0).cumsum(-1)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def label_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only at positions whose next token is trained, their targets, and where they are.

    ``logits_to_keep`` (a boolean mask) skips the LM head on prompts and padding: for small models the
    head is the largest matmul, and at any size the full-vocab logits are the largest activation (every
    supported family slices with transformers' ``slice_logits_to_keep``, mask form included; a model
    without it gets every logit computed, then the same ones selected).
    Packed sequences are kept apart by ``packed_inputs`` (position_ids, or a block mask for MPT).
    """
    target = shifted_labels(batch["labels"], batch["position_ids"])
    valid = target != IGNORE_INDEX
    keep = F.pad(valid, (0, 1))  # position t predicts t + 1; the last position predicts nothing
    inputs = packed_inputs(model, batch["position_ids"], next(model.parameters()).dtype)
    if "logits_to_keep" in _forward_params(_hf_class(model)):
        inputs["logits_to_keep"] = keep
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    if logits.shape[:2] == keep.shape:  # a model without logits_to_keep (older remote code): select here
        logits = logits[keep]
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
    apo_zero (APO-zero, D'Oosterlinck et al., 2024; TRL's name): (1 - σ(β·r_c)) + σ(β·r_r) on each side's own
    log-ratio r: the chosen answer's likelihood is pushed up, not only the gap, meant for chosen answers better than
    the model's own (distilled ones). On the real recipe it did not beat sigmoid (docs/learning.md).
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
    elif loss_type == "apo_zero":
        losses = torch.sigmoid(-beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo, hinge or apo_zero")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# Distillation compares next-token distributions on the teacher's top-k tokens plus one bucket holding the rest
# of the vocabulary, for teacher and student alike (a coarsening of both distributions, not a renormalisation):
# the divergences are then exactly 0 when the student equals the teacher, never exceed their full-vocabulary
# values (data processing), equal them when k covers the vocabulary, and the teacher is not made to look more
# confident than it is. The rest bucket's mass is floored here so its log stays finite when the top-k hold it all.
MIN_REST_MASS = 1e-6


def teacher_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens at ``temperature``: their log-probs (fp32) and ids, most likely first."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)


def with_rest(logps: torch.Tensor) -> torch.Tensor:
    """(N, k) log-probs of k tokens → (N, k + 1), the last column being the log of the mass left to the others."""
    rest = -torch.expm1(torch.logsumexp(logps, dim=-1, keepdim=True))
    return torch.cat([logps, rest.clamp(min=MIN_REST_MASS).log()], dim=-1)


def topk_buckets(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the teacher's top-k ids plus the rest bucket, both at ``temperature``:
    the student's over its full vocabulary (so mass outside the top-k counts against it), then gathered."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    return with_rest(teacher_logps.float()), with_rest(student)


def kl_div(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probs over the same buckets."""
    return (p_logps.exp() * (p_logps - q_logps)).sum(-1)


def divergence(teacher: torch.Tensor, student: torch.Tensor, loss: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence of ``loss`` between bucketed log-probs (``topk_buckets``).

    forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); jsd: GKD's generalized Jensen-Shannon
    divergence (Agarwal et al., 2024, eq. 1) beta·KL(teacher || m) + (1-beta)·KL(student || m) with the mixture
    m = beta·teacher + (1-beta)·student; beta 0 and 1 are forward and reverse KL (the limits of JSD/beta and
    JSD/(1-beta)), as in TRL's ``GKDTrainer.generalized_jsd_loss``, whose convention this follows.
    """
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return kl_div(teacher, student)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return kl_div(student, teacher)
    if loss != "jsd":
        raise ValueError(f"unknown distillation loss {loss!r}; expected forward_kl, reverse_kl or jsd")
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0)
    return beta * kl_div(teacher, mixture) + (1 - beta) * kl_div(student, mixture)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_ids: torch.Tensor,
                      teacher_logps: torch.Tensor, *, loss: str, beta: float, temperature: float, alpha: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha)·NLL + alpha·T²·divergence, summed over the selected positions (the T² keeps the gradient's
    size independent of the temperature, Hinton et al., 2015), and summed metrics: ``nll``,
    ``distill/divergence`` (the configured one) and ``distill/kl`` (forward KL, the same measure for every loss)."""
    nll = token_nll_sum(logits, targets)
    teacher, student = topk_buckets(logits, teacher_ids, teacher_logps, temperature)
    div = divergence(teacher, student, loss, beta).sum()
    total = (1 - alpha) * nll + alpha * temperature**2 * div
    return total, {"nll": nll.detach(), "distill/divergence": div.detach(),
                   "distill/kl": kl_div(teacher, student).detach().sum()}


# Reference-free and unpaired preference losses. Like ``preference_loss`` they return one loss per unit (pair or
# row), and their metrics are sums over the units (the training loop divides by the global unit count), under the
# names TRL's trainers log. Rewards are detached: they are for logging and accuracy only.

def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_avg: torch.Tensor,
                  rejected_avg: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's pairwise reward metrics, summed over pairs (``logps/*`` are per-token averages, as TRL's CPO/ORPO log)."""
    return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen_avg.detach().sum(), "logps/rejected": rejected_avg.detach().sum()}


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_counts: torch.Tensor,
               rejected_counts: torch.Tensor, *, beta: float = 2.0, gamma: float = 1.0
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al., 2024, eq. 6): -log σ(β·avg_c - β·avg_r - γ) per pair, no reference model.

    The reward is the length-normalised log-prob ``β·logp/|y|`` (so longer answers gain nothing by length alone)
    and ``γ`` a target margin the chosen reward must beat the rejected one by. ``gamma`` is γ itself, as TRL's
    ``CPOConfig.simpo_gamma`` (the SimPO repo configures γ/β instead). Defaults: β 2.0, γ 1.0, the paper's
    Llama-3-Base setting (``gamma_beta_ratio`` 0.5); the SimPO repo's config default is γ/β 0.25 (γ 0.5), TRL's
    β 0.1 with γ 0.5. ``*_logps`` are summed response log-probs, ``*_counts`` their token counts.
    """
    chosen_avg, rejected_avg = chosen_logps / chosen_counts, rejected_logps / rejected_counts
    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)
    metrics = _pair_metrics(beta * chosen_avg.detach(), beta * rejected_avg.detach(), chosen_avg, rejected_avg)
    return losses, metrics


# log(1 - p) needs p < 1: a per-token average log-prob above this (every token at p > 0.999999) is taken as this,
# which keeps ORPO's odds finite in fp32 (where exp(-1e-6) is still below 1).
MAX_AVG_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler, 2012): log(-expm1(x)) near 0, log1p(-exp(x))
    below -log 2. ``x`` is clamped to ``MAX_AVG_LOGP`` first, so both branches (and their gradients) are finite."""
    x = x.clamp(max=MAX_AVG_LOGP)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_counts: torch.Tensor,
              rejected_counts: torch.Tensor, *, lambda_: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al., 2024, eqs. 2-7): NLL of the chosen answer plus ``lambda_`` times -log σ(log odds ratio),
    per pair, no reference model.

    Probabilities are length-normalised, P = exp(logp/|y|), and odds(y) = P / (1 - P), so the log odds ratio is
    (avg_c - avg_r) - (log(1 - P_c) - log(1 - P_r)). The NLL is the chosen answer's per-token mean (the paper's
    L_SFT, per sequence; TRL takes the token mean over the whole batch instead). ``lambda_`` 0.1 is the paper's
    and TRL's ``ORPOConfig.beta``. Rewards are ``lambda_·avg`` as TRL logs them; ``log_odds_ratio`` is
    log σ(log odds) and ``log_odds_chosen`` the log odds itself (TRL's names), ``nll_loss`` the NLL term.
    """
    chosen_avg, rejected_avg = chosen_logps / chosen_counts, rejected_logps / rejected_counts
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen_avg
    losses = nll - lambda_ * ratio
    metrics = _pair_metrics(lambda_ * chosen_avg.detach(), lambda_ * rejected_avg.detach(), chosen_avg, rejected_avg)
    metrics.update({"nll_loss": nll.detach().sum(), "log_odds_ratio": ratio.detach().sum(),
                    "log_odds_chosen": log_odds.detach().sum()})
    return losses, metrics


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor:
    """KTO's reference point z_ref: the batch mean of log π(y'|x) - log π_ref(y'|x) over mismatched (prompt,
    completion) pairs, clamped at 0 (a KL is never negative; the estimate can be) and detached (the paper: no
    gradient through z_ref), as TRL's ``KTOTrainer``. ``all_ranks``: the mean over every rank's pairs (one
    all-reduce), so all workers use the same z_ref, as TRL's gather does."""
    diff = (policy_kl_logps - ref_kl_logps).detach().double()
    totals = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)])
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)  # a rank without pairs still joins; the others' pairs count
    elif diff.numel() == 0:
        raise ValueError("KTO needs mismatched (prompt, completion) pairs to estimate its KL term; got none")
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).to(policy_kl_logps.dtype)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al., 2024, eq. 7) per row, on unpaired rows labelled desirable or not.

    With r = log π(y|x) - log π_ref(y|x) (summed log-probs) and z = ``kl`` (``kto_kl``): desirable rows lose
    ``desirable_weight``·(1 - σ(β(r - z))), undesirable ones ``undesirable_weight``·(1 - σ(β(z - r))). Defaults
    are the paper's and TRL's. Metrics, summed over rows (TRL's names: chosen = desirable, rejected =
    undesirable): ``rewards/{chosen,rejected}_sum`` (β·r), ``logps/{chosen,rejected}_sum``,
    ``count/{chosen,rejected}``, and ``kl`` times the row count (so the loop's mean over rows is z itself);
    ``kto_means`` turns their means into the values TRL logs.
    """
    desirable = desirable.bool()
    ratio = policy_logps - ref_logps
    kl = kl.detach()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards, logps, good = beta * ratio.detach(), policy_logps.detach(), desirable.to(policy_logps.dtype)
    metrics = {"rewards/chosen_sum": (rewards * good).sum(), "rewards/rejected_sum": (rewards * (1 - good)).sum(),
               "logps/chosen_sum": (logps * good).sum(), "logps/rejected_sum": (logps * (1 - good)).sum(),
               "count/chosen": good.sum(), "count/rejected": (1 - good).sum(), "kl": kl * desirable.numel()}
    return losses, metrics


def kto_means(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's logged KTO values from ``kto_loss`` metrics (their sums, or the loop's means over rows: alike): per-label
    averages of rewards and log-probs (only for labels present), their margin when both are, and ``kl``."""
    rows = metrics["count/chosen"] + metrics["count/rejected"]
    out = {"kl": metrics["kl"] / rows} if rows > 0 else {}
    for side in ("chosen", "rejected"):
        if metrics.get(f"count/{side}", 0) > 0:
            out[f"rewards/{side}"] = metrics[f"rewards/{side}_sum"] / metrics[f"count/{side}"]
            out[f"logps/{side}"] = metrics[f"logps/{side}_sum"] / metrics[f"count/{side}"]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
