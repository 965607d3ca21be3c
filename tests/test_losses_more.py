"""SimPO, ORPO and KTO against their papers' formulas on numbers worked out by hand, the unpaired (KTO) data
module, and short in-process training runs on the tiny random model (no Ray)."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from zephyr_ray.config import DataConfig
from zephyr_ray.data.packing import collate
from zephyr_ray.data.preference import tokenize_pair, validate_pair
from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE
from zephyr_ray.data.schema import BadRowError, RowProblem
from zephyr_ray.data.tokenize import IGNORE_INDEX
from zephyr_ray.data.unpaired import (
    Unpaired,
    balance_warning,
    mismatched_partners,
    pair_layout,
    tokenize_unpaired,
    truncate_unpaired,
    unpaired_examples,
    unpaired_schema,
    validate_unpaired,
    with_mismatched,
)
from zephyr_ray.models import load_model
from zephyr_ray.train.losses import (
    kto_kl,
    kto_loss,
    kto_means,
    label_logits,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)


def _t(*xs, grad=True):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _neg_logsigmoid(x):  # -log σ(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- SimPO


def test_simpo_by_hand():
    # pair 0: chosen -3.0 over 3 tokens (avg -1), rejected -10.0 over 5 (avg -2): β·Δ - γ = 2·1 - 1 = 1
    # pair 1: chosen -6.0 over 2 (avg -3), rejected -4.0 over 4 (avg -1):         2·(-2) - 1 = -5
    chosen, rejected = _t(-3.0, -6.0), _t(-10.0, -4.0)
    losses, m = simpo_loss(chosen, rejected, _t(3.0, 2.0, grad=False), _t(5.0, 4.0, grad=False), beta=2.0, gamma=1.0)
    assert losses.tolist() == pytest.approx([_neg_logsigmoid(1.0), _neg_logsigmoid(-5.0)])
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1)))
    # rewards β·avg: chosen -2, -6; rejected -4, -2 (sums over pairs: the loop divides by the pair count)
    assert m["rewards/chosen"].item() == pytest.approx(-8.0) and m["rewards/rejected"].item() == pytest.approx(-6.0)
    assert m["rewards/accuracies"].item() == 1.0 and m["rewards/margins"].item() == pytest.approx(2.0 - 4.0)
    assert m["logps/chosen"].item() == pytest.approx(-4.0) and m["logps/rejected"].item() == pytest.approx(-3.0)
    # d/d chosen_logps of -log σ(z) = -σ(-z)·β/|y_c|: raising the chosen answer's log-prob lowers the loss
    losses.sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-_sigmoid(-1.0) * 2 / 3, -_sigmoid(5.0) * 2 / 2])
    assert rejected.grad.tolist() == pytest.approx([_sigmoid(-1.0) * 2 / 5, _sigmoid(5.0) * 2 / 4])


def test_simpo_defaults_and_length_normalisation():
    # defaults β 2, γ 1; the same per-token averages over twice the tokens give the same loss (no length bias)
    loss, _ = simpo_loss(_t(-3.0), _t(-10.0), _t(3.0, grad=False), _t(5.0, grad=False))
    longer, _ = simpo_loss(_t(-6.0), _t(-20.0), _t(6.0, grad=False), _t(10.0, grad=False))
    assert loss.item() == pytest.approx(_neg_logsigmoid(1.0)) and longer.item() == pytest.approx(loss.item())
    # γ is a margin to beat: equal averages still lose log(1 + e^γ)
    tie, _ = simpo_loss(_t(-2.0), _t(-4.0), _t(2.0, grad=False), _t(4.0, grad=False), beta=2.0, gamma=1.0)
    assert tie.item() == pytest.approx(math.log(1 + math.e))


# ---------------------------------------------------------------- ORPO


def test_orpo_by_hand():
    # chosen: per-token P = 0.5 over 3 tokens (odds 1); rejected: P = 0.2 over 5 tokens (odds 0.25)
    chosen, rejected = _t(3 * math.log(0.5)), _t(5 * math.log(0.2))
    losses, m = orpo_loss(chosen, rejected, _t(3.0, grad=False), _t(5.0, grad=False), lambda_=0.1)
    log_odds = math.log((0.5 / 0.5) / (0.2 / 0.8))  # = log 4
    assert log_odds == pytest.approx(math.log(4))
    # NLL per token of chosen (log 2) + λ·(-log σ(log 4)) = log 2 + 0.1·log(1.25)
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25))
    assert m["nll_loss"].item() == pytest.approx(math.log(2))
    assert m["log_odds_chosen"].item() == pytest.approx(math.log(4))
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(0.8))  # log σ(log 4) = log(4/5)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5))
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * math.log(0.2))
    assert m["rewards/accuracies"].item() == 1.0
    losses.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    # by hand: d/d avg_c of [-avg_c - λ log σ(L)] with dL/d avg_c = 1 + P_c/(1 - P_c) = 2, σ(-L) = 1/5:
    # -1 - 0.1·(1/5)·2 = -1.04, over 3 tokens; d/d avg_r: 0.1·(1/5)·(1 + 0.2/0.8) = 0.025, over 5 tokens
    assert chosen.grad.item() == pytest.approx(-1.04 / 3)
    assert rejected.grad.item() == pytest.approx(0.025 / 5)


def test_orpo_stays_finite_at_extreme_probabilities():
    # a chosen answer the model is (almost) sure of: log(1 - P) would be log 0 without care
    for avg in (0.0, -1e-12, -1e-4, -50.0):
        chosen, rejected = _t(2 * avg), _t(-400.0)
        losses, m = orpo_loss(chosen.float(), rejected.float(), torch.tensor([2.0]), torch.tensor([4.0]))
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
        assert all(torch.isfinite(v) for v in m.values())


def test_reference_free_losses_take_no_reference():
    # the whole signature is the policy's log-probs and lengths: nothing from a reference model
    args = dict(chosen_logps=_t(-3.0), rejected_logps=_t(-10.0), chosen_counts=_t(3.0, grad=False),
                rejected_counts=_t(5.0, grad=False))
    assert torch.isfinite(simpo_loss(**args)[0]).all() and torch.isfinite(orpo_loss(**args)[0]).all()
    with pytest.raises(TypeError):
        simpo_loss(**args, ref_chosen_logps=_t(-3.0))


# ---------------------------------------------------------------- KTO


def test_kto_by_hand_mixed_rows():
    # rows: log-ratios r = 1, -2, 0; labels desirable, undesirable, desirable
    policy, ref = _t(-10.0, -12.0, -8.0), _t(-11.0, -10.0, -8.0, grad=False)
    label = torch.tensor([True, False, True])
    # mismatched pairs: log-ratios 1.0 and 1.5 → z = 1.25
    kl = kto_kl(_t(-20.0, -15.0), _t(-21.0, -16.5, grad=False))
    assert kl.item() == pytest.approx(1.25) and not kl.requires_grad
    losses, m = kto_loss(policy, ref, label, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    expected = [1 - _sigmoid(0.1 * (1 - 1.25)), 2.0 * (1 - _sigmoid(0.1 * (1.25 - (-2)))), 1 - _sigmoid(0.1 * (0 - 1.25))]
    assert losses.tolist() == pytest.approx(expected)
    assert m["count/chosen"].item() == 2 and m["count/rejected"].item() == 1
    assert m["rewards/chosen_sum"].item() == pytest.approx(0.1 * (1 + 0)) and m["rewards/rejected_sum"].item() == pytest.approx(-0.2)
    assert m["logps/chosen_sum"].item() == pytest.approx(-18.0) and m["logps/rejected_sum"].item() == pytest.approx(-12.0)
    assert m["kl"].item() == pytest.approx(3 * 1.25)  # z per row, summed: the loop's mean over rows is z
    logged = kto_means({k: v.item() for k, v in m.items()})
    assert logged == pytest.approx({"kl": 1.25, "rewards/chosen": 0.05, "rewards/rejected": -0.2, "rewards/margins": 0.25,
                                    "logps/chosen": -9.0, "logps/rejected": -12.0})
    # the loop's means over the 3 rows give the same logged values
    assert kto_means({k: v.item() / 3 for k, v in m.items()}) == pytest.approx(logged)
    # gradients: desirable rows' log-probs pushed up, the undesirable row's down:
    # d/dr [1 - σ(β(r - z))] = -β σ(1-σ); d/dr [w(1 - σ(β(z - r)))] = +w β σ(1-σ)
    losses.sum().backward()
    s0, s1, s2 = _sigmoid(-0.025), _sigmoid(0.325), _sigmoid(-0.125)
    assert policy.grad.tolist() == pytest.approx([-0.1 * s0 * (1 - s0), 2.0 * 0.1 * s1 * (1 - s1), -0.1 * s2 * (1 - s2)])


def test_kto_all_desirable_rows():
    policy, ref = _t(-4.0, -6.0), _t(-5.0, -5.0, grad=False)  # r = 1, -1
    kl = kto_kl(_t(-9.0, -7.0), _t(-9.5, -7.5, grad=False))  # z = 0.5
    losses, m = kto_loss(policy, ref, torch.tensor([True, True]), kl)  # defaults: β 0.1, weights 1
    assert losses.tolist() == pytest.approx([1 - _sigmoid(0.1 * 0.5), 1 - _sigmoid(0.1 * -1.5)])
    assert m["count/rejected"].item() == 0 and m["rewards/rejected_sum"].item() == 0
    logged = kto_means({k: v.item() for k, v in m.items()})
    assert set(logged) == {"kl", "rewards/chosen", "logps/chosen"} and logged["rewards/chosen"] == pytest.approx(0.0)
    losses.sum().backward()
    assert (policy.grad < 0).all()


def test_kto_kl_is_clamped_at_zero_and_detached():
    policy_kl = _t(-10.0, -12.0)
    kl = kto_kl(policy_kl, _t(-9.0, -11.5, grad=False))  # mean log-ratio -0.75 < 0 → 0
    assert kl.item() == 0.0 and not kl.requires_grad
    policy = _t(-3.0)
    losses, _ = kto_loss(policy, _t(-3.0, grad=False), torch.tensor([False]), kl, beta=0.1)
    assert losses.item() == pytest.approx(0.5)  # 1 - σ(0.1·(0 - 0))
    losses.sum().backward()
    assert policy_kl.grad is None and policy.grad.item() > 0  # no gradient through z; undesirable pushed down
    # a KL passed in with a graph is detached by the loss too
    live = _t(0.3)
    kto_loss(_t(-1.0), _t(-1.0, grad=False), torch.tensor([True]), live[0])[0].sum().backward()
    assert live.grad is None
    with pytest.raises(ValueError, match="mismatched"):
        kto_kl(torch.zeros(0), torch.zeros(0))


# ---------------------------------------------------------------- unpaired data

U = {"role": "user", "content": "Name a colour."}


def test_validate_unpaired_forms():
    assert validate_unpaired({"prompt": "Name a colour.", "completion": "Blue.", "label": True}) == Unpaired([U], "Blue.", True)
    msgs = {"prompt": [{"role": "system", "content": "Be brief."}, U],
            "completion": [{"role": "assistant", "content": "Red."}], "label": False}
    assert validate_unpaired(msgs) == Unpaired([{"role": "system", "content": "Be brief."}, U], "Red.", False)
    one = {"prompt": [U], "completion": {"role": "assistant", "content": "Red."}, "label": np.bool_(True)}
    assert validate_unpaired(one) == Unpaired([U], "Red.", True)
    # a multi-turn completion: only its last answer is judged, the turns before it join the prompt
    turns = [{"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
             {"role": "assistant", "content": "Green."}]
    got = validate_unpaired({"prompt": [U], "completion": turns, "label": True})
    assert got == Unpaired([U, turns[0], turns[1]], "Green.", True)


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, "label"),
    ({"prompt": "p", "completion": "c", "label": 1}, "label"),
    ({"prompt": "p", "completion": "c"}, "label"),
    ({"prompt": " ", "completion": "c", "label": True}, "prompt"),
    ({"completion": "c", "label": True}, "prompt"),
    ({"prompt": [U, {"role": "assistant", "content": "x"}], "completion": "c", "label": True}, "prompt[1].role"),
    ({"prompt": "p", "completion": "", "label": True}, "completion"),
    ({"prompt": "p", "completion": [], "label": True}, "completion"),
    ({"prompt": "p", "completion": [{"role": "user", "content": "c"}], "label": True}, "completion[0].role"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": 3}], "label": True}, "completion[0].content"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "label": True}, "completion[1].role"),
])
def test_validate_unpaired_names_the_field(row, field):
    with pytest.raises(RowProblem) as err:
        validate_unpaired(row)
    assert err.value.field == field


def test_mismatched_partners_by_hand():
    # groups of 2: [0, 1], then [2, 3, 4] (a last group of one joins the one before): rotation by one within each
    assert mismatched_partners([[1], [2], [3], [4], [5]], 2) == [1, 0, 4, 2, 3]
    # rows 0 and 1 share a prompt: each takes the nearest earlier (cyclic) row with another prompt
    assert mismatched_partners([[1], [1], [2]], 3) == [2, 2, 1]
    assert mismatched_partners([[7], [7]], 4) == [1, 0]  # one prompt only: still another row's completion
    assert mismatched_partners([[7]], 4) == [0]
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_partners([[1], [2]], 1)


def test_with_mismatched_cuts_to_fit():
    ex = [{"prompt_ids": [1, 2, 3], "completion_ids": [10, 11]}, {"prompt_ids": [4], "completion_ids": [20, 21, 22, 23]}]
    out = with_mismatched(ex, group_size=2, max_length=6)
    assert [r["kl_completion_ids"] for r in out] == [[20, 21, 22], [10, 11]]
    assert out[0]["completion_ids"] == [10, 11]  # the row's own fields are kept


def test_truncate_unpaired():
    ids = {"prompt_ids": [1, 2, 3, 4, 5], "completion_ids": [6, 7, 8, 9]}
    assert truncate_unpaired(ids, 6, 3) == ({"prompt_ids": [3, 4, 5], "completion_ids": [6, 7, 8]}, True)
    assert truncate_unpaired(ids, 20, 10) == (ids, False)


def _raw(rows):
    return [{SOURCE: "fb.jsonl", ROW: i + 1, RAW_JSON: json.dumps(r)} for i, r in enumerate(rows)]


ROWS = [{"prompt": "Name a colour.", "completion": "Blue.", "label": True},
        {"prompt": "Name a colour.", "completion": "Seven.", "label": False},
        {"prompt": "Add 2 and 2.", "completion": "Four.", "label": True},
        {"prompt": [{"role": "user", "content": "Say hi."}], "completion": "Goodbye forever.", "label": False}]


def test_unpaired_examples_tokens_and_kl_pairs(tokenizer):
    cfg = DataConfig(max_length=64, group_by_length=False)
    out, report = unpaired_examples(_raw(ROWS), tokenizer, cfg, max_prompt_length=32, kl_group=4)
    assert [r["label"] for r in out] == [True, False, True, False]
    assert [r["sample_ids"] for r in out] == [["fb.jsonl#1"], ["fb.jsonl#2"], ["fb.jsonl#3"], ["fb.jsonl#4"]]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert out[0]["prompt_ids"] == list(prompt) == out[1]["prompt_ids"]
    assert tokenizer.decode(out[0]["completion_ids"]) == "Blue.</s>" and out[0]["completion_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_unpaired(tokenizer, Unpaired([U], "Blue.", True)) == {k: out[0][k] for k in ("prompt_ids", "completion_ids")}
    # partners by hand, one group of 4, nearest earlier row (cyclic) with another prompt: rows 0 and 1 share
    # theirs, so row 0 → 3 (before 0: 3, 2, 1), row 1 → 3 (0 is skipped), row 2 → 1, row 3 → 2
    assert [tokenizer.decode(r["kl_completion_ids"]) for r in out] == [
        "Goodbye forever.</s>", "Goodbye forever.</s>", "Seven.</s>", "Four.</s>"]
    assert report.rows == report.used == report.packed_rows == 4
    assert report.label_tokens == sum(len(r["completion_ids"]) for r in out)
    assert report.tokens == sum(2 * len(r["prompt_ids"]) + len(r["completion_ids"]) + len(r["kl_completion_ids"]) for r in out)
    again, _ = unpaired_examples(_raw(ROWS), tokenizer, cfg, max_prompt_length=32, kl_group=4)
    assert again == out  # deterministic
    assert pa.Table.from_pylist(out, schema=unpaired_schema()).num_rows == 4
    layout = pair_layout({k: [r[k] for r in out] for k in out[0]})
    assert set(layout) == {"prompt_ids", "chosen_ids", "rejected_ids", "sample_ids"}
    assert layout["chosen_ids"][1] == out[1]["completion_ids"] and layout["rejected_ids"][1] == out[1]["kl_completion_ids"]


def test_unpaired_bad_rows_name_file_row_and_field(tokenizer):
    rows = [*ROWS[:2], {"prompt": "Hi.", "completion": "Hello.", "label": "good"}]
    with pytest.raises(BadRowError, match=r"fb\.jsonl line 3: field label: expected true"):
        unpaired_examples(_raw(rows), tokenizer, DataConfig(max_length=64), max_prompt_length=32, kl_group=2)
    out, report = unpaired_examples(_raw(rows), tokenizer, DataConfig(max_length=64, on_bad_row="skip"),
                                    max_prompt_length=32, kl_group=2)
    assert len(out) == 2 and sum(report.skipped.values()) == 1 and "label" in next(iter(report.skipped))
    long_row = [{"prompt": "Hi.", "completion": "word " * 200, "label": True}]
    with pytest.raises(BadRowError, match=r"fb\.jsonl line 1: field completion: \d+ tokens is longer"):
        unpaired_examples(_raw(long_row), tokenizer, DataConfig(max_length=64, overlong="error"), max_prompt_length=32,
                          kl_group=2)


def test_balance_warning():
    assert balance_warning(10, 10, 1.0, 1.0) is None  # ratio 1
    assert balance_warning(12, 10, 1.0, 1.0) is None  # 1.2
    assert balance_warning(10, 0, 1.0, 1.0) is None
    warning = balance_warning(30, 10, 1.0, 1.0)  # 3: desirable_weight should be in [10/30, (4/3)·10/30]
    assert "3.00" in warning and "[0.333, 0.444]" in warning


# ---------------------------------------------------------------- training runs on the tiny model


def _sequence_logps(model, seqs):
    """Summed answer log-probs and answer lengths of (prompt_ids, answer_ids) sequences, one padded row each."""
    rows = {"input_ids": [p + a for p, a in seqs], "labels": [[IGNORE_INDEX] * len(p) + a for p, a in seqs],
            "position_ids": [list(range(len(p) + len(a))) for p, a in seqs], "sample_ids": [[str(i)] for i in range(len(seqs))]}
    batch = collate(rows, pad_id=0)
    seq_index = torch.arange(len(seqs))[:, None].expand_as(batch["input_ids"])
    logits, targets, keep = label_logits(model, batch)
    logps, counts, _ = sequence_logps(logits, targets, seq_index[keep], len(seqs))
    return logps, counts


PAIRS = [("Name a colour.", "Blue is a colour.", "Seven hundred."),
         ("Add 2 and 2.", "The answer is four.", "Purple elephants dance."),
         ("Say hello.", "Hello there, friend!", "No."),
         ("What is the capital of France?", "Paris is the capital.", "Bananas are yellow."),
         ("Count to three.", "One, two, three.", "I refuse to count."),
         ("Is ice cold?", "Yes, ice is cold.", "Ice is hotter than the sun.")]


def _pairs(tokenizer):
    ids = [tokenize_pair(tokenizer, validate_pair({"prompt": p, "chosen": c, "rejected": r})) for p, c, r in PAIRS]
    return [(i["prompt_ids"], i["chosen_ids"]) for i in ids] + [(i["prompt_ids"], i["rejected_ids"]) for i in ids]


@pytest.mark.parametrize("loss_name", ["simpo", "orpo"])
def test_reference_free_training_raises_pairwise_accuracy(tiny_model, tokenizer, loss_name):
    torch.manual_seed(0)
    model = load_model(tiny_model)
    model.train()
    seqs, n = _pairs(tokenizer), len(PAIRS)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step():
        logps, counts = _sequence_logps(model, seqs)
        if loss_name == "simpo":
            losses, m = simpo_loss(logps[:n], logps[n:], counts[:n], counts[n:])
        else:
            losses, m = orpo_loss(logps[:n], logps[n:], counts[:n], counts[n:])
        return losses.mean(), m["rewards/accuracies"].item() / n, m["rewards/margins"].item() / n

    with torch.no_grad():
        _, acc_before, margin_before = step()
    for _ in range(20):
        loss, _, _ = step()
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        _, acc_after, margin_after = step()
    assert acc_before <= 4 / 6, "the random model should not already rank the pairs"
    assert acc_after == 1.0 and margin_after > margin_before


def test_kto_training_separates_desirable_from_undesirable(tiny_model, tokenizer):
    torch.manual_seed(0)
    rows = []
    for p, good, bad in PAIRS:
        rows += [{"prompt": p, "completion": good, "label": True}, {"prompt": p, "completion": bad, "label": False}]
    examples, _ = unpaired_examples(_raw(rows), tokenizer, DataConfig(max_length=128, group_by_length=False),
                                    max_prompt_length=64, kl_group=len(rows))
    seqs = [(e["prompt_ids"], e["completion_ids"]) for e in examples]
    kl_seqs = [(e["prompt_ids"], e["kl_completion_ids"]) for e in examples]
    label = torch.tensor([e["label"] for e in examples])
    model = load_model(tiny_model)
    with torch.no_grad():  # the reference is the starting model: its log-probs are computed once, up front
        ref, _ = _sequence_logps(model, seqs)
        ref_kl, _ = _sequence_logps(model, kl_seqs)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kls = []
    for _ in range(20):
        with torch.no_grad():
            kl = kto_kl(_sequence_logps(model, kl_seqs)[0], ref_kl)
        kls.append(kl.item())
        logps, _ = _sequence_logps(model, seqs)
        losses, m = kto_loss(logps, ref, label, kl)
        optim.zero_grad()
        losses.mean().backward()
        optim.step()
    with torch.no_grad():
        logps, _ = _sequence_logps(model, seqs)
        _, m = kto_loss(logps, ref, label, kto_kl(_sequence_logps(model, kl_seqs)[0], ref_kl))
    logged = kto_means({k: v.item() for k, v in m.items()})
    assert kls[0] == 0.0  # policy = reference at the start
    assert logged["rewards/chosen"] > 0 > logged["rewards/rejected"]
    rewards = 0.1 * (logps - ref)
    assert rewards[label].min() > rewards[~label].max()  # every desirable row above every undesirable one
