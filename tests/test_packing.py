import numpy as np
import pytest
import torch

from zephyr_ray.data.packing import best_fit_decreasing, collate, pack_sequences
from zephyr_ray.data.samples import sample_dialogues
from zephyr_ray.data.tokenize import IGNORE_INDEX, tokenize_messages
from zephyr_ray.train.losses import label_logits, shifted_labels, token_nll_sum


def test_best_fit_decreasing():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in rows of 10: optimal here
    assert bins == [[2, 3], [4, 1], [0, 6, 5]]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([11], 10)


def test_collate_pads_after_the_last_sequence():
    batch = {
        "input_ids": np.array([[1, 2, 3], [4, 5, 6, 7, 8]], dtype=object),
        "labels": np.array([[-100, 2, 3], [-100, 5, -100, 7, 8]], dtype=object),
        "position_ids": np.array([[0, 1, 2], [0, 1, 0, 1, 2]], dtype=object),
        "sample_ids": np.array([["a"], ["b", "c"]], dtype=object),
    }
    out = collate(batch, pad_id=0, pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3] + [-100] * 5, [-100, 5, -100, 7, 8, -100, -100, -100]]
    # Padding continues the last sequence's positions: an unpacked row stays a plain arange.
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 0, 1, 2, 3, 4, 5]]
    # Targets never cross from one packed sequence into the next.
    assert shifted_labels(out["labels"], out["position_ids"]).tolist()[1] == [5, -100, 7, 8, -100, -100, -100]
    assert out["sample_ids"] == [["a"], ["b", "c"]]
    assert out["row_lengths"] == [3, 5]

    # One row: the rows concatenated without padding between them, padded only at the end.
    flat = collate(batch, pad_id=0, pad_to_multiple_of=4, one_row=True)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert flat["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert shifted_labels(flat["labels"], flat["position_ids"]).tolist() == [[2, 3, -100, 5, -100, 7, 8]]
    assert flat["sample_ids"] == [["a", "b", "c"]] and flat["row_lengths"] == [3, 5]


def _seqs(tokenizer, n):
    return [{**tokenize_messages(tokenizer, d["messages"]), "sample_id": str(i)}
            for i, d in enumerate(sample_dialogues(n, seed=3))]


def _rows_to_batch(rows):
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def test_packed_loss_equals_token_weighted_loss_of_single_sequences(tiny_model, tokenizer):
    from zephyr_ray.models import load_model

    model = load_model(tiny_model).eval()
    seqs = _seqs(tokenizer, 7)
    rows = pack_sequences(seqs, max_length=160)
    assert len(rows) < len(seqs)  # several sequences really share a row
    batch = collate(_rows_to_batch(rows), tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets, keep = label_logits(model, batch)
        packed_sum, packed_n = token_nll_sum(logits, targets).item(), len(targets)
        total, count = 0.0, 0
        for s in seqs:
            one = {"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]]),
                   "position_ids": torch.arange(len(s["input_ids"]))[None]}
            lg, tg, _ = label_logits(model, one)
            total, count = total + token_nll_sum(lg, tg).item(), count + len(tg)
    assert packed_n == count == sum(sum(t != IGNORE_INDEX for t in s["labels"][1:]) for s in seqs)
    assert packed_sum / packed_n == pytest.approx(total / count, abs=1e-5)

    # Without the position_ids restart, attention crosses sequences and the loss changes: the test can fail.
    naive = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], position_ids=naive, use_cache=False).logits[keep]
    assert abs(token_nll_sum(leaked, targets).item() / packed_n - total / count) > 1e-3


def test_logits_only_where_trained_equal_the_full_forward(tiny_model, tokenizer):
    from zephyr_ray.models import load_model

    model = load_model(tiny_model).eval()
    batch = collate(_rows_to_batch(pack_sequences(_seqs(tokenizer, 4), 200)), tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets, keep = label_logits(model, batch)
        full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert keep.sum() == len(targets) == len(logits) < keep.numel() / 2
    assert torch.allclose(logits, full[keep], atol=1e-5)
    expected = shifted_labels(batch["labels"], batch["position_ids"])
    assert targets.tolist() == expected[expected != IGNORE_INDEX].tolist()


def test_shifted_labels_never_cross_sequences():
    labels = torch.tensor([[-100, 1, 2, -100, 4]])
    assert shifted_labels(labels, torch.arange(5)[None]).tolist() == [[1, 2, -100, 4]]
    # Position 2 starts a new packed sequence, so its token is not predicted from position 1.
    assert shifted_labels(labels, torch.tensor([[0, 1, 0, 1, 2]])).tolist() == [[1, -100, -100, 4]]


def test_token_nll_sum_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    assert token_nll_sum(logits, torch.tensor([1, 2])).item() == pytest.approx(-np.log(0.25) - np.log(0.1), abs=1e-6)


def test_packed_rows_are_shuffled_reproducibly(tokenizer):
    from zephyr_ray.config import DataConfig
    from zephyr_ray.data.samples import sample_dialogues
    from zephyr_ray.data.sft import sft_examples

    raw = [{**d, "_source": "s.jsonl", "_row": i} for i, d in enumerate(sample_dialogues(64, seed=3))]
    ordered, _ = sft_examples(raw, tokenizer, DataConfig(max_length=256, shuffle=False))
    mixed, _ = sft_examples(raw, tokenizer, DataConfig(max_length=256, shuffle=True, seed=1))
    again, _ = sft_examples(raw, tokenizer, DataConfig(max_length=256, shuffle=True, seed=1))
    other, _ = sft_examples(raw, tokenizer, DataConfig(max_length=256, shuffle=True, seed=2))
    key = [r["sample_ids"] for r in ordered]
    assert sorted(key) == sorted(r["sample_ids"] for r in mixed)  # same rows, nothing lost or repeated
    assert [r["sample_ids"] for r in mixed] == [r["sample_ids"] for r in again]
    assert [r["sample_ids"] for r in mixed] != key
    assert [r["sample_ids"] for r in mixed] != [r["sample_ids"] for r in other]


def test_unpacked_rows_go_out_longest_first_ties_in_order(tokenizer):
    from zephyr_ray.config import DataConfig
    from zephyr_ray.data.packing import longest_first
    from zephyr_ray.data.samples import sample_dialogues
    from zephyr_ray.data.sft import sft_examples

    assert longest_first([{"n": 2, "i": 0}, {"n": 5, "i": 1}, {"n": 2, "i": 2}], lambda r: r["n"]) == [
        {"n": 5, "i": 1}, {"n": 2, "i": 0}, {"n": 2, "i": 2}]
    raw = [{**d, "_source": "s.jsonl", "_row": i} for i, d in enumerate(sample_dialogues(32, seed=4))]
    grouped, _ = sft_examples(raw, tokenizer, DataConfig(max_length=256, packing=False))
    lengths = [len(r["input_ids"]) for r in grouped]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    plain, _ = sft_examples(raw, tokenizer, DataConfig(max_length=256, packing=False, group_by_length=False))
    assert [r["sample_ids"] for r in plain] == [[f"s.jsonl#{i}"] for i in range(32)]
