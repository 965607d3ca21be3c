"""dDPO: preference training against the frozen dSFT model, on the same engine as dSFT.

Chosen and rejected go through the policy in one forward pass: either as 2B rows, or (``data.packing``)
packed as one row per pair with restarting ``position_ids``. Reference log-probs come precomputed by
Ray actors (default: workers never hold the reference) or from a frozen copy in each worker.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zephyr_ray.config import DPOConfig, DPORecipe
from zephyr_ray.data.packing import collate
from zephyr_ray.data.tokenize import IGNORE_INDEX
from zephyr_ray.train.curves import DPO_PANELS
from zephyr_ray.train.launch import StageResult, run_stage
from zephyr_ray.train.losses import label_logits, preference_loss, sequence_logps

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def collate_pairs(batch: dict[str, Any], pad_id: int, packing: bool) -> dict[str, Any]:
    """B pairs → tensors whose ``seq_index`` maps tokens to sequences 0..B-1 (chosen) and B..2B-1
    (rejected); one row per pair when ``packing``, else chosen rows then rejected rows."""
    n = len(batch["prompt_ids"])
    seqs = {}
    for side, offset in (("chosen", 0), ("rejected", n)):
        for i in range(n):
            prompt, answer = list(batch["prompt_ids"][i]), list(batch[f"{side}_ids"][i])
            seqs[offset + i] = (prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)
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
    ref_model: Any = None  # online mode only

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        return collate_pairs(batch, self.pad_id, self.packing)

    def units(self, batch: dict[str, Any]) -> int:
        return batch["num_pairs"]

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["num_pairs"]
        logps, counts, logit_sums = forward_logps(model, batch)
        if self.ref_model is not None:
            with torch.no_grad():
                ref = forward_logps(self.ref_model, batch)[0]
            ref_chosen, ref_rejected = ref[:n], ref[n:]
        else:
            ref_chosen, ref_rejected = (batch[c].to(logps.device) for c in REF_COLUMNS)
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


def _frozen(path: str, device: Any, dtype: torch.dtype, attn: str) -> Any:
    from zephyr_ray.models import load_model

    model = load_model(path, dtype=dtype, attn_implementation=attn).to(device).eval()
    model.requires_grad_(False)
    return model


def _make_objective(cfg: DPORecipe, model_path: str, device: Any) -> DPOObjective:
    from zephyr_ray.data.tokenize import cached_tokenizer

    ref = None
    if cfg.dpo.ref.mode == "online":
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        ref = _frozen(cfg.dpo.ref.path or model_path, device, dtype, cfg.model.attn_implementation)
    return DPOObjective(cached_tokenizer(model_path).pad_token_id, cfg.dpo, cfg.data.packing, ref)


def dpo_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the dDPO TorchTrainer."""
    from zephyr_ray.train.loop import run_worker

    run_worker(config, _make_objective, DPORecipe)


class ReferenceLogps:
    """Ray Data actor: the frozen reference model adding ``ref_chosen_logps``/``ref_rejected_logps``."""

    def __init__(self, path: str, pad_id: int, packing: bool, dtype: str, attn: str, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = _frozen(path, device, getattr(torch, dtype), attn)
        self.pad_id, self.packing = pad_id, packing

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        tensors = collate_pairs(batch.to_pydict(), self.pad_id, self.packing)
        n = tensors["num_pairs"]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logps = forward_logps(self.model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()})[0]
        logps = logps.double().cpu().numpy()
        return batch.append_column(REF_COLUMNS[0], pa.array(logps[:n])).append_column(REF_COLUMNS[1], pa.array(logps[n:]))


def _reference_fingerprint(model_path: str, cfg: DPORecipe) -> dict[str, Any]:
    """Everything the stored log-probs depend on: a mismatch means they must be recomputed."""
    from zephyr_ray.config import to_dict

    return {"reference": cfg.dpo.ref.path or model_path, "data": to_dict(cfg.data), "precision": cfg.train.precision,
            "max_prompt_length": cfg.dpo.max_prompt_length, "attn": cfg.model.attn_implementation}


def precompute_reference(dataset: Any, model_path: str, out: Path, cfg: DPORecipe) -> Any:
    """Stream the pairs once through an actor pool hosting the reference; results go to Parquet under
    ``out/ref_logps`` and training streams from there. ``_SUCCESS`` records what they were computed
    from: a rerun reuses them only if that still holds, and a half-written folder is cleared first."""
    import shutil
    import time

    import ray.data

    from zephyr_ray.data.tokenize import cached_tokenizer

    target = out / "ref_logps"
    done = target / "_SUCCESS"
    fingerprint = _reference_fingerprint(model_path, cfg)
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        log.info("reusing the reference log-probs in %s", target)
    else:
        if target.exists():
            log.info("clearing %s (%s)", target, "other settings" if done.exists() else "an unfinished pass")
            shutil.rmtree(target)
        t0 = time.perf_counter()
        ref = cfg.dpo.ref
        dataset.map_batches(
            ReferenceLogps, batch_size=ref.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=ref.num_actors),
            num_gpus=ref.num_gpus_per_actor, num_cpus=ref.num_cpus_per_actor,
            fn_constructor_kwargs={"path": ref.path or model_path, "pad_id": cached_tokenizer(model_path).pad_token_id,
                                   "packing": cfg.data.packing, "attn": cfg.model.attn_implementation,
                                   "threads": ref.threads_per_actor,
                                   "dtype": "bfloat16" if cfg.train.precision == "bf16" else "float32"},
        ).write_parquet(str(target))
        seconds = time.perf_counter() - t0
        done.write_text(json.dumps({"seconds": round(seconds, 3), "fingerprint": fingerprint}))
        log.info("reference log-probs precomputed in %.1f s", seconds)
    return ray.data.read_parquet(str(target))


def run_dpo(cfg: DPORecipe) -> StageResult:
    from zephyr_ray.data.preference import preference_examples, preference_schema

    examples = functools.partial(preference_examples, max_prompt_length=cfg.dpo.max_prompt_length)
    prepare = functools.partial(precompute_reference, cfg=cfg) if cfg.dpo.ref.mode == "precompute" else None
    return run_stage(cfg, examples=examples, schema=preference_schema(), train_fn=dpo_train_loop, curves=DPO_PANELS,
                     prepare=prepare)
