"""SimPO, ORPO and KTO as dDPO objectives: their config rules (no Ray), the objectives in process, then the real
stage on the session cluster (no reference pass for SimPO/ORPO; KTO's reference pass over completions and KL
completions)."""

import json
import logging
import math

import pytest
import torch

from zephyr_ray.config import ConfigError, DPORecipe, load_config
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.preference import preference_examples
from zephyr_ray.data.samples import sample_preferences, sample_unpaired
from zephyr_ray.data.unpaired import unpaired_examples
from zephyr_ray.models import load_model
from zephyr_ray.tracking import read_metrics
from zephyr_ray.train.losses import kto_means, orpo_loss, simpo_loss
from zephyr_ray.train.objectives import (
    REF_COLUMNS,
    DPOObjective,
    KTOObjective,
    build_objective,
    forward_logps,
)

from .conftest import ROOT


def _recipe(name: str, *overrides: str) -> DPORecipe:
    return load_config(ROOT / f"configs/tiny/{name}.yaml", ["wandb.enabled=false", *overrides], DPORecipe)


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_tiny_configs_load_with_the_papers_defaults():
    simpo, orpo, kto = (_recipe(f"dpo_{n}").dpo for n in ("simpo", "orpo", "kto"))
    assert (simpo.loss_type, simpo.simpo.beta, simpo.simpo.gamma, simpo.needs_reference) == ("simpo", 2.0, 1.0, False)
    assert (orpo.loss_type, orpo.orpo.lambda_, orpo.needs_reference) == ("orpo", 0.1, False)
    assert (kto.loss_type, kto.kto.desirable_weight, kto.kto.undesirable_weight, kto.needs_reference) == \
        ("kto", 1.0, 1.0, True)
    assert _recipe("dpo").dpo.needs_reference


@pytest.mark.parametrize(("name", "override", "message"), [
    ("dpo_simpo", "dpo.simpo.beta=0", "dpo.simpo.beta=0.0: must be > 0"),
    ("dpo_simpo", "dpo.simpo.gamma=-0.5", "dpo.simpo.gamma=-0.5: must be >= 0"),
    ("dpo_orpo", "dpo.orpo.lambda_=0", "dpo.orpo.lambda_=0.0: must be > 0"),
    ("dpo_kto", "dpo.kto.desirable_weight=0", "dpo.kto.desirable_weight=0.0: must be > 0"),
    ("dpo_kto", "dpo.kto.undesirable_weight=-1", "dpo.kto.undesirable_weight=-1.0: must be > 0"),
    ("dpo_kto", "dpo.beta=0", "dpo.beta=0.0: must be > 0"),
    ("dpo_simpo", "dpo.ref.path=other/model", "dpo.ref.path='other/model': loss_type=simpo uses no reference model"),
    ("dpo_orpo", "dpo.ref.mode=online", "dpo.ref.mode='online': loss_type=orpo uses no reference model"),
    ("dpo_orpo", "dpo.rpo_alpha=0.5", "dpo.rpo_alpha=0.5: not with loss_type=orpo"),
    ("dpo_kto", "dpo.rpo_alpha=0.5", "dpo.rpo_alpha=0.5: not with loss_type=kto"),
    ("dpo_simpo", "dpo.label_smoothing=0.1", "dpo.label_smoothing=0.1: applies to sigmoid, ipo and hinge only"),
    ("dpo_kto", "train.micro_batch_size=1", "train.micro_batch_size=1: loss_type=kto estimates its KL term"),
    ("dpo", "dpo.loss_type=kpo", "loss_type='kpo' is not valid"),
    ("dpo_simpo", "dpo.length_normalize=true",
     "dpo.length_normalize=True: applies to sigmoid, ipo, hinge and apo_zero, not loss_type=simpo: its log-probs"),
    ("dpo_kto", "dpo.length_normalize=true", "dpo.length_normalize=True: applies to sigmoid, ipo, hinge and apo_zero"),
])
def test_bad_loss_settings_are_config_errors(name, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("+", r"\+")):
        _recipe(name, override)


def test_simpo_is_fine_with_rpo_alpha_and_kto_with_an_online_reference():
    assert _recipe("dpo_simpo", "dpo.rpo_alpha=0.5").dpo.rpo_alpha == 0.5  # CPO-SimPO
    assert _recipe("dpo_kto", "dpo.ref.mode=online").dpo.ref.mode == "online"


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_objectives_load_no_reference_and_match_the_losses(loss, tiny_model, tokenizer):
    cfg = _recipe(f"dpo_{loss}", "data.packing=true")
    objective = build_objective(cfg, tokenizer.pad_token_id, False, model_path=tiny_model)
    assert type(objective) is DPOObjective and objective.ref_model is None and not objective.adapter_ref
    rows, _ = preference_examples(sample_preferences(5, seed=3), tokenizer, cfg.data, cfg.dpo.max_prompt_length)
    batch = objective.collate(_columns(rows))
    assert not set(REF_COLUMNS) & set(batch)  # no reference columns needed
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        loss_value, extras = objective.loss(model, batch)
        logps, counts, _ = forward_logps(model, batch)
    n = len(rows)
    if loss == "simpo":
        losses, expected = simpo_loss(logps[:n], logps[n:], counts[:n].float(), counts[n:].float(), beta=2.0, gamma=1.0)
    else:
        losses, expected = orpo_loss(logps[:n], logps[n:], counts[:n].float(), counts[n:].float(), lambda_=0.1)
        assert {"nll_loss", "log_odds_ratio"} <= set(extras)
    assert loss_value.item() == pytest.approx(losses.sum().item(), rel=1e-6)
    for k, v in expected.items():
        assert extras[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    # SimPO's reward is beta times the per-token mean log-prob, by hand for the first chosen answer.
    if loss == "simpo":
        avg0 = logps[0].item() / len(rows[0]["chosen_ids"])
        assert (logps[:n] / counts[:n] * 2.0).sum().item() == pytest.approx(extras["rewards/chosen"].item(), rel=1e-6)
        assert avg0 < 0


def test_length_normalized_dpo_rewards_the_log_ratio_per_answer_token(tiny_model, tokenizer):
    cfg = _recipe("dpo", "dpo.length_normalize=true", "dpo.beta=0.5")
    objective = build_objective(cfg, tokenizer.pad_token_id, False, model_path=tiny_model)
    rows, _ = preference_examples(sample_preferences(4, seed=5), tokenizer, cfg.data, cfg.dpo.max_prompt_length)
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        logps, counts, _ = forward_logps(model, objective.collate(_columns(rows)))
    n = len(rows)
    assert len(set(counts.tolist())) > 2  # answers of different lengths: a summed reward would differ per pair
    # A reference whose log-probs lie 0.3 nats per token below the policy's on every chosen answer and equal on
    # every rejected one: each pair's reward is β·0.3 = 0.15 on chosen, 0 on rejected, whatever its lengths.
    ref = {REF_COLUMNS[0]: (logps[:n] - 0.3 * counts[:n]).tolist(), REF_COLUMNS[1]: logps[n:].tolist()}
    with torch.no_grad():
        loss_value, extras = objective.loss(model, objective.collate({**_columns(rows), **ref}))
    assert loss_value.item() == pytest.approx(n * math.log1p(math.exp(-0.15)), rel=1e-5)
    assert extras["rewards/chosen"].item() == pytest.approx(n * 0.15, rel=1e-4)
    assert extras["rewards/rejected"].item() == pytest.approx(0, abs=1e-5)
    assert extras["rewards/accuracies"].item() == n
    assert extras["logps/chosen"].item() == pytest.approx(logps[:n].sum().item(), rel=1e-6)  # still summed
    # Unnormalised, the same columns give each pair β·0.3·|chosen|.
    plain = build_objective(_recipe("dpo", "dpo.beta=0.5"), tokenizer.pad_token_id, False, model_path=tiny_model)
    with torch.no_grad():
        _, extras = plain.loss(model, plain.collate({**_columns(rows), **ref}))
    assert extras["rewards/chosen"].item() == pytest.approx(0.15 * counts[:n].sum().item(), rel=1e-4)


def test_kto_objective_against_itself_is_half_per_row_and_summarizes_per_label(tiny_model, tokenizer):
    cfg = _recipe("dpo_kto", "train.micro_batch_size=4", "data.group_by_length=false")
    objective = build_objective(cfg, tokenizer.pad_token_id, False, model_path=tiny_model)
    assert type(objective) is KTOObjective and objective.ref_model is None
    rows, _ = unpaired_examples(sample_unpaired(3, seed=4), tokenizer, cfg.data, cfg.dpo.max_prompt_length, kl_group=4)
    assert [r["label"] for r in rows] == [True, False] * 3
    model = load_model(tiny_model).eval()
    batch = objective.collate(_columns(rows))
    assert batch["label"].tolist() == [True, False] * 3 and batch["num_pairs"] == 6
    with torch.no_grad():
        logps = forward_logps(model, batch)[0]
    # The reference pass's columns from the same model: every log-ratio and the KL estimate are 0, so each row
    # loses 1 - sigmoid(0) = 0.5.
    cols = {REF_COLUMNS[0]: logps[:6].tolist(), REF_COLUMNS[1]: logps[6:].tolist()}
    batch = objective.collate({**_columns(rows), **cols})
    with torch.no_grad():
        loss_value, extras = objective.loss(model, batch)
    assert loss_value.item() == pytest.approx(3.0, abs=1e-5)
    assert (extras["count/chosen"].item(), extras["count/rejected"].item()) == (3, 3)
    assert extras["logps/chosen_sum"].item() == pytest.approx(logps[0:6:2].sum().item(), rel=1e-6)
    means = {k: v.item() / 6 for k, v in {"loss": loss_value, **extras}.items()}
    out = objective.summarize(means)
    assert out == {"loss": pytest.approx(0.5), **{k: pytest.approx(v) for k, v in kto_means(means).items()}}
    assert out["rewards/chosen"] == pytest.approx(0, abs=1e-6) and out["kl"] == pytest.approx(0, abs=1e-6)
    assert out["logps/rejected"] == pytest.approx(logps[1:6:2].mean().item(), rel=1e-6)
    # The policy moved off the reference: desirable rows' log-ratio +1, undesirable -1 (nats), KL pairs unchanged.
    shifted = {REF_COLUMNS[0]: (logps[:6] - torch.tensor([1.0, -1.0] * 3)).tolist(), REF_COLUMNS[1]: cols[REF_COLUMNS[1]]}
    with torch.no_grad():
        loss_value, extras = objective.loss(model, objective.collate({**_columns(rows), **shifted}))
    assert loss_value.item() == pytest.approx(6 * (1 - 1 / (1 + math.exp(-0.1))), abs=1e-5)
    out = objective.summarize({k: v.item() / 6 for k, v in {"loss": loss_value, **extras}.items()})
    assert (out["rewards/chosen"], out["rewards/rejected"], out["rewards/margins"]) == \
        (pytest.approx(0.1, abs=1e-5), pytest.approx(-0.1, abs=1e-5), pytest.approx(0.2, abs=1e-5))


def _run(tmp_path, name, model, data_file, *overrides):
    from zephyr_ray.train.dpo import run_dpo

    cfg = _recipe(name, f"model.path={model}", f"run.output_dir={tmp_path}", f"data.path={data_file}",
                  f"data.eval_path={data_file}", "data.shuffle=false", "train.micro_batch_size=4", "train.epochs=4",
                  "train.eval_every=4", "train.lr=1e-3", "train.warmup_ratio=0", *overrides)
    result = run_dpo(cfg)
    return result, read_metrics(result.output_dir)


@pytest.mark.ray
# One reference-free loss through the stage (the suite's time budget): ORPO takes the same path (no reference
# pass, no reference model; the objective tests above) and learns in process in tests/test_losses_more.py.
@pytest.mark.parametrize("loss", ["simpo"])
def test_reference_free_stage_runs_without_a_reference_pass_and_learns(loss, ray_cluster, tiny_model, tmp_path):
    pairs = write_jsonl(sample_preferences(16, seed=2), tmp_path / "prefs.jsonl")
    result, metrics = _run(tmp_path / "run", f"dpo_{loss}", tiny_model, pairs)
    assert [m["step"] for m in metrics] == list(range(1, 9))  # 16 pairs / 2 workers / 4 per micro-batch x 4 epochs
    assert not list(result.output_dir.glob("ref_logps*"))  # no reference pass, train or eval
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} | ({"nll_loss", "log_odds_ratio"} if loss == "orpo" else set())
    assert keys <= set(metrics[0]) and all(math.isfinite(m["loss"]) for m in metrics)
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8] and {f"eval_{k}" for k in keys} <= set(evals[0])
    # The same 16 pairs evaluated after 4 and 8 steps: the pairwise margin grows, accuracy does not fall.
    first, last = metrics[0], evals[-1]
    assert last["eval_rewards/margins"] > first["rewards/margins"]
    assert last["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]
    assert last["eval_rewards/accuracies"] >= max(first["rewards/accuracies"], 0.75)
    assert last["eval_loss"] < evals[0]["eval_loss"]


@pytest.mark.ray
def test_kto_stage_precomputes_both_reference_columns_and_separates_the_labels(ray_cluster, tiny_model, tmp_path,
                                                                                caplog):
    rows = write_jsonl(sample_unpaired(8, seed=2), tmp_path / "kto.jsonl")  # 16 rows, 8 desirable
    with caplog.at_level(logging.INFO, logger="zephyr_ray.train.dpo"):
        result, metrics = _run(tmp_path / "run", "dpo_kto", tiny_model, rows, "dpo.kto.desirable_weight=2.0",
                               "dpo.beta=0.5")
    warnings = [r.getMessage() for r in caplog.records if "KTO paper's advice" in r.getMessage()]
    assert len(warnings) == 1 and "= 2.00, outside [1, 1.33]" in warnings[0]  # logged once, for the train split
    assert [m["step"] for m in metrics] == list(range(1, 9))  # 16 rows / 2 workers / 4 per micro-batch x 4 epochs
    for split in ("ref_logps", "ref_logps_eval"):
        fingerprint = json.loads((result.output_dir / split / "_SUCCESS").read_text())["fingerprint"]
        assert (fingerprint["layout"], fingerprint["kl_group"]) == ("unpaired", 4)
    # Step 1: the policy is the reference: rewards and KL estimate 0, every row loses 1 - sigmoid(0), weighted:
    assert metrics[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5) and metrics[0]["kl"] == pytest.approx(0, abs=1e-5)
    # 8 rows in step 1 (2 workers x 4): desirable ones lose 2 x 0.5, undesirable 0.5, so the mean is 0.5 + d / 16.
    desirable = (metrics[0]["loss"] - 0.5) * 16
    assert desirable == pytest.approx(round(desirable), abs=1e-3) and 0 < round(desirable) < 8
    assert not any(k.endswith("_sum") or k.startswith("count/") for m in metrics for k in m)
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8]
    last = evals[-1]
    assert last["eval_rewards/chosen"] > last["eval_rewards/rejected"] + 0.05
    assert last["eval_rewards/margins"] == pytest.approx(last["eval_rewards/chosen"] - last["eval_rewards/rejected"])
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]
