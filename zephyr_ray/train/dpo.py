"""dDPO: preference training against the frozen dSFT model, on the same engine as dSFT.

Chosen and rejected go through the policy in one forward pass: either as 2B padded rows, or (``data.packing``)
packed with restarting ``position_ids``: the whole micro-batch in one unpadded row where the attention keeps its
sequences apart (``attention.trains_one_row``), else one row per pair. Reference log-probs come precomputed by
Ray actors (default: workers never hold the reference) or from a frozen copy in each worker; with LoRA
(``model.lora``) online, from the policy itself with its adapters disabled (the base it started from).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zephyr_ray.attention import trains_one_row
from zephyr_ray.config import DPOConfig, DPORecipe
from zephyr_ray.data.packing import collate
from zephyr_ray.data.tokenize import IGNORE_INDEX
from zephyr_ray.gguf_import import resolve as resolve_gguf
from zephyr_ray.models import DTYPES
from zephyr_ray.train.curves import DPO_PANELS
from zephyr_ray.train.frozen import FrozenModel, frozen_pass, load_frozen, pass_dir
from zephyr_ray.train.launch import StageResult, run_stage
from zephyr_ray.train.lora import without_adapters
from zephyr_ray.train.losses import label_logits, preference_loss, sequence_logps

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


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
    pad_id: int
    cfg: DPOConfig
    packing: bool
    one_row: bool = False  # the micro-batch's pairs in one unpadded row (``attention.trains_one_row``)
    ref_model: Any = None  # online mode: a frozen copy
    adapter_ref: bool = False  # online mode with LoRA: the policy itself with its adapters disabled

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        return collate_pairs(batch, self.pad_id, self.packing, self.one_row)

    def units(self, batch: dict[str, Any]) -> int:
        return batch["num_pairs"]

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["num_pairs"]
        logps, counts, logit_sums = forward_logps(model, batch)
        if self.adapter_ref:
            with without_adapters(model):
                ref = forward_logps(model, batch)[0]
        elif self.ref_model is not None:
            with torch.no_grad():
                ref = forward_logps(self.ref_model, batch)[0]
        else:
            ref = torch.cat([batch[c].to(logps.device) for c in REF_COLUMNS])
        ref_chosen, ref_rejected = ref[:n], ref[n:]
        chosen, rejected = logps[:n], logps[n:]
        losses, r_chosen, r_rejected = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.cfg.beta,
                                                       loss_type=self.cfg.loss_type, label_smoothing=self.cfg.label_smoothing)
        loss = losses.sum()
        if self.cfg.rpo_alpha:
            loss = loss + self.cfg.rpo_alpha * (-chosen / counts[:n]).sum()  # per-token NLL of the chosen answer
        mean_logits = logit_sums / counts.clamp(min=1)
        extras = {
            "rewards/chosen": r_chosen.sum(), "rewards/rejected": r_rejected.sum(),
            "rewards/accuracies": (r_chosen > r_rejected).float().sum(), "rewards/margins": (r_chosen - r_rejected).sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
            "logits/chosen": mean_logits[:n].sum(), "logits/rejected": mean_logits[n:].sum(),
        }
        return loss, extras


def _make_objective(cfg: DPORecipe, model_path: str, device: Any, one_row: bool) -> DPOObjective:
    from zephyr_ray.data.tokenize import cached_tokenizer

    ref, path, online = None, cfg.dpo.ref.path or model_path, cfg.dpo.ref.mode == "online"
    # With LoRA the policy starts as the base model at model_path: that is the reference, adapters off.
    adapter_ref = online and cfg.model.lora.enabled and path == model_path
    if adapter_ref:
        source = "the policy with its LoRA adapters disabled (no second model)"
    elif online:
        ref = load_frozen(path, device, getattr(torch, DTYPES[cfg.train.precision]), cfg.model.attn_implementation)
        source = "a frozen copy in each worker"
    else:
        source = "log-probs precomputed by Ray actors"
    if torch.distributed.get_rank() == 0:
        log.info("dDPO reference: %s, %s", path, source)
    return DPOObjective(cached_tokenizer(model_path).pad_token_id, cfg.dpo, cfg.data.packing, one_row, ref, adapter_ref)


def dpo_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the dDPO TorchTrainer."""
    from zephyr_ray.train.loop import run_worker

    run_worker(config, _make_objective, DPORecipe)


class ReferenceLogps(FrozenModel):
    """Ray Data actor: the frozen reference model adding ``ref_chosen_logps``/``ref_rejected_logps``."""

    def __init__(self, path: str, pad_id: int, packing: bool, dtype: str, attn: str, threads: int | None = None):
        super().__init__(path, dtype, attn, threads)
        self.pad_id, self.packing = pad_id, packing

    def columns(self, rows: dict[str, list]) -> dict[str, pa.Array]:
        import pyarrow as pa

        tensors = collate_pairs(rows, self.pad_id, self.packing, trains_one_row(self.model, self.packing))
        n = tensors["num_pairs"]
        logps = forward_logps(self.model, self.on_device(tensors))[0].double().cpu().numpy()
        return {REF_COLUMNS[0]: pa.array(logps[:n]), REF_COLUMNS[1]: pa.array(logps[n:])}


def _reference_fingerprint(model_path: str, cfg: DPORecipe) -> dict[str, Any]:
    """Everything the stored log-probs depend on: a mismatch means they must be recomputed."""
    from zephyr_ray.config import to_dict

    return {"reference": cfg.dpo.ref.path or model_path, "data": to_dict(cfg.data), "precision": cfg.train.precision,
            "max_prompt_length": cfg.dpo.max_prompt_length, "attn": cfg.model.attn_implementation}


def precompute_reference(dataset: Any, model_path: str, out: Path, cfg: DPORecipe, split: str = "train") -> Any:
    """The pairs with the reference's log-probs, computed once by an actor pool hosting the reference and kept
    under ``out/ref_logps`` (held-out pairs: ``out/ref_logps_eval``; ``frozen_pass``: reused by a rerun with the
    same settings)."""
    from zephyr_ray.data.tokenize import cached_tokenizer

    ref = cfg.dpo.ref
    kwargs = {"path": ref.path or model_path, "pad_id": cached_tokenizer(model_path).pad_token_id,
              "packing": cfg.data.packing, "attn": cfg.model.attn_implementation,
              "dtype": DTYPES[cfg.train.precision]}
    return frozen_pass(dataset, ReferenceLogps, kwargs, ref, pass_dir(out, "ref_logps", split),
                       {**_reference_fingerprint(model_path, cfg), "split": split})


def run_dpo(cfg: DPORecipe) -> StageResult:
    from zephyr_ray.data.preference import preference_examples, preference_schema

    if cfg.dpo.ref.path:  # a GGUF file or embedded name: workers and actors load its imported folder
        ref = dataclasses.replace(cfg.dpo.ref, path=resolve_gguf(cfg.dpo.ref.path))
        cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, ref=ref))

    examples = functools.partial(preference_examples, max_prompt_length=cfg.dpo.max_prompt_length)
    prepare = functools.partial(precompute_reference, cfg=cfg) if cfg.dpo.ref.mode == "precompute" else None
    return run_stage(cfg, examples=examples, schema=preference_schema(), train_fn=dpo_train_loop, curves=DPO_PANELS,
                     prepare=prepare)
