"""Objectives built from a stage's recipe, and the stage description a Ray Train worker rebuilds the recipe from.
No Ray cluster: what the workers would do with a ``Stage``, in process."""

import pickle

import pytest
import torch

from zephyr_ray.config import DPORecipe, SFTRecipe, TrainingRecipe, load_config
from zephyr_ray.models import load_model
from zephyr_ray.train.loop import Stage, StepPlan
from zephyr_ray.train.objectives import (
    REF_COLUMNS,
    DistillObjective,
    DPOObjective,
    SFTObjective,
    build_objective,
    collate_pairs,
)

from .conftest import ROOT
from .test_dpo import _columns, _pairs


def _recipe(name: str, schema: type, *overrides: str):
    return load_config(ROOT / f"configs/tiny/{name}.yaml", ["wandb.enabled=false", *overrides], schema)


def test_sft_recipes_build_the_sft_or_distillation_objective():
    plain = build_objective(_recipe("sft", SFTRecipe), 7, True, model_path="unused")
    assert type(plain) is SFTObjective and (plain.pad_id, plain.one_row) == (7, True)
    cfg = _recipe("sft", SFTRecipe, "distill.enabled=true", "distill.teacher_tiny_seed=3", "distill.top_k=5",
                  "distill.loss=jsd", "distill.alpha=0.25")
    distill = build_objective(cfg, 2, False, model_path="unused")
    assert type(distill) is DistillObjective and (distill.pad_id, distill.one_row) == (2, False)
    assert distill.cfg is cfg.distill and (distill.cfg.top_k, distill.cfg.loss, distill.cfg.alpha) == (5, "jsd", 0.25)


def test_dpo_recipes_build_the_dpo_objective_with_their_reference(tiny_model, tokenizer):
    cfg = _recipe("dpo", DPORecipe, "dpo.beta=0.3", "data.packing=true")
    pre = build_objective(cfg, 4, True, model_path=tiny_model)
    assert type(pre) is DPOObjective
    assert (pre.pad_id, pre.packing, pre.one_row, pre.ref_model, pre.adapter_ref) == (4, True, True, None, False)
    assert pre.cfg.beta == 0.3
    # Online with LoRA and no other reference: the policy's own base, adapters off; no second model.
    lora = _recipe("dpo", DPORecipe, "dpo.ref.mode=online", "model.lora.enabled=true")
    adapter = build_objective(lora, 4, False, model_path=tiny_model)
    assert adapter.adapter_ref and adapter.ref_model is None
    # Online without LoRA: a frozen copy of the starting model, whose log-probs are the precomputed ones.
    online = build_objective(_recipe("dpo", DPORecipe, "dpo.ref.mode=online"), tokenizer.pad_token_id, False,
                             model_path=tiny_model)
    frozen = online.ref_model
    assert not online.adapter_ref and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    fresh = load_model(tiny_model).eval()
    assert all(torch.equal(a, b) for a, b in zip(frozen.state_dict().values(), fresh.state_dict().values()))
    # Its loss against the frozen copy equals the precomputed objective's against the same log-probs as columns:
    # at the start (policy = reference) every pair's loss is log 2.
    columns = _columns(_pairs(tokenizer, 4))
    loss_online, extras = online.loss(fresh, online.collate(columns))
    assert loss_online.item() == pytest.approx(4 * torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert extras["rewards/margins"].item() == pytest.approx(0.0, abs=1e-5)
    # With LoRA but another reference path, that model is loaded (the base is not the reference).
    other = build_objective(_recipe("dpo", DPORecipe, "dpo.ref.mode=online", "model.lora.enabled=true",
                                    f"dpo.ref.path={tiny_model}"), 4, False, model_path="/start/elsewhere")
    assert not other.adapter_ref and other.ref_model is not None
    batch = collate_pairs(columns, tokenizer.pad_token_id, packing=False)
    assert not any(c in batch for c in REF_COLUMNS)


def test_other_recipes_have_no_objective():
    with pytest.raises(TypeError, match="TrainingRecipe"):
        build_objective(TrainingRecipe(), 0, False, model_path="m")


@pytest.mark.parametrize(("name", "schema", "kind"), [("sft", SFTRecipe, "sft"), ("dpo", DPORecipe, "dpo")])
def test_a_stage_pickles_and_gives_back_the_typed_recipe(name, schema, kind):
    cfg = _recipe(name, schema, "train.lr=0.00125", "train.seed=11")
    stage = Stage.of(cfg, "/models/start", StepPlan(total_steps=3, micro_batches_per_epoch=5), [("ref", True)])
    assert stage.kind == kind
    back = pickle.loads(pickle.dumps(stage))
    rebuilt = back.typed_recipe()
    assert type(rebuilt) is schema and rebuilt == cfg
    assert (rebuilt.train.lr, rebuilt.train.seed) == (0.00125, 11)
    assert (back.model_path, back.plan, back.eval_shares) == ("/models/start", StepPlan(3, 5), [("ref", True)])


def test_only_stage_recipes_make_a_stage():
    with pytest.raises(TypeError, match="not a training stage's recipe"):
        Stage.of(TrainingRecipe(), "m", StepPlan(1, 1))
