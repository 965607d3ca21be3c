"""The pure parts of bench/real_recipe.py: one split by prompt text across the three ../shared files, and the
statistics its figures are given with (no training here)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys

import pytest

from zephyr_ray.data.split import normalize, prompt_text

from .conftest import ROOT, shared_file


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location("real_recipe", ROOT / "bench" / "real_recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_recipe"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(rr) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in shared_file("alpaca_eval", f).read_text().splitlines()]
            for name, f in rr.FILES.items()}


def _prompts(rows: list[dict]) -> set[str]:
    return {normalize(prompt_text(r)) for r in rows}


def test_one_split_holds_out_the_same_prompts_of_all_three_shared_files(rr):
    rows = _rows(rr)
    s = rr.FULL
    split = rr.split_shared(rows, s.split_seed, s.held_out_fraction)
    held = split.held_out_prompts
    assert len(held) == len(set(held)) >= s.min_held_out == 200
    # the same prompts held out of the dialogues, the pairs (802 of the 805 prompts have one) and the instructions
    assert _prompts(split.held_out["sft"]) == _prompts(split.held_out["instructions"]) == set(held)
    assert _prompts(split.held_out["pairs"]) <= set(held)
    assert len(split.held_out["pairs"]) >= 200
    for name, file_rows in rows.items():
        # every row on exactly one side, and no prompt on both
        assert len(split.train[name]) + len(split.held_out[name]) == len(file_rows)
        assert not _prompts(split.train[name]) & set(held)
    # the three files name each prompt under different ids: the split went by text, not by id
    pair_ids = {r["prompt_id"] for r in split.held_out["pairs"]}
    assert not pair_ids & {r["prompt_id"] for r in split.held_out["instructions"]}
    # GPT-4 preferred text_davinci_003 in some held-out pairs (75 of all 802): the subset (b) reports on
    davinci = [r for r in split.held_out["pairs"] if r["chosen_model"] == rr.DAVINCI]
    assert 0 < len(davinci) < 75
    # the side of a row depends on its prompt alone: shuffled files give the same held-out rows
    shuffled = {name: random.Random(7).sample(file_rows, len(file_rows)) for name, file_rows in rows.items()}
    again = rr.split_shared(shuffled, s.split_seed, s.held_out_fraction)
    for name in rows:
        assert sorted(map(json.dumps, again.held_out[name])) == sorted(map(json.dumps, split.held_out[name]))


def test_files_that_disagree_on_the_held_out_prompts_are_refused(rr):
    rows = _rows(rr)
    s = rr.FULL
    held = set(rr.split_shared(rows, s.split_seed, s.held_out_fraction).held_out_prompts)
    rows["sft"] = [r for r in rows["sft"] if normalize(prompt_text(r)) != min(held)]
    with pytest.raises(ValueError, match="different held-out prompts"):
        rr.split_shared(rows, s.split_seed, s.held_out_fraction)


def test_wilson_interval_by_hand(rr):
    z2 = rr.Z95**2
    # k = 0: the interval is [0, (z²/n) / (1 + z²/n)]; n = 10: 0.384146 / 1.384146
    lo, hi = rr.wilson_interval(0, 10)
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(0.384146 / 1.384146, abs=1e-6)
    assert hi == pytest.approx(0.277533, abs=1e-6)
    # k = n mirrors it
    assert rr.wilson_interval(10, 10) == pytest.approx((1 - 0.277533, 1.0), abs=1e-6)
    # 61/64 (p = 0.953125): centre (p + z²/128) / (1 + z²/64) = 0.983138 / 1.060023 = 0.927468,
    # half 1.959964 / 1.060023 * sqrt(p(1-p)/64 + z²/16384) = 1.848984 * 0.030538 = 0.056464
    assert rr.wilson_interval(61, 64) == pytest.approx((0.871003, 0.983931), abs=1e-5)
    assert z2 == pytest.approx(3.841459, abs=1e-6)
    with pytest.raises(ValueError):
        rr.wilson_interval(0, 0)


def test_preference_figures_by_hand(rr):
    # three pairs: summed log-probs of policy and reference, answer lengths; pair 2 is a davinci-preferred one
    per_pair = {"policy_chosen": [-10.0, -30.0, -8.0], "policy_rejected": [-12.0, -20.0, -9.0],
                "ref_chosen": [-11.0, -28.0, -8.0], "ref_rejected": [-11.0, -21.0, -7.0],
                "chosen_tokens": [10, 30, 2], "rejected_tokens": [10, 10, 4]}
    out = rr.preference_figures(per_pair, ["zephyr-7b-beta", "zephyr-7b-beta", rr.DAVINCI], beta=0.1)
    # margins 0.1 * ((pc - rc) - (pr - rr)): 0.1 * (1 + 1) = 0.2, 0.1 * (-2 - 1) = -0.3, 0.1 * (0 + 2) = 0.2
    assert out["all"]["reward_margin"]["mean"] == pytest.approx(0.1 / 3)
    assert out["all"]["implicit_reward"]["k"] == 2 and out["all"]["implicit_reward"]["n"] == 3
    # reference, summed: -11 > -11 no, -28 > -21 no, -8 > -7 no; per token: -1.1 > -1.1 no, -0.93 > -2.1 yes,
    # -4 > -1.75 no
    assert out["all"]["reference_logp_summed"]["k"] == 0
    assert out["all"]["reference_logp_per_token"]["k"] == 1
    dav = out[f"{rr.DAVINCI}_preferred"]
    assert (dav["implicit_reward"]["k"], dav["implicit_reward"]["n"]) == (1, 1)
    assert out["zephyr-7b-beta_preferred"]["implicit_reward"]["rate"] == pytest.approx(0.5)
    assert out["all"]["implicit_reward"]["ci95"] == pytest.approx(list(rr.wilson_interval(2, 3)))
    # by scored length: pair 1 chosen longer (30 vs 10, missed), pair 0 same length (hit), pair 2 chosen shorter (hit)
    assert [out[k]["implicit_reward"]["n"] for k in ("chosen_longer", "same_length", "chosen_shorter")] == [1, 1, 1]
    assert out["chosen_longer"]["implicit_reward"]["k"] == 0 and out["same_length"]["implicit_reward"]["k"] == 1
    # log-prob change per token: chosen (1/10, -2/30, 0/2), rejected (-1/10, 1/10, -2/4)
    change = out["all"]["logp_change_per_token"]
    assert change["chosen"]["mean"] == pytest.approx((0.1 - 2 / 30 + 0.0) / 3)
    assert change["rejected"]["mean"] == pytest.approx((-0.1 + 0.1 - 0.5) / 3)
    assert out["chosen_longer"]["logp_change_per_token"]["chosen"]["mean"] == pytest.approx(-2 / 30)
    # per token the ranking compares those changes: 0.1 > -0.1 yes, -2/30 > 0.1 no, 0 > -0.5 yes
    assert out["all"]["implicit_reward_per_token"]["k"] == 2
    assert out["trained_reward"] == "implicit_reward"
    # trained length-normalised, the reward margin is β times those per-token differences: 0.1 * (0.2, -1/6, 0.5)
    norm = rr.preference_figures(per_pair, ["zephyr-7b-beta", "zephyr-7b-beta", rr.DAVINCI], beta=0.1,
                                 length_normalize=True)
    assert norm["trained_reward"] == "implicit_reward_per_token"
    assert norm["all"]["reward_margin"]["mean"] == pytest.approx(0.1 * (0.2 - 1 / 6 + 0.5) / 3)
    assert norm["all"]["implicit_reward"] == out["all"]["implicit_reward"]  # the summed measure is still reported
    # a long chosen answer that fell 0.1 per token against a short rejected one that fell 0.5: summed, the
    # rejected one wins (-10 < -2); per token, the chosen one
    drift = {"policy_chosen": [-60.0], "ref_chosen": [-50.0], "policy_rejected": [-7.0], "ref_rejected": [-5.0],
             "chosen_tokens": [100], "rejected_tokens": [4]}
    one = rr.preference_figures(drift, ["zephyr-7b-beta"], beta=0.1)["all"]
    assert (one["implicit_reward"]["k"], one["implicit_reward_per_token"]["k"]) == (0, 1)


def test_learning_table_reports_the_trained_reward_against_the_goals(rr):
    per_pair = {"policy_chosen": [-10.0, -30.0, -8.0], "policy_rejected": [-12.0, -20.0, -9.0],
                "ref_chosen": [-11.0, -28.0, -8.0], "ref_rejected": [-11.0, -21.0, -7.0],
                "chosen_tokens": [10, 30, 2], "rejected_tokens": [10, 10, 4]}
    models = ["zephyr-7b-beta", "zephyr-7b-beta", rr.DAVINCI]
    nll = rr.nll_figures([(20.0, 10), (30.0, 10)], [(18.0, 10), (31.0, 10)])
    win = {"judged": 3, "wins": 1, "ties": 1, "losses": 1, "win_rate": 0.5, "standard_error": 0.2}

    def table(length_normalize: bool, wall_s: float) -> dict[str, dict]:
        b = rr.preference_figures(per_pair, models, beta=0.1, length_normalize=length_normalize)
        rows = rr.learning_table({"a_sft": nll, "b_dpo": b, "c_win_rate": win}, wall_s)["rows"]
        return {r["figure"]: r for r in rows}

    summed = table(False, 1800.0)
    head = summed["(b) held-out preference accuracy, the trained loss's implicit reward (summed)"]
    assert (head["value"], head["goal"]) == ("0.667 (2/3)", ">= 0.9: not met")  # margins 0.2, -0.3, 0.2
    assert "(b) implicit reward, summed" not in summed  # the headline row already is the summed reward
    assert summed["(b) implicit reward, per answer token"]["value"] == "0.667 (2/3)"
    assert summed[f"(b) the same, pairs where GPT-4 preferred {rr.DAVINCI}"]["value"] == "1.000 (1/1)"
    assert summed["(b) the reference's own log-prob preference, summed"]["value"] == "0.000 (0/3)"
    # NLL 2.5 -> 2.45 per token; one of two prompts fell (2.0 -> 1.8; 3.0 -> 3.1)
    a = summed["(a) held-out NLL/token of GPT-4's answers, before -> after dSFT"]
    assert (a["value"], a["goal"]) == ("2.500 -> 2.450 (20 tokens)", "lower: met")
    assert summed["(a) prompts whose NLL fell"]["value"] == "0.500 (1/2)"
    assert summed["(c) win rate dDPO vs dSFT, 3 instructions (W/T/L 1/1/1)"]["interval"] == "± 0.200 (SE)"
    assert summed["wall time (min)"] == {"figure": "wall time (min)", "value": "30.0", "interval": "",
                                         "goal": "<= 40: met"}
    normalised = table(True, 2460.0)
    assert "(b) held-out preference accuracy, the trained loss's implicit reward (per answer token)" in normalised
    assert "(b) implicit reward, per answer token" not in normalised
    assert normalised["(b) implicit reward, summed"]["value"] == "0.667 (2/3)"
    assert normalised["wall time (min)"]["goal"] == "<= 40: not met"


def test_nll_figures_by_hand(rr):
    # the third prompt filled max_length alone: no answer token, left out of the per-prompt figures
    before, after = [(20.0, 10), (6.0, 2), (0.0, 0)], [(15.0, 10), (7.0, 2), (0.0, 0)]
    f = rr.nll_figures(before, after)
    assert f["nll_before"] == pytest.approx(26 / 12) and f["nll_after"] == pytest.approx(22 / 12)
    assert f["perplexity_after"] == pytest.approx(math.exp(22 / 12))
    # per prompt: 2.0 -> 1.5 (drop 0.5), 3.0 -> 3.5 (drop -0.5)
    assert (f["prompts"], f["prompts_without_answer_tokens"], f["tokens"]) == (3, 1, 12)
    assert f["per_prompt_drop"]["mean"] == pytest.approx(0.0)
    assert f["per_prompt_drop"]["standard_error"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert (f["prompts_lower_after"]["k"], f["prompts_lower_after"]["n"]) == (1, 2)


def test_size_overrides_are_typed_and_checked(rr):
    s = rr.overridden(rr.FULL, ["dpo_train=512", "beta=0.25", "sft_lora=false", "eval_limit=12"])
    assert (s.dpo_train, s.beta, s.sft_lora, s.eval_limit) == (512, 0.25, False, 12)
    assert isinstance(s.dpo_train, int) and isinstance(s.beta, float)
    assert rr.overridden(s, ["eval_limit=null"]).eval_limit is None
    assert rr.overridden(rr.QUICK, []) == rr.QUICK  # --quick's sizes stay unless overridden
    # Read as a recipe's key=value overrides are: the same errors, naming the key.
    for bad, why in (("dpo_trian=5", "unknown key 'dpo_trian'; valid keys under <root>: answer_tokens, beta"),
                     ("dpo_train", "'dpo_train' is not key=value"),
                     ("dpo_train=many", "dpo_train: Value 'many' of type 'str' could not be converted to Integer"),
                     ("sft_lora=maybe", "sft_lora: Value 'maybe' is not a valid bool")):
        with pytest.raises(SystemExit, match=why):
            rr.overridden(rr.FULL, [bad])
