"""Packing sequences into rows of at most ``max_length`` tokens, and collating rows into batches.

Each packed row carries ``position_ids`` that restart at 0 for every sequence, which keep attention from
crossing sequences: ``attention.sdpa_varlen`` (and flash-attention) split the row at the restarts; other
attentions get a block-diagonal causal mask built from them by transformers (families that take no
``position_ids``, MPT, get that mask explicitly: ``train.losses.packed_inputs``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from zephyr_ray.data.tokenize import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths``, longest first, each into the fullest bin it still fits."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in rows of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            space, b = capacity - lengths[i], len(bins) - 1
        else:
            space, b = free.pop(pos)
            bins[b].append(i)
            space -= lengths[i]
        bisect.insort(free, (space, b))
    return bins


def longest_first(rows: list[dict[str, Any]], length: Any) -> list[dict[str, Any]]:
    """``rows`` by ``length(row)`` descending, ties in their given order: consecutive micro-batches then
    hold rows of similar length (little padding), and the longest come first (memory problems show early)."""
    return sorted(rows, key=lambda r: -length(r))


def pack_sequences(seqs: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Concatenate each bin's sequences; ``sample_ids`` lists what went into each row."""
    rows = []
    for b in best_fit_decreasing([len(s["input_ids"]) for s in seqs], max_length):
        ids, labels, pos, sample_ids = [], [], [], []
        for i in b:
            n = len(seqs[i]["input_ids"])
            ids += seqs[i]["input_ids"]
            labels += seqs[i]["labels"]
            pos += range(n)
            sample_ids.append(seqs[i]["sample_id"])
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "sample_ids": sample_ids})
    return rows


def collate(batch: dict[str, np.ndarray], pad_id: int, pad_to_multiple_of: int = 8, one_row: bool = False
            ) -> dict[str, Any]:
    """Right-pad ragged rows into tensors. Padding continues the last sequence's positions: causal
    attention keeps real tokens from seeing it, its labels are ignored, and a batch of unpacked rows
    keeps plain ``arange`` positions, so transformers takes its causal fast path (SDPA ``is_causal``)
    instead of building a block mask for "packed" rows.

    ``one_row``: the rows concatenated into a single one (no padding between them), for an attention that
    keeps packed sequences apart by ``position_ids`` alone (``attention.allows_one_row``). ``row_lengths`` keeps
    each given row's length either way."""
    import torch

    row_lengths = [len(r) for r in batch["input_ids"]]
    if one_row:
        batch = {**batch, **{k: [np.concatenate([np.asarray(r, dtype=np.int64) for r in batch[k]])]
                             for k in ("input_ids", "labels", "position_ids")},
                 "sample_ids": [[s for ids in batch["sample_ids"] for s in ids]]}
    rows = batch["input_ids"]
    width = max(len(r) for r in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    for r in range(n):
        k = len(rows[r])
        input_ids[r, :k] = rows[r]
        labels[r, :k] = batch["labels"][r]
        position_ids[r, :k] = batch["position_ids"][r]
        start = position_ids[r, k - 1] + 1 if k else 0
        position_ids[r, k:] = np.arange(start, start + width - k)
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "sample_ids": [list(s) for s in batch["sample_ids"]],
        "row_lengths": row_lengths,
    }
    return out
