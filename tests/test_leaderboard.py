"""Leaderboard-style multiple-choice evaluation: scoring math, prompts, token boundary, batched log-likelihoods,
and the stage end to end on the session Ray cluster."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from zephyr_ray.eval import leaderboard as lb

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "leaderboard"


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def test_acc_and_acc_norm_by_hand_and_they_disagree():
    # Sums: -4 (2 chars) and -6 (6 chars): acc picks choice 0; per character -2 vs -1, acc_norm picks choice 1.
    doc = lb.Doc("q", ("ab", "abcdef"), gold=1)
    m = lb.doc_metrics(doc, "qa", [-4.0, -6.0])
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    assert lb.doc_metrics(lb.Doc("q", ("ab", "abcdef"), gold=0), "qa", [-4.0, -6.0]) == {"acc": 1.0, "acc_norm": 0.0}
    # Ties go to the first choice (numpy's argmax).
    assert lb.acc([-1.0, -1.0], 0) == 1.0


def test_acc_norm_divides_by_characters_of_the_choice_without_the_space():
    # lm-eval: completion_len = len(choice); the target delimiter is not counted.
    assert lb.acc_norm([-3.0, -3.3], ["abc", "abcd"], 1) == 1.0  # -1.0 vs -0.825
    assert lb.acc_norm([-3.0, -4.4], ["abc", "abcd"], 0) == 1.0  # -1.0 vs -1.1


def test_mc2_by_hand_and_as_lm_eval_computes_it():
    import numpy as np

    lls = [math.log(0.2), math.log(0.3), math.log(0.1)]
    assert lb.mc2(lls, [1, 0, 1]) == pytest.approx(0.3 / 0.6)
    # lm-eval's process_results_mc2 (true answers first, split at the first 0).
    lls2, labels = [-1.5, -2.0, -0.5, -3.0], [1, 1, 0, 0]
    split = labels.index(0)
    p_true, p_false = np.exp(np.array(lls2[:split])), np.exp(np.array(lls2[split:]))
    expected = float(sum(p_true / (sum(p_true) + sum(p_false))))
    assert lb.mc2(lls2, labels) == pytest.approx(expected, abs=1e-12)
    # Very negative sums: exp underflows to 0/0 in the naive form, log-sum-exp keeps the ratio.
    assert lb.mc2([-2000.0, -2000.0 + math.log(3)], [1, 0]) == pytest.approx(0.25)


def test_aggregate_mean_and_sample_stderr():
    per_doc = [{"acc": 1.0, "acc_norm": 0.0}, {"acc": 0.0, "acc_norm": 0.0}, {"acc": 1.0, "acc_norm": 1.0},
               {"acc": 1.0, "acc_norm": 1.0}]
    r = lb.aggregate(per_doc, "acc_norm", 25)
    assert r["acc"] == 0.75 and r["acc_stderr"] == pytest.approx(0.25)  # sd (n-1) = 0.5, / sqrt(4)
    assert r["acc_norm"] == 0.5 and r["acc_norm_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert (r["value"], r["stderr"], r["n"], r["num_fewshot"], r["metric"]) == (0.5, r["acc_norm_stderr"], 4, 25,
                                                                                "acc_norm")
    assert "mc2" not in r


# ---------------------------------------------------------------------------------------------------
# Rows and prompts
# ---------------------------------------------------------------------------------------------------

def test_parse_doc_validates_and_names_the_row():
    assert lb.parse_doc({"question": "q", "choices": ["a", "b"], "labels": [0, 1]}, "mc2").gold == 1
    with pytest.raises(ValueError, match="f.jsonl line 3: `gold`"):
        lb.parse_doc({"question": "q", "choices": ["a", "b"], "gold": 2}, "acc", "f.jsonl line 3")
    with pytest.raises(ValueError, match="mc2 needs `labels`"):
        lb.parse_doc({"question": "q", "choices": ["a", "b"], "gold": 0}, "mc2")
    with pytest.raises(ValueError, match="`choices`"):
        lb.parse_doc({"context": "c", "choices": ["a"], "gold": 0}, "acc")


def test_fewshot_prompt_format_exact_strings():
    ex1 = lb.Doc("Is ice cold?", ("yes", "no"), gold=0)
    ex2 = lb.Doc("Is fire cold?", ("yes", "no"), gold=1)
    doc = lb.Doc("Is snow white?", ("yes", "no"), gold=0)
    assert lb.fewshot_context(doc, "qa", [ex1, ex2]) == (
        "Question: Is ice cold?\nAnswer: yes\n\nQuestion: Is fire cold?\nAnswer: no\n\nQuestion: Is snow white?\nAnswer:")
    assert lb.requests_for(doc, "qa", "CTX") == [("CTX", " yes"), ("CTX", " no")]
    m1 = lb.Doc("2+2?", ("4", "5"), gold=0, subject="elementary_mathematics")
    m = lb.Doc("3+3?", ("5", "6"), gold=1, subject="elementary_mathematics")
    desc = "The following are multiple choice questions (with answers) about {subject}.\n\n"
    assert lb.fewshot_context(m, "mmlu", [m1], desc) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "2+2?\nA. 4\nB. 5\nAnswer: A\n\n3+3?\nA. 5\nB. 6\nAnswer:")
    assert lb.requests_for(m, "mmlu", "C") == [("C", " A"), ("C", " B")]
    h = lb.Doc("Cooking: He cracks an egg and", ("fries it.", "eats the shell."), gold=0)
    assert lb.fewshot_context(h, "continuation", []) == "Cooking: He cracks an egg and"
    t = lb.Doc("Are bats blind?", ("No.", "Yes."), labels=(1, 0), gold=0)
    assert lb.fewshot_context(t, "truthfulqa", []) == "Q: Are bats blind?\nA:"


def test_fewshot_sampling_is_seeded_per_row_and_never_the_row_itself():
    pool = [lb.Doc(f"q{i}", ("a", "b"), gold=0) for i in range(6)]
    a = lb.sample_fewshot(pool, 3, 1234, "arc", 0)
    assert a == lb.sample_fewshot(pool, 3, 1234, "arc", 0) and len(set(a)) == 3
    assert any(lb.sample_fewshot(pool, 3, 1234, "arc", i) != a for i in range(1, 6))
    assert all(pool[2] not in lb.sample_fewshot(pool, 5, s, "arc", 0, exclude=pool[2]) for s in range(5))
    with pytest.raises(ValueError, match="pool has 5"):
        lb.sample_fewshot(pool, 6, 0, "arc", 0, exclude=pool[0])


# ---------------------------------------------------------------------------------------------------
# Token boundary
# ---------------------------------------------------------------------------------------------------

def _lm_eval_encode_pair(tok, context: str, continuation: str):
    """lm-evaluation-harness 0.4 ``TemplateLM._encode_pair`` with HFLM's ``tok_encode`` (no special tokens)."""
    def tok_encode(s):
        return tok.encode(s, add_special_tokens=False)

    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tok_encode(context + continuation)
    context_enc = tok_encode(context)
    context_enc_len = len(context_enc)
    continuation_enc = whole_enc[context_enc_len:]
    return context_enc, continuation_enc


PAIRS = [("Question: Is snow white?\nAnswer:", " yes"), ("Question: Is snow white?\nAnswer: ", "yes"),
         ("The cat sat on the", " mat."), ("2+2?\nA. 4\nB. 5\nAnswer:", " A"), ("x  \n", " tail"),
         ("He cracks an egg and", " fries it in a pan.")]


@pytest.mark.parametrize("context,continuation", PAIRS)
def test_continuation_split_equals_lm_eval(tokenizer, context, continuation):
    ctx, cont = lb.encode_pair(lb.hf_encoder(tokenizer), context, continuation, lb.prefix_token(tokenizer))
    assert (ctx, cont) == _lm_eval_encode_pair(tokenizer, context, continuation)
    assert cont  # something is scored
    # The whole string's tokens split exactly at the boundary (when the context's tokens are a prefix of them).
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    if whole[:len(ctx)] == ctx:
        assert ctx + cont == whole


def test_empty_context_gets_the_prefix_token(tokenizer):
    ctx, cont = lb.encode_pair(lb.hf_encoder(tokenizer), "", "hello", 7)
    assert ctx == [7] and cont == tokenizer.encode("hello", add_special_tokens=False)


# ---------------------------------------------------------------------------------------------------
# Log-likelihoods
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_model):
    import torch

    from zephyr_ray.models import load_model

    torch.manual_seed(0)
    return load_model(tiny_model).eval()


def _requests(tokenizer):
    enc = lb.hf_encoder(tokenizer)
    return [lb.encode_pair(enc, c, k, lb.prefix_token(tokenizer)) for c, k in PAIRS] + \
        [lb.encode_pair(enc, "", "A lone continuation.", lb.prefix_token(tokenizer))]


def test_loglikelihood_of_one_request_equals_a_manual_forward(model, tokenizer):
    import torch

    from zephyr_ray.eval.loglikelihood import loglikelihood

    for ctx, cont in _requests(tokenizer)[:3]:
        (ll, greedy), = loglikelihood(model, tokenizer, [(ctx, cont)], batch_size=1)
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0].float()
        logp = logits.log_softmax(-1)
        manual = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(manual, abs=1e-5)
        assert greedy == all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))


def test_loglikelihood_batched_equals_unbatched(model, tokenizer):
    from zephyr_ray.eval.loglikelihood import loglikelihood

    reqs = _requests(tokenizer)
    alone = loglikelihood(model, tokenizer, reqs, batch_size=1)
    batched = loglikelihood(model, tokenizer, reqs, batch_size=3)
    assert [g for _, g in batched] == [g for _, g in alone]
    for (a, _), (b, _) in zip(alone, batched):
        assert b == pytest.approx(a, abs=1e-5)
    assert all(ll < 0 for ll, _ in alone)


def test_loglikelihood_cuts_long_inputs_from_the_left(model, tokenizer):
    from zephyr_ray.eval.loglikelihood import loglikelihood

    ctx, cont = _requests(tokenizer)[0]
    (full, _), = loglikelihood(model, tokenizer, [(ctx, cont)])
    (cut, _), = loglikelihood(model, tokenizer, [(ctx, cont)], max_length=len(cont) + 2)
    (ref, _), = loglikelihood(model, tokenizer, [(ctx[-3:], cont)])
    assert cut == pytest.approx(ref, abs=1e-5) and math.isfinite(full)


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def _cfg(*overrides):
    from zephyr_ray.config import LeaderboardRecipe, load_config

    return load_config(ROOT / "configs/tiny/leaderboard.yaml", list(overrides), LeaderboardRecipe)


def test_stage_is_registered_and_recipe_checks():
    from zephyr_ray.cli import STAGES
    from zephyr_ray.config import RECIPES, ConfigError, LeaderboardRecipe
    from zephyr_ray.eval.leaderboard_run import check_recipe

    assert STAGES["leaderboard"][0] is LeaderboardRecipe and RECIPES["leaderboard"] is LeaderboardRecipe
    assert (ROOT / "jobs" / "leaderboard.py").is_file()
    check_recipe(_cfg())
    with pytest.raises(ConfigError, match=r"^models\[0\].backend='vllm': backend native scores with transformers"):
        _cfg("models.0.backend=vllm")
    with pytest.raises(ConfigError, match=r"^models: names must be distinct .*\['tiny-a', 'tiny-a'\]"):
        _cfg("models.1.name=tiny-a")
    with pytest.raises(ConfigError, match=r"^models\[0\].backend='openai': lm_eval runs a local HF model"):
        _cfg("backend=lm_eval", "models.0.backend=openai", "models.0.path=gpt-4")
    with pytest.raises(ConfigError, match=r"^tasks: names must be distinct"):
        _cfg("tasks.1.name=arc")
    with pytest.raises(ConfigError, match=r"^tasks\[0\].num_fewshot=-1: must be >= 0"):
        _cfg("tasks.0.num_fewshot=-1")
    with pytest.raises(ConfigError, match=r"^tasks\[0\].fewshot_pool=1: is smaller than num_fewshot \(3\)"):
        _cfg("tasks.0.fewshot_pool=1")
    if importlib.util.find_spec("lm_eval") is None:
        with pytest.raises(RuntimeError, match=r"zephyr-ray\[leaderboard\]"):
            check_recipe(_cfg("backend=lm_eval"))


def test_load_task_holds_out_the_fewshot_rows():
    from zephyr_ray.eval.leaderboard_run import load_task

    cfg = _cfg()
    arc = load_task(cfg.tasks[0], cfg.seed)
    rows = [json.loads(line) for line in (SAMPLE / "arc.jsonl").read_text().splitlines()]
    assert len(arc.docs) == len(rows) - 3 and arc.docs[0].question == rows[3]["question"]
    assert arc.contexts[0].count("\nAnswer:") == 4 and arc.contexts[0].endswith(
        f"Question: {rows[3]['question']}\nAnswer:")
    with pytest.raises(ValueError, match="pool has 12"):
        load_task(_cfg("tasks.0.fewshot_path=" + str(SAMPLE / "arc.jsonl"), "tasks.0.num_fewshot=13").tasks[0], 0)


@pytest.mark.ray
def test_leaderboard_stage_end_to_end(ray_cluster, tmp_path):
    from zephyr_ray.eval.leaderboard_run import run_leaderboard

    out = tmp_path / "lb"
    res = run_leaderboard(_cfg(f"run.output_dir={out}", "wandb.enabled=false"))
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(res.results))
    cfg = _cfg()
    expected_n = {t.name: sum(1 for line in (ROOT / t.path).read_text().splitlines() if line.strip()) - t.num_fewshot
                  for t in cfg.tasks}
    assert set(results["models"]) == {"tiny-a", "tiny-b"}
    for name, m in results["models"].items():
        assert set(m["tasks"]) == set(expected_n)
        for task, r in m["tasks"].items():
            assert r["n"] == expected_n[task] == results["tasks"][task]["rows"]
            assert r["num_fewshot"] == next(t.num_fewshot for t in cfg.tasks if t.name == task)
            keys = ["acc", "acc_norm", *(["mc2"] if task == "truthfulqa_mc2" else [])]
            for k in keys:
                assert 0.0 <= r[k] <= 1.0 and r[f"{k}_stderr"] is not None and r[f"{k}_stderr"] >= 0
            assert r["value"] == r[r["metric"]]
        assert 0.0 <= m["average"] <= 1.0
        details = (out / "details" / name / "arc.jsonl").read_text().splitlines()
        assert len(details) == expected_n["arc"]
        assert all(len(json.loads(d)["lls"]) == 4 for d in details)
    # The two random models differ.
    a, b = (results["models"][n]["tasks"]["truthfulqa_mc2"]["mc2"] for n in ("tiny-a", "tiny-b"))
    assert a != b
    report = (out / "report.md").read_text()
    assert "| tiny-a |" in report and "truthfulqa_mc2 (mc2, 0-shot)" in report


@pytest.mark.ray
def test_lm_eval_backend_scores_the_local_task_files_like_native(ray_cluster, tmp_path):
    """lm-evaluation-harness, given this project's task files, computes the same per-row log-likelihoods (its own
    request building, token split and batching) and so the same metrics as the native scorer."""
    pytest.importorskip("lm_eval")
    from zephyr_ray.eval.leaderboard_run import run_leaderboard

    results = {}
    for backend in ("native", "lm_eval"):
        cfg = _cfg(f"run.output_dir={tmp_path / backend}", f"backend={backend}", "wandb.enabled=false")
        # Few-shot draws differ (the harness samples its own); descriptions do not.
        tasks = [replace(t, num_fewshot=0, fewshot_pool=2, lm_eval_task=None) for t in cfg.tasks
                 if t.name in ("mmlu", "truthfulqa_mc2")]
        cfg = replace(cfg, models=cfg.models[:1], tasks=tasks)
        results[backend] = run_leaderboard(cfg).results["models"]["tiny-a"]["tasks"]
    for task in ("mmlu", "truthfulqa_mc2"):
        native, harness = (
            [json.loads(line) for line in (tmp_path / b / "details" / "tiny-a" / f"{task}.jsonl").read_text().splitlines()]
            for b in ("native", "lm_eval"))
        assert [d["doc"] for d in harness] == [d["doc"] for d in native] == list(range(10))
        for h, n in zip(harness, native):
            assert h["lls"] == pytest.approx(n["lls"], abs=1e-4)
        for key in ("acc", "acc_norm", "value", "n", *(["mc2"] if task == "truthfulqa_mc2" else [])):
            assert results["lm_eval"][task][key] == pytest.approx(results["native"][task][key], abs=1e-6), key
    spec = json.loads((tmp_path / "lm_eval" / "lm_eval_tasks" / "mmlu" / "test.jsonl").read_text().splitlines()[0])
    assert spec["subject"] and len(spec["choices"]) == 4
