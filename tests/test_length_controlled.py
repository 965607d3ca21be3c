"""The length-controlled (LC) win rate: the length feature and the fit by hand, synthetic judges that reward
length only (LC near 50% while the raw win rate is far from it) or quality only (LC stays at the raw win rate),
the rules that make it unavailable, its place in the eval stage's results, report and pipeline summary, and the
four models of ../shared's AlpacaEval outputs under a length-biased judge. No Ray cluster."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from zephyr_ray.eval.length_controlled import (
    MIN_INSTRUCTIONS,
    Judged,
    LengthControlled,
    fit_logistic,
    length_controlled_win_rates,
    length_feature,
    with_length_controlled,
)

from .conftest import shared_file


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _synthetic(judge, mean_lengths: dict[str, float], n: int = 200, seed: int = 0) -> dict[str, list[Judged]]:
    """``n`` instructions; the reference's answers ~ N(600, 150) characters, each model's ~ N(its mean, 150);
    ``judge(model, model_length, reference_length, rng)`` gives the preference of the model's answer."""
    rng = np.random.default_rng(seed)
    ref = np.clip(rng.normal(600, 150, n), 20, None).round()
    out = {}
    for name, mean in mean_lengths.items():
        lengths = np.clip(rng.normal(mean, 150, n), 20, None).round()
        out[name] = [Judged(f"i{i}", float(judge(name, lengths[i], ref[i], rng)), int(lengths[i]), int(ref[i]))
                     for i in range(n)]
    return out


def _raw(rows: list[Judged]) -> float:
    return sum(j.preference for j in rows) / len(rows)


# ------------------------------------------------------------------------------------------------ by hand


def test_length_feature_is_tanh_of_the_difference_over_its_sample_sd():
    # differences 200, 0, 100: mean 100, sample variance (100^2 + 100^2 + 0) / 2 = 100^2, so sd = 100
    t, sd = length_feature([300, 100, 200], [100, 100, 100])
    assert sd == pytest.approx(100.0)
    assert t == pytest.approx([math.tanh(2.0), 0.0, math.tanh(1.0)])
    assert t == pytest.approx([0.9640276, 0.0, 0.7615942])
    # the sign follows the model: shorter than the reference is negative
    t, sd = length_feature([0, 100], [100, 100])  # differences -100, 0: sd = sqrt(5000)
    assert sd == pytest.approx(math.sqrt(5000)) and t[0] == pytest.approx(math.tanh(-100 / math.sqrt(5000)))
    # a constant difference does not vary: no scale, no feature
    t, sd = length_feature([150, 250], [100, 200])
    assert sd == 0.0 and list(t) == [0.0, 0.0]


def test_fit_logistic_by_hand():
    # intercept only, soft labels averaging 0.75, (almost) no penalty: sigmoid(w) = 0.75, w = log 3
    w = fit_logistic(np.ones((4, 1)), np.array([1.0, 0.0, 1.0, 1.0]), 1e-9)
    assert w[0] == pytest.approx(math.log(3), abs=1e-6)
    # with penalty 2: the optimum solves 4 (sigmoid(w) - 0.75) + 2 w = 0
    w = fit_logistic(np.ones((4, 1)), np.array([1.0, 0.0, 1.0, 1.0]), 2.0)[0]
    assert 4 * (_sigmoid(w) - 0.75) + 2 * w == pytest.approx(0.0, abs=1e-9) and 0 < w < math.log(3)
    # separable data (always wins) stays finite under the penalty
    w = fit_logistic(np.ones((5, 1)), np.ones(5), 0.1)[0]
    assert math.isfinite(w) and 5 * (_sigmoid(w) - 1) + 0.1 * w == pytest.approx(0.0, abs=1e-9)
    # two features: the soft labels come from known coefficients, recovered with a tiny penalty
    x = np.column_stack([np.ones(6), np.linspace(-1, 1, 6)])
    y = np.array([_sigmoid(0.5 - 2.0 * v) for v in x[:, 1]])
    assert fit_logistic(x, y, 1e-9) == pytest.approx([0.5, -2.0], abs=1e-5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fit_logistic(np.ones((2, 1)), np.array([0.5, 1.5]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        fit_logistic(np.ones((2, 1)), np.array([0.5, 1.0]), 0.0)


# ------------------------------------------------------------------------------------------------ synthetic judges


def test_a_judge_that_only_rewards_length_gives_lc_near_half():
    # The judge's preference is a smooth function of the length difference only (as an expected-mode judge gives):
    # at equal lengths it is 1/2 for every model, whatever its usual length.
    judged = _synthetic(lambda m, lm, lr, rng: _sigmoid((lm - lr) / 150), {"long": 900, "short": 450, "same": 600})
    lc = length_controlled_win_rates(judged)
    raw = {name: _raw(rows) for name, rows in judged.items()}
    assert raw["long"] > 0.75 and raw["short"] < 0.35
    for name in judged:
        assert lc[name].lc_available and lc[name].lc_reason is None
        assert abs(lc[name].lc_win_rate - 0.5) < 0.05, (name, raw[name], lc[name])
        assert lc[name].lc_length > 1.0  # the fit saw that longer wins
    # deterministic: the same input gives the same numbers
    again = length_controlled_win_rates(judged)
    assert [r.lc_win_rate for r in again.values()] == [r.lc_win_rate for r in lc.values()]


def test_a_judge_that_mostly_picks_the_longer_answer_moves_lc_toward_half():
    # Binary verdicts: the longer answer wins 90% of the time, the shorter one 10%.
    def judge(model, lm, lr, rng):
        longer = 1.0 if lm > lr else 0.0
        return longer if rng.random() < 0.9 else 1.0 - longer

    judged = _synthetic(judge, {"long": 900, "short": 450, "same": 600})
    lc = length_controlled_win_rates(judged)
    for name in ("long", "short"):
        raw = _raw(judged[name])
        assert abs(raw - 0.5) > 0.2
        assert abs(lc[name].lc_win_rate - 0.5) < abs(raw - 0.5) / 2, (name, raw, lc[name])


def test_a_judge_that_only_rewards_quality_keeps_lc_at_the_raw_win_rate():
    # Quality decides regardless of length; the better model writes shorter answers, the worse one longer.
    quality = {"good": 1.5, "bad": -1.0, "mid": 0.0}
    judged = _synthetic(lambda m, lm, lr, rng: _sigmoid(quality[m]), {"good": 600, "bad": 900, "mid": 450})
    lc = length_controlled_win_rates(judged)
    for name, rows in judged.items():
        assert _raw(rows) == pytest.approx(_sigmoid(quality[name]))
        assert lc[name].lc_win_rate == pytest.approx(_raw(rows), abs=0.03), name
    # always wins / always loses: LC stays at the extremes
    judged = _synthetic(lambda m, lm, lr, rng: {"good": 1.0, "bad": 0.0, "mid": 0.5}[m], {"good": 500, "bad": 900, "mid": 700},
                        n=100)
    lc = length_controlled_win_rates(judged)
    assert lc["good"].lc_win_rate > 0.95 and lc["bad"].lc_win_rate < 0.05
    assert lc["mid"].lc_win_rate == pytest.approx(0.5, abs=1e-9)


def test_quality_and_length_together_lc_recovers_the_quality_part():
    # preference = sigmoid(quality + length difference / 300): "bad" wins half its raw judgments by writing 300
    # characters more than the reference; at equal lengths it would win sigmoid(-1) = 26.9%.
    quality = {"good": 1.5, "bad": -1.0, "mid": 0.0}
    judged = _synthetic(lambda m, lm, lr, rng: _sigmoid(quality[m] + (lm - lr) / 300),
                        {"good": 600, "bad": 900, "mid": 450})
    lc = length_controlled_win_rates(judged)
    assert _raw(judged["bad"]) == pytest.approx(0.5, abs=0.03) and _raw(judged["mid"]) < 0.42
    for name in judged:
        assert lc[name].lc_win_rate == pytest.approx(_sigmoid(quality[name]), abs=0.04), name


# ------------------------------------------------------------------------------------------------ unavailable


def test_one_model_is_not_enough_for_instruction_difficulty():
    judged = _synthetic(lambda m, lm, lr, rng: _sigmoid((lm - lr) / 150), {"only": 900})
    lc = length_controlled_win_rates(judged)["only"]
    assert not lc.lc_available and lc.lc_win_rate is None
    assert "at least 2 models" in lc.lc_reason and "this run has 1" in lc.lc_reason


def test_too_few_instructions_or_a_constant_length_difference_are_unavailable():
    judged = _synthetic(lambda m, lm, lr, rng: _sigmoid((lm - lr) / 150), {"a": 900, "b": 450}, n=40)
    judged["few"] = judged["a"][:MIN_INSTRUCTIONS - 1]
    judged["constant"] = [Judged(j.instruction_id, 0.8, j.reference_length + 50, j.reference_length)
                          for j in judged["a"]]
    lc = length_controlled_win_rates(judged)
    assert lc["few"].lc_reason == f"{MIN_INSTRUCTIONS - 1} judged instructions, the GLM needs at least {MIN_INSTRUCTIONS}"
    assert "same on every instruction" in lc["constant"].lc_reason and lc["constant"].lc_win_rate is None
    assert lc["a"].lc_available and lc["b"].lc_available  # the other two still make a fit
    # with only one usable model left, every model is unavailable, each with its own reason
    lc = length_controlled_win_rates({"a": judged["a"], "few": judged["few"]})
    assert not lc["a"].lc_available and "this run has 1" in lc["a"].lc_reason
    assert "judged instructions" in lc["few"].lc_reason
    assert list(length_controlled_win_rates({})) == []


def test_bad_judgments_are_named():
    rows = [Judged(f"i{i}", 0.5, 100 + i, 100) for i in range(12)]
    with pytest.raises(ValueError, match="model 'm', instruction 'i3': preference 1.5"):
        length_controlled_win_rates({"m": [*rows[:3], Judged("i3", 1.5, 1, 1)]})
    with pytest.raises(ValueError, match="model 'm', instruction 'i3': preference nan"):
        length_controlled_win_rates({"m": [*rows[:3], Judged("i3", float("nan"), 1, 1)]})
    with pytest.raises(ValueError, match="instruction 'i0' judged twice"):
        length_controlled_win_rates({"m": [*rows, rows[0]]})


# ------------------------------------------------------------------------------------------------ the eval stage


def test_results_report_and_summary_show_lc_next_to_the_win_rate(tmp_path):
    from zephyr_ray.config import AlpacaEvalConfig, EvalRecipe
    from zephyr_ray.eval.report import markdown_report
    from zephyr_ray.eval.run import _Alpaca, _alpaca_results
    from zephyr_ray.generation.pool import KEY
    from zephyr_ray.pipeline import summary_table

    # Three models judged against "ref" by an expected-mode judge that only rewards length, plus one model
    # with a single instruction; verdict probabilities (A, B, tie) per order, the model first then second.
    rng = np.random.default_rng(1)
    n = 30
    items = [{"instruction_id": f"q{i}", "instruction": f"question {i}"} for i in range(n)]
    outputs = {"ref": {it["instruction"]: "r" * int(rng.integers(50, 150)) for it in items}}
    for name, (lo, hi) in {"long": (100, 250), "short": (20, 120), "same": (50, 150)}.items():
        outputs[name] = {it["instruction"]: "m" * int(rng.integers(lo, hi)) for it in items}
    outputs["one"] = {items[0]["instruction"]: "x" * 90}
    units, judged, expected = [], {}, {}
    for name in ("long", "short", "same", "one"):
        expected[name] = []
        for it in items:
            text = it["instruction"]
            if text not in outputs[name]:
                continue
            p = _sigmoid((len(outputs[name][text]) - len(outputs["ref"][text])) / 40)
            expected[name].append(Judged(it["instruction_id"], p, len(outputs[name][text]), len(outputs["ref"][text])))
            for first_is_a in (True, False):
                key = f"{name}|{it['instruction_id']}|{first_is_a}"
                units.append({KEY: key, "meta": json.dumps({"bench": "alpaca_eval", "model": name, "reference": "ref",
                                                            "instruction_id": it["instruction_id"],
                                                            "first_is_a": first_is_a})})
                probs = [p, 1 - p, 0.0] if first_is_a else [1 - p, p, 0.0]
                judged[key] = {"probs": probs, "verdict": "A", "judgment": "", "attempts": 1}
    cfg = EvalRecipe(alpaca_eval=AlpacaEvalConfig(generate=False, output_models=["long", "short", "same", "one"],
                                                  reference_model="ref"))
    cfg.judge.mode = "expected"
    al = _Alpaca(items=items, source="file.jsonl", reference="ref", outputs=outputs, units=units,
                 missing={"one": n - 1})
    res = _alpaca_results(al, judged, cfg, tmp_path)
    direct = length_controlled_win_rates({k: v for k, v in expected.items()})
    for name in ("long", "short", "same"):
        s = res["models"][name]
        keys = list(s)
        assert keys[keys.index("win_rate"):keys.index("win_rate") + 3] == ["win_rate", "standard_error", "lc_win_rate"]
        assert s["win_rate"] == pytest.approx(_raw(expected[name]))
        assert s["lc_win_rate"] == pytest.approx(direct[name].lc_win_rate) and s["lc_available"]
        assert abs(s["lc_win_rate"] - 0.5) < abs(s["win_rate"] - 0.5)
    assert res["models"]["long"]["win_rate"] > 0.75
    one = res["models"]["one"]
    assert one["lc_win_rate"] is None and one["lc_reason"].startswith("1 judged instructions")

    results = {"run": "r", "judge": {"name": "j", "backend": "transformers", "model": "m", "prompts": "p",
                                     "mode": "expected", "max_attempts": 1},
               "alpaca_eval": {**res, "judge": "j"}, "judging": {"judgments": 0, "calls": 0, "retries": 0,
                                                                 "parse_failures": 0}, "timings": {}}
    report = markdown_report(results, None)
    header = next(line for line in report.splitlines() if line.startswith("| Model | Win rate %"))
    assert header.startswith("| Model | Win rate % | ± SE % | LC win rate % |")
    row = next(line for line in report.splitlines() if line.startswith("| long |")).split(" | ")
    assert row[1] == f"{100 * res['models']['long']['win_rate']:.1f}"
    assert row[3] == f"{100 * res['models']['long']['lc_win_rate']:.1f}"
    assert next(line for line in report.splitlines() if line.startswith("| one |")).split(" | ")[3] == "n/a"
    assert "LC win rate unavailable: one: 1 judged instructions, the GLM needs at least 10." in report

    summary = {"run_id": "r", "run_dir": "/r", "seconds": {}, "eval": {
        "mt_bench": {}, "categories": [], "reference": "ref", "judge": "j", "judge_mode": "expected",
        "win_rate": {name: {"win_rate": s["win_rate"], "lc_win_rate": s["lc_win_rate"], "lc_reason": s["lc_reason"]}
                     for name, s in res["models"].items()}}}
    lines = summary_table(summary).splitlines()
    lc_row = next(line for line in lines if line.strip().startswith("LC win rate vs ref")).split()[5:]
    assert lc_row == [f"{100 * res['models'][n]['lc_win_rate']:.1f}%" for n in ("long", "short", "same")] + ["n/a"]
    assert lines[-1].startswith("  LC win rate n/a: one: 1 judged instructions")


def test_with_length_controlled_places_the_fields_after_the_win_rate():
    merged = with_length_controlled({"instructions": 3, "win_rate": 0.5, "standard_error": 0.1, "wins": 1},
                                    LengthControlled(lc_reason="why"))
    assert list(merged)[:4] == ["instructions", "win_rate", "standard_error", "lc_win_rate"]
    assert merged["lc_reason"] == "why" and list(merged)[-1] == "wins"


# ------------------------------------------------------------------------------------------------ ../shared


def test_shared_alpaca_eval_outputs_under_a_length_biased_judge():
    # gpt4_1106_preview (AlpacaEval 2's baseline, ~2,050 characters per answer) as the reference; the other three
    # models write shorter answers. The synthetic judge only looks at length: P(model better) =
    # sigmoid((model length - reference length) / 300 characters). Raw win rates are far below 50%; at equal
    # lengths this judge has no preference, so LC must move toward 50%.
    path = shared_file("alpaca_eval", "completions.jsonl")
    reference = "gpt4_1106_preview"
    judged: dict[str, list[Judged]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        texts = {c["model"]: c["text"] for c in row["completions"]}
        for model, text in texts.items():
            if model != reference:
                p = _sigmoid((len(text) - len(texts[reference])) / 300)
                judged.setdefault(model, []).append(Judged(row["prompt_id"], p, len(text), len(texts[reference])))
    assert len(judged) == 3 and all(len(rows) == 805 for rows in judged.values())
    lc = length_controlled_win_rates(judged)
    for model, rows in judged.items():
        raw = _raw(rows)
        assert raw < 0.3, model
        assert lc[model].lc_available and lc[model].lc_length > 0
        assert abs(lc[model].lc_win_rate - 0.5) < min(0.1, abs(raw - 0.5) / 2), (model, raw, lc[model])
