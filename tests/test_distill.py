"""Logit-level distillation (sft.distill): the loss by hand, the config and tokenizer checks, the teacher's top-k
columns, a distilled student against one trained on the teacher's text, and one run on the session's Ray cluster."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from zephyr_ray.config import ConfigError, DataConfig, DistillConfig, DPORecipe, SFTRecipe, load_config
from zephyr_ray.data.packing import pack_sequences
from zephyr_ray.data.samples import sample_dialogues
from zephyr_ray.data.sft import sft_examples, sft_schema
from zephyr_ray.data.tokenize import IGNORE_INDEX
from zephyr_ray.tracking import read_metrics
from zephyr_ray.train.distill import TeacherTopK, teacher_prepare
from zephyr_ray.train.losses import (
    distillation_loss,
    divergence,
    label_logits,
    shifted_labels,
    teacher_topk,
    topk_buckets,
)
from zephyr_ray.train.objectives import TEACHER_IDS, TEACHER_LOGPS, DistillObjective, SFTObjective

from .conftest import ROOT

# ---------------------------------------------------------------------------------------------------------------
# The loss on two positions of a 4-token vocabulary, against divergences written out by hand

STUDENT_PROBS = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
TARGETS = [0, 3]
# The teacher's top-k (ids, probabilities) per position, and both sides' buckets (those k tokens, then the rest).
CASES = {
    2: ([[1, 2], [0, 3]], [[0.6, 0.2], [0.7, 0.1]],
        [[0.6, 0.2, 0.2], [0.7, 0.1, 0.2]], [[0.3, 0.2, 0.5], [0.25, 0.25, 0.5]]),
    3: ([[1, 2, 3], [0, 1, 2]], [[0.6, 0.2, 0.15], [0.7, 0.1, 0.1]],
        [[0.6, 0.2, 0.15, 0.05], [0.7, 0.1, 0.1, 0.1]], [[0.3, 0.2, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25]]),
}


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


HAND = {"forward_kl": lambda t, s, beta: _kl(t, s), "reverse_kl": lambda t, s, beta: _kl(s, t), "jsd": _jsd}


def _case(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, probs, _, _ = CASES[k]
    return torch.tensor(STUDENT_PROBS).log(), torch.tensor(ids), torch.tensor(probs).log()


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [2, 3])
def test_divergences_equal_hand_computed_values(loss, k):
    logits, ids, logps = _case(k)
    teacher, student = topk_buckets(logits, ids, logps, temperature=1.0)
    _, _, t_buckets, s_buckets = CASES[k]
    assert teacher.exp().numpy() == pytest.approx(np.array(t_buckets), abs=1e-6)
    assert student.exp().numpy() == pytest.approx(np.array(s_buckets), abs=1e-6)
    for beta in (0.5, 0.2):
        expected = [HAND[loss](t, s, beta) for t, s in zip(t_buckets, s_buckets)]
        assert divergence(teacher, student, loss, beta).tolist() == pytest.approx(expected, abs=1e-6)


def test_alpha_mix_temperature_scaling_and_metrics():
    logits, ids, logps = _case(2)
    # T = 2 softens the student to sqrt(p) renormalised; the teacher's log-probs come already at T.
    soft = np.sqrt(STUDENT_PROBS)
    soft /= soft.sum(-1, keepdims=True)
    _, _, t_buckets, _ = CASES[2]
    s_buckets = [[row[i] for i in pos] + [1 - sum(row[i] for i in pos)] for row, pos in zip(soft, CASES[2][0])]
    div = sum(_kl(t, s) for t, s in zip(t_buckets, s_buckets))
    nll = -math.log(0.4) - math.log(0.25)
    total, extras = distillation_loss(logits, torch.tensor(TARGETS), ids, logps, loss="forward_kl", beta=0.5,
                                      temperature=2.0, alpha=0.3)
    assert total.item() == pytest.approx(0.7 * nll + 0.3 * 4 * div, abs=1e-5)  # T² = 4
    assert extras["nll"].item() == pytest.approx(nll, abs=1e-6)
    assert extras["distill/divergence"].item() == pytest.approx(div, abs=1e-6) == extras["distill/kl"].item()
    assert distillation_loss(logits, torch.tensor(TARGETS), ids, logps, loss="jsd", beta=0.5, temperature=1.0,
                             alpha=0.0)[0].item() == pytest.approx(nll, abs=1e-6)


def test_student_equal_to_teacher_scores_zero_and_jsd_limits():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    logps, ids = teacher_topk(logits, 5, temperature=1.5)
    teacher, same = topk_buckets(logits, ids, logps, temperature=1.5)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(teacher, same, loss).abs().max().item() < 1e-6
    _, student = topk_buckets(torch.randn(6, 50), ids, logps, temperature=1.5)
    forward, reverse = divergence(teacher, student, "forward_kl"), divergence(teacher, student, "reverse_kl")
    assert (forward > 0).all() and (reverse > 0).all()
    # GKD/TRL: beta 0 and 1 are forward and reverse KL, the limits of JSD(beta)/beta and JSD(beta)/(1-beta).
    assert torch.equal(divergence(teacher, student, "jsd", 0.0), forward)
    assert torch.equal(divergence(teacher, student, "jsd", 1.0), reverse)
    eps = 1e-4
    assert (divergence(teacher, student, "jsd", eps) / eps).tolist() == pytest.approx(forward.tolist(), rel=1e-2)
    assert (divergence(teacher, student, "jsd", 1 - eps) / eps).tolist() == pytest.approx(reverse.tolist(), rel=1e-2)
    # With k covering the vocabulary the bucketed KL is the full one.
    full_logps, full_ids = teacher_topk(logits, 50, temperature=1.0)
    t, s = topk_buckets(logits.flip(0), full_ids, full_logps, temperature=1.0)
    exact = F.kl_div(logits.flip(0).log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert divergence(t, s, "forward_kl").tolist() == pytest.approx(exact.tolist(), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Config and tokenizer checks


def test_config_checks_name_the_key_and_ddpo_has_no_distill_section():
    sft = ROOT / "configs/tiny/sft.yaml"
    with pytest.raises(ConfigError, match=r"distill.teacher=None: required with distill.enabled"):
        load_config(sft, ["distill.enabled=true"])
    with pytest.raises(ConfigError, match=r"distill.alpha=1.5: must be within \[0, 1\]"):
        load_config(sft, ["distill.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"distill.temperature=0.0: must be > 0"):
        load_config(sft, ["distill.temperature=0"])
    with pytest.raises(ConfigError, match=r"distill.loss='kl' is not valid"):
        load_config(sft, ["distill.loss=kl"])
    with pytest.raises(ConfigError, match="unknown key 'distill'"):
        load_config(ROOT / "configs/tiny/dpo.yaml", ["distill.enabled=true"], DPORecipe)
    shipped = load_config(ROOT / "configs/tiny/sft_distill.yaml")
    assert shipped.distill.enabled and shipped.distill.num_actors == 1  # the pool settings dDPO's reference has too


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory) -> str:
    """A tiny teacher with something to teach: the seed-1 tiny model after 40 steps on the sample dialogues."""
    from zephyr_ray.models import build_tiny, load_model, load_tokenizer

    path = build_tiny(tmp_path_factory.mktemp("teacher") / "model", seed=1)
    tok = load_tokenizer(path)
    rows, _ = sft_examples(sample_dialogues(128, seed=3), tok, DataConfig(max_length=256))
    model = load_model(path)
    _train(model, SFTObjective(tok.pad_token_id), pa.Table.from_pylist(rows, schema=sft_schema()), steps=40)
    model.save_pretrained(path)
    return path


def _mismatched(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def _add_token(path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(path)


def _widen_output(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))


def test_teacher_without_the_students_tokenizer_is_refused_before_any_work(tiny_model, tokenizer, tmp_path):
    teacher_model = tiny_model  # any model of the students' tokenizer: the checks read tokenizer and config only

    def cfg(teacher: str, *more: str) -> SFTRecipe:
        return load_config(ROOT / "configs/tiny/sft_distill.yaml",
                           [f"model.path={tiny_model}", f"distill.teacher={teacher}", f"run.output_dir={tmp_path}", *more])

    assert callable(teacher_prepare(cfg(teacher_model)))  # the tiny models share one tokenizer
    n = len(tokenizer.get_vocab())
    for name, edit, what in (("vocab", _add_token, rf"vocabulary: {n + 1} vs {n} tokens, 1 only in the teacher"),
                             ("wide", _widen_output, rf"output size: the teacher's {n + 64} exceeds the student's {n}")):
        teacher = _mismatched(teacher_model, tmp_path / name, edit)
        with pytest.raises(ConfigError, match=what) as err:
            teacher_prepare(cfg(teacher))
        assert f"distill.teacher {teacher} and the student {tiny_model}" in str(err.value)
    with pytest.raises(ConfigError, match=rf"distill.top_k={n + 1} exceeds the vocabulary of the teacher"):
        teacher_prepare(cfg(teacher_model, f"distill.top_k={n + 1}"))


# ---------------------------------------------------------------------------------------------------------------
# The teacher's columns and the training they feed


def _train(model, objective, table: pa.Table, steps: int, lr: float = 3e-3, micro_batch: int = 4) -> None:
    """A plain torch loop over ``table``'s rows (cycled) with the loop's normalisation: loss / units."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        start = step * micro_batch % table.num_rows
        batch = objective.collate(table.slice(start, micro_batch).to_pydict())
        loss, _ = objective.loss(model, batch)
        (loss / objective.units(batch)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _with_teacher(table: pa.Table, teacher: str, pad_id: int, k: int, temperature: float = 1.0) -> pa.Table:
    return TeacherTopK(teacher, pad_id, k, temperature, "float32", "sdpa")(table)


def test_teacher_columns_equal_a_direct_topk_token_by_token_on_packed_rows(teacher_model, tokenizer):
    from zephyr_ray.models import load_model

    rows, _ = sft_examples(sample_dialogues(24, seed=7), tokenizer, DataConfig(max_length=256))
    assert any(0 in r["position_ids"][1:] for r in rows)  # several dialogues share a row
    k, temperature = 5, 2.0
    out = _with_teacher(pa.Table.from_pylist(rows, schema=sft_schema()), teacher_model, tokenizer.pad_token_id, k,
                        temperature).to_pylist()
    model = load_model(teacher_model).eval()
    for row in out:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        ids, logps = [], []
        for a, b in zip(starts, starts[1:]):  # each dialogue alone, unpacked
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
            kept = [t for t in range(b - a - 1) if row["labels"][a + t + 1] != IGNORE_INDEX]
            top = torch.log_softmax(logits[kept] / temperature, -1).topk(k)
            ids += top.indices.flatten().tolist()
            logps += top.values.flatten().tolist()
        assert row[TEACHER_IDS] == ids
        assert row[TEACHER_LOGPS] == pytest.approx(logps, abs=1e-5)


def _teacher_text(model, tok, dialogues: list[dict]) -> list[dict]:
    """Each dialogue's opening turns with the teacher's sampled answer as the trained assistant turn."""
    prompts = [tok.apply_chat_template([m for m in d["messages"] if m["role"] != "assistant"][:2],
                                       add_generation_prompt=True, return_dict=True)["input_ids"] for d in dialogues]
    enc = tok.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=48, pad_token_id=tok.pad_token_id)
    seqs = []
    for i, (prompt, gen) in enumerate(zip(prompts, out[:, enc["input_ids"].shape[1]:].tolist())):
        answer = gen[: gen.index(tok.eos_token_id) + 1] if tok.eos_token_id in gen else gen
        seqs.append({"input_ids": list(prompt) + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                     "sample_id": str(i)})
    return seqs


def _heldout_kl(teacher, student, table: pa.Table, pad_id: int) -> float:
    """KL(teacher || student) over the full vocabulary per trained token of ``table`` (temperature 1)."""
    batch = SFTObjective(pad_id).collate(table.to_pydict())
    with torch.no_grad():
        t, s = (label_logits(m, batch)[0].log_softmax(-1) for m in (teacher, student))
    return F.kl_div(s, t, log_target=True, reduction="sum").item() / len(t)


@pytest.mark.slow  # trains a teacher and two students in process (~1-3 min on 2 cores)
def test_distilled_student_gets_closer_to_the_teacher_than_one_trained_on_its_text(teacher_model, tokenizer):
    """The issue's test: same student init, same teacher-written rows, steps and lr; only the objective differs."""
    from zephyr_ray.models import build_tiny, load_model

    teacher = load_model(teacher_model).eval()
    seqs = _teacher_text(teacher, tokenizer, sample_dialogues(96, seed=4))
    train, held = (pa.Table.from_pylist(pack_sequences(s, 256), schema=sft_schema()) for s in (seqs[:64], seqs[64:]))
    pad, cfg = tokenizer.pad_token_id, DistillConfig(enabled=True)
    train = _with_teacher(train, teacher_model, pad, cfg.top_k)
    student_path = build_tiny(Path(teacher_model).parent / "student", seed=2)
    kl = {"init": _heldout_kl(teacher, load_model(student_path), held, pad)}
    for name, objective in (("distilled", DistillObjective(pad, cfg)), ("teacher text", SFTObjective(pad))):
        student = load_model(student_path)
        _train(student, objective, train, steps=40)
        kl[name] = _heldout_kl(teacher, student, held, pad)
    assert kl["distilled"] < kl["teacher text"] < kl["init"], kl


# ---------------------------------------------------------------------------------------------------------------
# The stage on Ray: teacher actors, then Ray Train workers


@pytest.mark.ray
def test_run_sft_distills_through_teacher_actors(ray_cluster, tiny_model, teacher_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from zephyr_ray.train.sft import run_sft

    cfg = load_config(ROOT / "configs/tiny/sft_distill.yaml",
                      [f"model.path={tiny_model}", f"distill.teacher={teacher_model}", f"run.output_dir={tmp_path}",
                       "wandb.enabled=false", "data.limit=32", "train.max_steps=3", "distill.top_k=8",
                       "data.eval_fraction=0.25"])
    result = run_sft(cfg)
    stored = pq.read_table(tmp_path / "teacher_topk")
    assert json.loads((tmp_path / "teacher_topk" / "_SUCCESS").read_text())["fingerprint"]["teacher"] == teacher_model
    for row in stored.to_pylist():  # k columns per trained position of the row the workers train on
        trained = int((shifted_labels(torch.tensor([row["labels"]]), torch.tensor([row["position_ids"]])) != -100).sum())
        assert len(row[TEACHER_IDS]) == len(row[TEACHER_LOGPS]) == 8 * trained
    metrics = read_metrics(result.output_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "nll", "distill/divergence", "distill/kl"))
        assert m["loss"] == pytest.approx(0.5 * m["nll"] + 0.5 * m["distill/divergence"], rel=1e-5)  # alpha .5, T 1
        # Held out (every step of 3): the same objective on rows the teacher scored in their own pass.
        assert m["eval_loss"] == pytest.approx(0.5 * m["eval_nll"] + 0.5 * m["eval_distill/divergence"], rel=1e-5)
    assert json.loads((tmp_path / "teacher_topk_eval" / "_SUCCESS").read_text())["fingerprint"]["split"] == "eval"
    assert AutoModelForCausalLM.from_pretrained(result.model_dir).config.vocab_size == len(tokenizer)
