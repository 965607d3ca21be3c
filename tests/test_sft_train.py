"""dSFT on 2 Ray Train workers with real DeepSpeed (ZeRO-2 and ZeRO-3), on the session's Ray cluster."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from zephyr_ray.config import SFTRecipe, load_config
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.samples import sample_dialogues
from zephyr_ray.data.tokenize import IGNORE_INDEX, tokenize_messages
from zephyr_ray.tracking import read_metrics

from .conftest import ROOT, shared_file

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(tmp: Path, model: str, *overrides: str) -> SFTRecipe:
    return load_config(ROOT / "configs/tiny/sft.yaml",
                       [f"model.path={model}", f"run.output_dir={tmp}", "wandb.enabled=false", *overrides])


def _run(cfg):
    from zephyr_ray.train.sft import run_sft

    return run_sft(cfg)


def _generate(model_dir: Path, messages, max_new_tokens=40) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _unigram_entropy(tokenizer, dialogues) -> float:
    counts = Counter(t for d in dialogues for t in tokenize_messages(tokenizer, d["messages"])["labels"] if t != IGNORE_INDEX)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_zero2_overfits_eight_dialogues_and_exports(ray_cluster, tiny_model, tokenizer, tmp_path):
    dialogues = sample_dialogues(8, seed=11)
    data = write_jsonl(dialogues * 40, tmp_path / "eight.jsonl")
    cfg = _cfg(tmp_path / "run", tiny_model, f"data.path={data}", "data.packing=false", "data.group_by_length=false",
               "train.epochs=1",
               "train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "train.lr=3e-3",
               "train.lr_scheduler=constant", "train.warmup_ratio=0.05", "deepspeed.config=configs/deepspeed/zero2.json")
    result = _run(cfg)
    metrics = read_metrics(result.output_dir)
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples"} <= set(metrics[0])
    assert metrics[-1]["samples"] == 320
    # Random init starts near ln(vocab); memorising 8 dialogues must beat any context-free model, whose
    # best loss is the unigram entropy of the answer tokens: require a quarter of that.
    assert metrics[0]["loss"] == pytest.approx(math.log(len(tokenizer)), abs=0.5)
    threshold = 0.25 * _unigram_entropy(tokenizer, dialogues)
    assert metrics[-1]["loss"] < threshold, (metrics[-1]["loss"], threshold)
    # The exported model loads with plain transformers and says what it was taught.
    first = dialogues[0]["messages"]
    prompt = [m for m in first if m["role"] != "assistant"][:2] if first[0]["role"] == "system" else first[:1]
    answer = next(m["content"] for m in first if m["role"] == "assistant")
    assert _generate(result.model_dir, prompt).strip().startswith(answer[:20])


def _trace(run: Path) -> dict[int, list[str]]:
    """Sample ids per step over all ranks (a step's last record wins: earlier ones were rolled back)."""
    steps: dict[int, list[str]] = {}
    for f in sorted((run / "samples").glob("rank*.jsonl")):
        per_rank = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            per_rank[rec["step"]] = rec["ids"]
        for step, ids in per_rank.items():
            steps.setdefault(step, []).extend(ids)
    return steps


def test_realistic_teacher_set_trains_a_few_steps(ray_cluster, tiny_model, tmp_path):
    path = shared_file("alpaca_eval", "sft_gpt4_teacher.jsonl")
    cfg = _cfg(tmp_path / "run", tiny_model, f"data.path={path}", "train.max_steps=3", "data.max_length=1024",
               "train.epochs=1", "deepspeed.config=configs/deepspeed/zero2.json", "train.precision=bf16")
    result = _run(cfg)
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["rows"] == 805 and report["used"] + sum(report["skipped"].values()) == 805
    metrics = read_metrics(result.output_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics)


def _held_out_nll(model_dir: Path, dialogues, max_length: int) -> float:
    """Token-weighted next-token NLL of ``model_dir`` over the assistant tokens of ``dialogues``, one at a time."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from zephyr_ray.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for d in dialogues:
        ids = tokenize_messages(tok, d["messages"])
        inputs, labels = torch.tensor([ids["input_ids"][:max_length]]), torch.tensor(ids["labels"][:max_length])
        with torch.no_grad():
            logits = model(input_ids=inputs, use_cache=False).logits[0, :-1]
        targets = labels[1:]
        total += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def test_held_out_loss_at_every_eval_step_survives_a_restart_and_matches_the_model(ray_cluster, tiny_model, tmp_path):
    from zephyr_ray.data.split import held_out, prompt_text

    dialogues = sample_dialogues(60, seed=3)
    data = write_jsonl(dialogues, tmp_path / "d.jsonl")
    cfg = _cfg(tmp_path / "run", tiny_model, f"data.path={data}", "data.eval_fraction=0.25", "train.eval_every=2",
               "train.max_steps=5", "train.checkpoint_every=2", "train.inject_failure_at_step=3",
               "run.max_failures=1")
    result = _run(cfg)
    metrics = read_metrics(result.output_dir)
    # One row per step after the restart (from step 2); the held-out loss every 2 steps and at the last.
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4, 5]
    assert all("eval_runtime" in m for m in metrics if "eval_loss" in m)
    assert json.loads((result.output_dir / "restarts.jsonl").read_text())["step"] == 2
    held = [d for d in dialogues if held_out(prompt_text(d), cfg.data.seed, 0.25)]
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["eval"]["rows"] == report["eval"]["used"] == len(held) > 0
    assert report["rows"] == 60 - len(held) and "data.eval_fraction=0.25" in report["eval"]["source"]
    # The last evaluation ran on the exported weights: token-weighted over every held-out row, both ranks.
    expected = _held_out_nll(result.model_dir, held, cfg.data.max_length)
    assert metrics[-1]["eval_loss"] == pytest.approx(expected, abs=1e-4)
    assert metrics[1]["eval_loss"] > metrics[-1]["eval_loss"]
