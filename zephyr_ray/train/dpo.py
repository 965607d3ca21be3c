"""dDPO recipe: preference training against the frozen dSFT model, on the same engine as dSFT.

Read top to bottom: the recipe (``DPORecipe``) → the frozen pass (by default Ray actors hosting the reference
add its log-probs to every pair once, so the workers never hold it) → ``run_stage`` (Ray Train workers rebuild
the recipe and ``objectives.DPOObjective`` from it) → the stage's result. The objective and the pair collation
are in ``train/objectives.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pyarrow as pa

from zephyr_ray.attention import trains_one_row
from zephyr_ray.config import DPORecipe, to_dict
from zephyr_ray.data.preference import preference_examples, preference_schema
from zephyr_ray.data.tokenize import cached_tokenizer
from zephyr_ray.gguf_import import resolve as resolve_gguf
from zephyr_ray.models import DTYPES
from zephyr_ray.train.curves import DPO_PANELS
from zephyr_ray.train.frozen import FrozenModel, frozen_pass, pass_dir
from zephyr_ray.train.launch import StageResult, run_stage
from zephyr_ray.train.objectives import REF_COLUMNS, collate_pairs, forward_logps


class ReferenceLogps(FrozenModel):
    """Ray Data actor: the frozen reference model adding ``ref_chosen_logps``/``ref_rejected_logps``."""

    def __init__(self, path: str, pad_id: int, packing: bool, dtype: str, attn: str, threads: int | None = None):
        super().__init__(path, dtype, attn, threads)
        self.pad_id, self.packing = pad_id, packing

    def columns(self, rows: dict[str, list]) -> dict[str, pa.Array]:
        tensors = collate_pairs(rows, self.pad_id, self.packing, trains_one_row(self.model, self.packing))
        n = tensors["num_pairs"]
        logps = forward_logps(self.model, self.on_device(tensors))[0].double().cpu().numpy()
        return {REF_COLUMNS[0]: pa.array(logps[:n]), REF_COLUMNS[1]: pa.array(logps[n:])}


def _reference_fingerprint(model_path: str, cfg: DPORecipe) -> dict[str, Any]:
    """Everything the stored log-probs depend on: a mismatch means they must be recomputed."""
    return {"reference": cfg.dpo.ref.path or model_path, "data": to_dict(cfg.data), "precision": cfg.train.precision,
            "max_prompt_length": cfg.dpo.max_prompt_length, "attn": cfg.model.attn_implementation}


def precompute_reference(dataset: Any, model_path: str, out: Path, cfg: DPORecipe, split: str = "train") -> Any:
    """The pairs with the reference's log-probs, computed once by an actor pool hosting the reference and kept
    under ``out/ref_logps`` (held-out pairs: ``out/ref_logps_eval``; ``frozen_pass``: reused by a rerun with the
    same settings)."""
    ref = cfg.dpo.ref
    kwargs = {"path": ref.path or model_path, "pad_id": cached_tokenizer(model_path).pad_token_id,
              "packing": cfg.data.packing, "attn": cfg.model.attn_implementation,
              "dtype": DTYPES[cfg.train.precision]}
    return frozen_pass(dataset, ReferenceLogps, kwargs, ref, pass_dir(out, "ref_logps", split),
                       {**_reference_fingerprint(model_path, cfg), "split": split})


def run_dpo(cfg: DPORecipe) -> StageResult:
    """The dDPO stage end to end: the trained policy in ``<output_dir>/model``, metrics and curves beside it."""
    if cfg.dpo.ref.path:  # a GGUF file or embedded name: workers and actors load its imported folder
        ref = dataclasses.replace(cfg.dpo.ref, path=resolve_gguf(cfg.dpo.ref.path))
        cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, ref=ref))
    examples = functools.partial(preference_examples, max_prompt_length=cfg.dpo.max_prompt_length)
    # The frozen pass: the reference's log-probs join the pairs (online: the workers score them themselves).
    prepare = functools.partial(precompute_reference, cfg=cfg) if cfg.dpo.ref.mode == "precompute" else None
    return run_stage(cfg, examples=examples, schema=preference_schema(), curves=DPO_PANELS, prepare=prepare)
