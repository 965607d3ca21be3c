"""Worker-side objectives of the training stages, built from a stage's recipe by :func:`build_objective` (as
torchtune builds its losses from config): what a batch of Ray Data rows becomes, how many loss units it holds, and
the summed loss. dSFT's next-token objective, its distillation variant (``sft.distill``), and dDPO's preference
objective with its pair collation.

Pure torch (no Ray, no DeepSpeed): the loop in ``train/loop.py`` drives these, and the tests of the maths and
the benchmarks use them without a cluster. The maths itself is in ``train/losses.py``.

dDPO's chosen and rejected go through the policy in one forward pass: either as 2B padded rows, or
(``data.packing``) packed with restarting ``position_ids``: the whole micro-batch in one unpadded row where the
attention keeps its sequences apart (``attention.trains_one_row``), else one row per pair. Reference log-probs come
precomputed (columns ``REF_COLUMNS``, written by ``train/dpo.py``'s actor pass) or, online, from a frozen copy
each worker holds; with LoRA online, from the policy itself with its adapters disabled (the base it started from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from zephyr_ray.config import DistillConfig, DPOConfig, DPORecipe, SFTRecipe, TrainingRecipe
from zephyr_ray.data.packing import collate
from zephyr_ray.data.tokenize import IGNORE_INDEX
from zephyr_ray.data.unpaired import pair_layout
from zephyr_ray.models import DTYPES, load_model
from zephyr_ray.train.lora import without_adapters
from zephyr_ray.train.losses import (
    distillation_loss,
    kto_kl,
    kto_loss,
    kto_means,
    label_logits,
    orpo_loss,
    preference_loss,
    sequence_logps,
    shifted_labels,
    simpo_loss,
    token_nll_sum,
)

log = logging.getLogger(__name__)

# dDPO's precomputed reference log-probs (one float per pair and side), added by the reference pass.
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Distillation: per row, flattened over its trained positions in order, (positions x top_k) ids and log-probs.
TEACHER_IDS, TEACHER_LOGPS = "teacher_topk_ids", "teacher_topk_logps"


class Objective(Protocol):
    """What the training loop needs from a stage: it owns streaming, accumulation, normalisation, metrics,
    checkpoints and resume; the objective says what a batch is and what it costs."""

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Numpy rows from Ray Data → tensors (plus ``sample_ids`` and ``num_tokens``)."""

    def units(self, batch: dict[str, Any]) -> int:
        """How many loss terms (tokens, pairs) the batch contributes to the step's mean."""

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss over the batch's units, and summed extra metrics (averaged by the loop)."""

    # Optional: ``summarize(means) -> metrics``, the logged values from the loop's per-unit means (train and
    # held-out alike); see :func:`summarize`.


def summarize(objective: Objective, means: dict[str, float]) -> dict[str, float]:
    """The metrics to log from a step's (or an evaluation's) per-unit means: the objective's own ``summarize``
    where it has one (KTO: per-label averages from its sums and counts), else the means themselves."""
    finish = getattr(objective, "summarize", None)
    return finish(means) if finish is not None else means


def load_frozen(path: str, device: Any, dtype: torch.dtype, attn: str) -> Any:
    """The model at ``path`` in eval mode with gradients off (an online dDPO reference; the actors of
    ``train/frozen.py``)."""
    model = load_model(path, dtype=dtype, attn_implementation=attn).to(device).eval()
    model.requires_grad_(False)
    return model


@dataclass
class SFTObjective:
    """dSFT: summed next-token NLL over the trained (assistant) tokens of packed rows."""

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


@dataclass
class DistillObjective(SFTObjective):
    """dSFT's objective with the teacher's top-k columns carried into each batch and the distillation term."""

    cfg: DistillConfig

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().collate(batch)
        for col, dtype in ((TEACHER_IDS, np.int64), (TEACHER_LOGPS, np.float32)):
            out[col] = torch.from_numpy(np.concatenate(batch[col]).astype(dtype)).view(-1, self.cfg.top_k)
        return out

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, targets, _ = label_logits(model, batch)
        if len(batch[TEACHER_IDS]) != len(logits):
            raise RuntimeError(f"{len(batch[TEACHER_IDS])} teacher positions for {len(logits)} trained positions: "
                               "the teacher's columns were computed on other rows")
        c = self.cfg
        return distillation_loss(logits, targets, batch[TEACHER_IDS], batch[TEACHER_LOGPS], loss=c.loss,
                                 beta=c.jsd_beta, temperature=c.temperature, alpha=c.alpha)


def collate_pairs(batch: dict[str, Any], pad_id: int, packing: bool, one_row: bool = False) -> dict[str, Any]:
    """B pairs → tensors whose ``seq_index`` maps tokens to sequences 0..B-1 (chosen) and B..2B-1
    (rejected): all 2B sequences in one unpadded row when ``one_row`` (``attention.trains_one_row``), one row per
    pair when ``packing``, else chosen rows then rejected rows (TRL's padded layout)."""
    n = len(batch["prompt_ids"])
    seqs = {}
    for side, offset in (("chosen", 0), ("rejected", n)):
        for i in range(n):
            prompt, answer = list(batch["prompt_ids"][i]), list(batch[f"{side}_ids"][i])
            seqs[offset + i] = (prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)
    if one_row:
        groups = [list(range(2 * n))]
    else:
        groups = [[i, n + i] for i in range(n)] if packing else [[s] for s in range(2 * n)]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_index": []}
    for group in groups:
        for key in rows:
            rows[key].append([])
        for s in group:
            ids, labels = seqs[s]
            rows["input_ids"][-1] += ids
            rows["labels"][-1] += labels
            rows["position_ids"][-1] += range(len(ids))
            rows["seq_index"][-1] += [s] * len(ids)
    out = collate({**rows, "sample_ids": batch["sample_ids"]}, pad_id)
    seq_index = torch.full_like(out["input_ids"], -1)
    for r, idx in enumerate(rows["seq_index"]):
        seq_index[r, : len(idx)] = torch.tensor(idx)
    out.update(seq_index=seq_index, num_pairs=n, num_tokens=sum(len(r) for r in rows["input_ids"]))
    for col in REF_COLUMNS:
        if col in batch:
            out[col] = torch.as_tensor(np.asarray(batch[col], dtype=np.float32))
    return out


def forward_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs, response lengths and summed mean logits of the 2B sequences."""
    logits, targets, keep = label_logits(model, batch)
    return sequence_logps(logits, targets, batch["seq_index"][keep], 2 * batch["num_pairs"])


@dataclass
class DPOObjective:
    """dDPO on preference pairs, plus TRL's metrics: the preference loss against the reference's log-probs
    (sigmoid, ipo, hinge, apo_zero), or a reference-free one (simpo, orpo: no reference is loaded or looked up)."""

    pad_id: int
    cfg: DPOConfig
    packing: bool
    one_row: bool = False  # the micro-batch's pairs in one unpadded row (``attention.trains_one_row``)
    ref_model: Any = None  # online mode: a frozen copy
    adapter_ref: bool = False  # online mode with LoRA: the policy itself with its adapters disabled

    @classmethod
    def from_config(cls, cfg: DPORecipe, pad_id: int, one_row: bool, *, model_path: str, device: Any = "cpu"
                    ) -> DPOObjective:
        """The objective of ``cfg``, whose policy starts at ``model_path``: online, with its reference loaded
        onto ``device`` (with LoRA, the starting base is the policy with adapters off: no second model)."""
        path, online = cfg.dpo.ref.path or model_path, cfg.dpo.ref.mode == "online"
        ref = None
        adapter_ref = cfg.dpo.needs_reference and online and cfg.model.lora.enabled and path == model_path
        if not cfg.dpo.needs_reference:
            path, source = "none", f"loss_type={cfg.dpo.loss_type} scores the policy alone"
        elif adapter_ref:
            source = "the policy with its LoRA adapters disabled (no second model)"
        elif online:
            ref = load_frozen(path, device, getattr(torch, DTYPES[cfg.train.precision]), cfg.model.attn_implementation)
            source = "a frozen copy in each worker"
        else:
            source = "log-probs precomputed by Ray actors"
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("dDPO reference: %s, %s", path, source)
        return cls(pad_id, cfg.dpo, cfg.data.packing, one_row, ref, adapter_ref)

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        return collate_pairs(batch, self.pad_id, self.packing, self.one_row)

    def units(self, batch: dict[str, Any]) -> int:
        return batch["num_pairs"]

    def reference_logps(self, model: Any, batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """The reference's summed log-probs of the batch's 2B sequences: the policy with adapters off, the
        worker's frozen copy, or the precomputed columns."""
        if self.adapter_ref:
            with without_adapters(model):
                return forward_logps(model, batch)[0]
        if self.ref_model is not None:
            with torch.no_grad():
                return forward_logps(self.ref_model, batch)[0]
        missing = [c for c in REF_COLUMNS if c not in batch]
        if missing:
            raise RuntimeError(f"loss_type={self.cfg.loss_type} needs the reference pass's columns {missing} "
                               "(dpo.ref.mode=precompute) or an online reference")
        return torch.cat([batch[c].to(like.device) for c in REF_COLUMNS])

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["num_pairs"]
        logps, counts, logit_sums = forward_logps(model, batch)
        chosen, rejected = logps[:n], logps[n:]
        lengths = counts.clamp(min=1).to(logps.dtype)
        c = self.cfg
        if c.loss_type == "simpo":
            losses, extras = simpo_loss(chosen, rejected, lengths[:n], lengths[n:], beta=c.simpo.beta,
                                        gamma=c.simpo.gamma)
        elif c.loss_type == "orpo":
            losses, extras = orpo_loss(chosen, rejected, lengths[:n], lengths[n:], lambda_=c.orpo.lambda_)
        else:
            policy, ref = logps, self.reference_logps(model, batch, logps)
            if c.length_normalize:  # per answer token, policy and reference alike
                policy, ref = policy / lengths, ref / lengths
            losses, r_chosen, r_rejected = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=c.beta,
                                                           loss_type=c.loss_type, label_smoothing=c.label_smoothing)
            extras = {
                "rewards/chosen": r_chosen.sum(), "rewards/rejected": r_rejected.sum(),
                "rewards/accuracies": (r_chosen > r_rejected).float().sum(),
                "rewards/margins": (r_chosen - r_rejected).sum(),
                "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
            }
        loss = losses.sum()
        if c.rpo_alpha:
            loss = loss + c.rpo_alpha * (-chosen / lengths[:n]).sum()  # per-token NLL of the chosen answer
        mean_logits = logit_sums / lengths
        extras.update({"logits/chosen": mean_logits[:n].sum(), "logits/rejected": mean_logits[n:].sum()})
        return loss, extras


# kto_loss's summed metrics, which ``KTOObjective.summarize`` turns into TRL's per-label values.
KTO_SUMS = ("rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum", "count/chosen",
            "count/rejected", "kl")


@dataclass
class KTOObjective(DPOObjective):
    """KTO on unpaired rows: ``data.unpaired``'s rows go through the pair collation as ``pair_layout`` lays them
    out (sequence i: row i's prompt + completion; B + i: its prompt + mismatched KL completion), so the reference
    comes as for dDPO (precomputed columns, online copy or adapters off). The KL reference point is ``kto_kl`` over
    every rank's mismatched pairs of the micro-batch (one all-reduce per micro-batch, as TRL gathers), β is
    ``dpo.beta``; TRL's metric names, chosen = desirable, rejected = undesirable."""

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = collate_pairs(pair_layout(batch), self.pad_id, self.packing, self.one_row)
        out["label"] = torch.as_tensor(np.asarray(batch["label"], dtype=bool))
        return out

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["num_pairs"]
        logps = forward_logps(model, batch)[0]
        ref = self.reference_logps(model, batch, logps)
        kl = kto_kl(logps[n:], ref[n:], all_ranks=True)
        losses, extras = kto_loss(logps[:n], ref[:n], batch["label"].to(logps.device), kl, beta=self.cfg.beta,
                                  desirable_weight=self.cfg.kto.desirable_weight,
                                  undesirable_weight=self.cfg.kto.undesirable_weight)
        return losses.sum(), extras

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """``kto_means`` of the summed metrics (per-label rewards and log-probs, their margin, ``kl``), with the
        loss; the raw sums and counts are left out."""
        if not all(k in means for k in KTO_SUMS):
            return means
        return {**{k: v for k, v in means.items() if k not in KTO_SUMS}, **kto_means(means)}


def build_objective(cfg: TrainingRecipe, pad_id: int, one_row: bool, *, model_path: str, device: Any = "cpu"
                    ) -> Objective:
    """The objective a stage's typed recipe asks for: dSFT (distilling with ``distill.enabled``), dDPO on pairs
    or KTO (``dpo.loss_type=kto``).
    ``pad_id``: the tokenizer's; ``one_row``: packed micro-batches as one unpadded row; ``model_path``: where the
    policy starts (dDPO's default reference); ``device``: where an online reference goes."""
    if isinstance(cfg, DPORecipe):
        kind = KTOObjective if cfg.dpo.loss_type == "kto" else DPOObjective
        return kind.from_config(cfg, pad_id, one_row, model_path=model_path, device=device)
    if isinstance(cfg, SFTRecipe):
        if cfg.distill.enabled:
            return DistillObjective(pad_id, cfg.distill, one_row=one_row)
        return SFTObjective(pad_id, one_row=one_row)
    raise TypeError(f"no objective for a {type(cfg).__name__}: expected an SFTRecipe or a DPORecipe")
