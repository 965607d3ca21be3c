"""dDPO: log-prob plumbing without Ray, then the reference actors and training on the session cluster."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from zephyr_ray.config import DPORecipe, load_config
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.preference import tokenize_pair, validate_pair
from zephyr_ray.data.samples import sample_preferences
from zephyr_ray.tracking import read_metrics
from zephyr_ray.train.objectives import collate_pairs, forward_logps

from .conftest import ROOT, shared_file
from .wandb_records import read_offline_run


def _pairs(tokenizer, n):
    rows = []
    for i, row in enumerate(sample_preferences(n, seed=5)):
        rows.append({**tokenize_pair(tokenizer, validate_pair(row)), "sample_ids": [str(i)]})
    return rows


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def _manual_logps(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer))


def test_packed_and_unpacked_pairs_give_the_same_logps(tiny_model, tokenizer):
    from zephyr_ray.models import load_model

    model = load_model(tiny_model).eval()
    rows = _pairs(tokenizer, 6)
    batch = _columns(rows)
    one = collate_pairs(batch, tokenizer.pad_token_id, packing=True, one_row=True)
    assert one["input_ids"].shape[0] == 1 and one["num_tokens"] <= one["input_ids"].shape[1] < one["num_tokens"] + 8
    with torch.no_grad():
        packed = forward_logps(model, collate_pairs(batch, tokenizer.pad_token_id, packing=True))
        plain = forward_logps(model, collate_pairs(batch, tokenizer.pad_token_id, packing=False))
        flat = forward_logps(model, one)
    for a, b, c in zip(packed, plain, flat):
        assert a.tolist() == pytest.approx(b.tolist(), abs=1e-5)
        assert c.tolist() == pytest.approx(b.tolist(), abs=1e-5)
    # ... and both equal a sequence-by-sequence sum of log-probs over the response tokens.
    expected = [_manual_logps(model, r["prompt_ids"], r["chosen_ids"]) for r in rows]
    expected += [_manual_logps(model, r["prompt_ids"], r["rejected_ids"]) for r in rows]
    assert packed[0].tolist() == pytest.approx(expected, abs=1e-4)
    assert packed[1].tolist() == [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]


@pytest.mark.ray
def test_precomputed_reference_equals_online_logps(ray_cluster, tiny_model, tokenizer):
    import pyarrow as pa
    import ray.data

    from zephyr_ray.data.preference import preference_schema
    from zephyr_ray.models import load_model
    from zephyr_ray.train.dpo import ReferenceLogps

    rows = _pairs(tokenizer, 20)
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=preference_schema()))
    out = ds.map_batches(ReferenceLogps, batch_size=7, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                         num_cpus=0.5, fn_constructor_kwargs={"path": tiny_model, "pad_id": tokenizer.pad_token_id,
                                                              "packing": True, "dtype": "float32", "attn": "sdpa"})
    got = {r["sample_ids"][0]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in out.take_all()}
    model = load_model(tiny_model).eval()
    with torch.no_grad():  # what online mode computes inside a worker, on a differently shaped batch
        online = forward_logps(model, collate_pairs(_columns(rows), tokenizer.pad_token_id, packing=False))[0].numpy()
    n = len(rows)
    assert len(got) == n
    for i, r in enumerate(rows):
        assert got[r["sample_ids"][0]] == pytest.approx((online[i], online[n + i]), abs=1e-5)


@pytest.mark.ray
def test_reference_pass_clears_half_written_output_and_reuses_only_matching_results(ray_cluster, tiny_model,
                                                                                    tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from zephyr_ray.data.preference import preference_schema
    from zephyr_ray.train.dpo import precompute_reference

    rows = _pairs(tokenizer, 12)
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=preference_schema()))
    target = tmp_path / "ref_logps"
    target.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:5], schema=preference_schema()), target / "stale.parquet")  # killed run
    cfg = _cfg(tmp_path, tiny_model, "dpo.ref.num_cpus_per_actor=0.5")
    assert precompute_reference(ds, tiny_model, tmp_path, cfg).count() == 12  # no leftover rows
    first = (target / "_SUCCESS").read_text()
    precompute_reference(ds, tiny_model, tmp_path, cfg)
    assert (target / "_SUCCESS").read_text() == first  # same settings: reused, not recomputed
    other = _cfg(tmp_path, tiny_model, "dpo.ref.num_cpus_per_actor=0.5", "dpo.max_prompt_length=32")
    assert precompute_reference(ds, tiny_model, tmp_path, other).count() == 12
    assert json.loads((target / "_SUCCESS").read_text())["fingerprint"]["max_prompt_length"] == 32


def _cfg(tmp: Path, model: str, *overrides: str) -> DPORecipe:
    return load_config(ROOT / "configs/tiny/dpo.yaml",
                       [f"model.path={model}", f"run.output_dir={tmp}", "wandb.enabled=false", *overrides], DPORecipe)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(sample_preferences(48, seed=2), tmp_path_factory.mktemp("prefs") / "prefs.jsonl")


EVAL_KEYS = ["eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
             "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"]  # TRL's names


def _held_out_metrics(cfg: DPORecipe, policy_dir, reference, tokenizer, raw_rows) -> dict[str, float]:
    """TRL's eval metrics of ``policy_dir`` against ``reference`` over ``raw_rows``, in-process, one padded batch."""
    from zephyr_ray.data.preference import preference_examples
    from zephyr_ray.models import load_model
    from zephyr_ray.train.losses import preference_loss

    rows, _ = preference_examples(raw_rows, tokenizer, cfg.data, cfg.dpo.max_prompt_length)
    batch = collate_pairs(_columns(rows), tokenizer.pad_token_id, packing=False)
    with torch.no_grad():
        policy, ref = (forward_logps(load_model(m).eval(), batch)[0] for m in (policy_dir, reference))
    n = len(rows)
    losses, chosen, rejected = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=cfg.dpo.beta)
    values = [losses, chosen, rejected, (chosen > rejected).float(), chosen - rejected, policy[:n], policy[n:]]
    out = {k: v.mean().item() for k, v in zip(EVAL_KEYS, values, strict=True)}
    return {**out, "min_margin": (chosen - rejected).abs().min().item()}


@pytest.mark.ray
@pytest.mark.slow
def test_zero2_precompute_learns_preferences_and_zero3_online_resumes_identically(ray_cluster, tiny_model, tokenizer,
                                                                                   pairs_file, tmp_path):
    from zephyr_ray.train.dpo import run_dpo

    held = sample_preferences(8, seed=9)  # held-out pairs, evaluated every 4 steps (and at the last)
    # 4 epochs of 6 steps; checkpoints at 8, 16 and the last (each costs a save: the suite's time budget)
    common = [f"data.path={pairs_file}", "train.epochs=4", "train.micro_batch_size=4", "train.checkpoint_every=8",
              "train.eval_every=4",
              "train.lr=1e-3", "data.shuffle=false", f"data.eval_path={write_jsonl(held, tmp_path / 'held.jsonl')}"]
    # a: the config's padding-free layout (a micro-batch's pairs in one row); b: two padded rows per pair.
    # Same numbers either way.
    a = run_dpo(_cfg(tmp_path / "a", tiny_model, *common, "deepspeed.config=configs/deepspeed/zero2.json",
                     "wandb.enabled=true", "wandb.mode=offline"))
    b = run_dpo(_cfg(tmp_path / "b", tiny_model, *common, "deepspeed.config=configs/deepspeed/zero3.json",
                     "dpo.ref.mode=online", "train.inject_failure_at_step=10", "run.max_failures=1",
                     "data.packing=false"))
    ma, mb = read_metrics(a.output_dir), read_metrics(b.output_dir)
    assert len(ma) == len(mb) == json.loads((a.output_dir / "data_report.json").read_text())["total_steps"] == 24
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"]
    assert set(keys) <= set(ma[0])
    # Step 1: policy == reference, so every implicit reward is 0 and the loss is log 2.
    assert ma[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and ma[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    last = ma[-6:]
    assert max(m["rewards/accuracies"] for m in last) == 1.0
    assert np.mean([m["rewards/margins"] for m in last]) > np.mean([m["rewards/margins"] for m in ma[1:7]]) + 1.0
    # Packed precompute (ZeRO-2) and unpacked online reference (ZeRO-3, crashed after step 10, resumed from
    # step 8) agree.
    restarts = [json.loads(line) for line in (b.output_dir / "restarts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in restarts] == [8]
    for k in keys:
        assert [m[k] for m in ma] == pytest.approx([m[k] for m in mb], abs=2e-4), k
    assert (a.output_dir / "ref_logps" / "_SUCCESS").exists() and not (b.output_dir / "ref_logps").exists()
    # Held-out pairs: TRL's eval metrics at exactly steps 4, 8, ..., 24, the same across layouts, reference modes
    # and the restart; the reference log-probs of a's came from their own actor pass.
    for m in (ma, mb):
        assert [r["step"] for r in m if "eval_loss" in r] == list(range(4, 25, 4))
        assert all(set(EVAL_KEYS) <= set(r) for r in m if "eval_loss" in r)
        assert all(0 <= r["eval_rewards/accuracies"] <= 1 for r in m if "eval_loss" in r)
    evals_a, evals_b = ([r for r in m if "eval_loss" in r] for m in (ma, mb))
    for k in EVAL_KEYS:
        assert [r[k] for r in evals_a] == pytest.approx([r[k] for r in evals_b], abs=2e-4), k
    fingerprint = json.loads((a.output_dir / "ref_logps_eval" / "_SUCCESS").read_text())["fingerprint"]
    assert fingerprint["split"] == "eval" and not (b.output_dir / "ref_logps_eval").exists()
    report = json.loads((a.output_dir / "data_report.json").read_text())
    assert (report["rows"], report["eval"]["rows"], report["eval"]["used"]) == (48, 8, 8)
    # The last evaluation ran on the exported policy: the same numbers in-process.
    expected = _held_out_metrics(_cfg(tmp_path / "a", tiny_model, *common), a.model_dir, tiny_model, tokenizer, held)
    for k in EVAL_KEYS:
        if k != "eval_rewards/accuracies" or expected["min_margin"] > 1e-3:  # no near-tie to flip
            assert ma[-1][k] == pytest.approx(expected[k], abs=1e-4), k
    wb = read_offline_run(a.output_dir)  # W&B got the same held-out values at the same steps
    assert [(h["step"], h["eval_rewards/margins"]) for h in wb.history if "eval_rewards/margins" in h] == \
        [(r["step"], pytest.approx(r["eval_rewards/margins"])) for r in evals_a]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(b.model_dir).config.use_cache is True


@pytest.mark.ray
@pytest.mark.slow
def test_realistic_gpt4_preferences_train_a_few_steps(ray_cluster, tiny_model, tmp_path):
    from zephyr_ray.train.dpo import run_dpo

    path = shared_file("alpaca_eval", "gpt4_preferences.jsonl")
    # Online reference: every row is validated and tokenized, but 3 steps do not need a pass over all 802 pairs.
    result = run_dpo(_cfg(tmp_path, tiny_model, f"data.path={path}", "train.max_steps=3", "data.max_length=512",
                          "dpo.max_prompt_length=256", "data.on_bad_row=skip", "dpo.ref.mode=online"))
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["rows"] == 802 and report["used"] + sum(report["skipped"].values()) == 802
    metrics = read_metrics(result.output_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
