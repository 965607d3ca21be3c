"""dDPO recipe: preference training against the frozen dSFT model, on the same engine as dSFT.

Read top to bottom: the recipe (``DPORecipe``) → the frozen pass (by default Ray actors hosting the reference
add its log-probs to every pair once, so the workers never hold it) → ``run_stage`` (Ray Train workers rebuild
the recipe and ``objectives.DPOObjective`` from it) → the stage's result. The objective and the pair collation
are in ``train/objectives.py``.

The loss picks the data and the frozen pass: pairs for sigmoid/ipo/hinge/apo_zero (reference pass), simpo and
orpo (no reference at all: no pass, no reference columns, no reference model on the workers); unpaired rows
``{prompt, completion, label}`` for kto (``data.unpaired``), whose reference pass scores each row's completion and
its mismatched KL completion through the same actor, laid out as a pair (``pair_layout``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from zephyr_ray.attention import trains_one_row
from zephyr_ray.config import DPORecipe, to_dict
from zephyr_ray.data.preference import preference_examples, preference_schema
from zephyr_ray.data.tokenize import cached_tokenizer
from zephyr_ray.data.unpaired import balance_warning, pair_layout, unpaired_examples, unpaired_schema
from zephyr_ray.gguf_import import resolve as resolve_gguf
from zephyr_ray.models import DTYPES
from zephyr_ray.train.curves import DPO_PANELS
from zephyr_ray.train.frozen import FrozenModel, frozen_pass, pass_dir
from zephyr_ray.train.launch import StageResult, run_stage
from zephyr_ray.train.objectives import REF_COLUMNS, collate_pairs, forward_logps

log = logging.getLogger(__name__)

# KTO's curves: no pairwise accuracy; the KL reference point instead.
KTO_PANELS: tuple[tuple[str, ...], ...] = (("loss", "eval_loss"), ("rewards/margins", "eval_rewards/margins"),
                                           ("rewards/chosen", "rewards/rejected"), ("kl", "eval_kl"))
# ORPO's: the pairwise panels plus its two terms.
ORPO_PANELS: tuple[tuple[str, ...], ...] = (*DPO_PANELS, ("nll_loss", "log_odds_ratio"))


class ReferenceLogps(FrozenModel):
    """Ray Data actor: the frozen reference model adding ``ref_chosen_logps``/``ref_rejected_logps``; with
    ``layout`` (KTO: ``pair_layout``) the rows are first laid out as pairs (completion, KL completion)."""

    def __init__(self, path: str, pad_id: int, packing: bool, dtype: str, attn: str, threads: int | None = None,
                 layout: Callable[[dict[str, list]], dict[str, list]] | None = None):
        super().__init__(path, dtype, attn, threads)
        self.pad_id, self.packing, self.layout = pad_id, packing, layout

    def columns(self, rows: dict[str, list]) -> dict[str, pa.Array]:
        pairs = self.layout(rows) if self.layout is not None else rows
        tensors = collate_pairs(pairs, self.pad_id, self.packing, trains_one_row(self.model, self.packing))
        n = tensors["num_pairs"]
        logps = forward_logps(self.model, self.on_device(tensors))[0].double().cpu().numpy()
        return {REF_COLUMNS[0]: pa.array(logps[:n]), REF_COLUMNS[1]: pa.array(logps[n:])}


def _reference_fingerprint(model_path: str, cfg: DPORecipe) -> dict[str, Any]:
    """Everything the stored log-probs depend on: a mismatch means they must be recomputed."""
    out = {"reference": cfg.dpo.ref.path or model_path, "data": to_dict(cfg.data), "precision": cfg.train.precision,
           "max_prompt_length": cfg.dpo.max_prompt_length, "attn": cfg.model.attn_implementation}
    if cfg.dpo.loss_type == "kto":  # unpaired rows, their KL partners chosen within groups of micro_batch_size
        out.update(layout="unpaired", kl_group=cfg.train.micro_batch_size)
    return out


def precompute_reference(dataset: Any, model_path: str, out: Path, cfg: DPORecipe, split: str = "train") -> Any:
    """The pairs with the reference's log-probs, computed once by an actor pool hosting the reference and kept
    under ``out/ref_logps`` (held-out pairs: ``out/ref_logps_eval``; ``frozen_pass``: reused by a rerun with the
    same settings)."""
    ref = cfg.dpo.ref
    kwargs = {"path": ref.path or model_path, "pad_id": cached_tokenizer(model_path).pad_token_id,
              "packing": cfg.data.packing, "attn": cfg.model.attn_implementation,
              "dtype": DTYPES[cfg.train.precision], "layout": pair_layout if cfg.dpo.loss_type == "kto" else None}
    return frozen_pass(dataset, ReferenceLogps, kwargs, ref, pass_dir(out, "ref_logps", split),
                       {**_reference_fingerprint(model_path, cfg), "split": split})


def label_counts(dataset: Any) -> tuple[int, int]:
    """(desirable, undesirable) rows of a stage's KTO training rows: one pass over the ``label`` column."""
    good = total = 0
    for batch in dataset.select_columns(["label"]).iter_batches(batch_format="pyarrow", batch_size=None):
        labels = batch.column("label").to_pylist()
        good, total = good + sum(labels), total + len(labels)
    return good, total - good


def prepare_kto(dataset: Any, model_path: str, out: Path, cfg: DPORecipe, split: str = "train") -> Any:
    """KTO's frozen pass (``precompute_reference`` of completions and KL completions; none online), then, for the
    training rows, the desirable:undesirable balance logged once, with the paper's warning when off balance."""
    if cfg.dpo.ref.mode == "precompute":
        dataset = precompute_reference(dataset, model_path, out, cfg, split)
    if split == "train":
        good, bad = label_counts(dataset)
        log.info("KTO training rows: %d desirable, %d undesirable", good, bad)
        warning = balance_warning(good, bad, cfg.dpo.kto.desirable_weight, cfg.dpo.kto.undesirable_weight)
        if warning:
            log.warning(warning)
    return dataset


def run_dpo(cfg: DPORecipe) -> StageResult:
    """The dDPO stage end to end: the trained policy in ``<output_dir>/model``, metrics and curves beside it."""
    if cfg.dpo.ref.path:  # a GGUF file or embedded name: workers and actors load its imported folder
        ref = dataclasses.replace(cfg.dpo.ref, path=resolve_gguf(cfg.dpo.ref.path))
        cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, ref=ref))
    loss = cfg.dpo.loss_type
    prepare: Callable[..., Any] | None = None
    if loss == "kto":  # unpaired rows; the KL partners are fixed per group of micro_batch_size rows
        examples = functools.partial(unpaired_examples, max_prompt_length=cfg.dpo.max_prompt_length,
                                     kl_group=cfg.train.micro_batch_size)
        schema, curves = unpaired_schema(), KTO_PANELS
        prepare = functools.partial(prepare_kto, cfg=cfg)
    else:
        examples = functools.partial(preference_examples, max_prompt_length=cfg.dpo.max_prompt_length)
        schema, curves = preference_schema(), ORPO_PANELS if loss == "orpo" else DPO_PANELS
        # The frozen pass: the reference's log-probs join the pairs (online: the workers score them themselves;
        # simpo/orpo: no reference at all).
        if cfg.dpo.needs_reference and cfg.dpo.ref.mode == "precompute":
            prepare = functools.partial(precompute_reference, cfg=cfg)
    return run_stage(cfg, examples=examples, schema=schema, curves=curves, prepare=prepare)
