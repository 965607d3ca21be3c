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
