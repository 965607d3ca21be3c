"""Held-out rows by prompt: which side of a train/eval split a raw row falls on.

The side is a pure function of (seed, normalised prompt text): no row order, batch or worker matters, so the
split streams (a Ray Data filter over the source), reruns give the same sets, and every dialogue or pair of one
prompt lands on the same side (no prompt is both trained on and evaluated). A mixture of sources can hold out a
share of each through the same ``held_out``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from zephyr_ray.data.rows import parse_row
from zephyr_ray.data.schema import RowProblem

if TYPE_CHECKING:
    import ray.data


def _first_user_turn(messages: Any) -> str | None:
    if not isinstance(messages, list | tuple):
        return None
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str):
            return msg["content"]
    return None


def prompt_text(row: dict[str, Any]) -> str | None:
    """The prompt a row answers: a dialogue's first user turn (after an optional system turn), a preference
    pair's ``prompt`` string, else the first user turn of the turns before its ``chosen`` answer (the same text
    in the ``ultrafeedback_binarized`` schema). None for a row with none (a bad row: validation reports it)."""
    try:
        row = parse_row(row)
    except RowProblem:
        return None
    if "messages" in row:
        return _first_user_turn(row["messages"])
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    chosen = row.get("chosen")
    return _first_user_turn(chosen[:-1]) if isinstance(chosen, list | tuple) else None


def normalize(text: str) -> str:
    """Case and whitespace do not make another prompt."""
    return " ".join(text.split()).casefold()


def held_out(text: str | None, seed: int, fraction: float) -> bool:
    """Whether prompt ``text`` is on the eval side: a hash of seed and normalised text, read as a number in
    [0, 1), below ``fraction``. A row without a prompt stays on the training side."""
    if text is None or fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\x00{normalize(text)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _side(batch: pa.Table, seed: int, fraction: float, keep_held_out: bool) -> pa.Table:
    mask = [held_out(prompt_text(row), seed, fraction) == keep_held_out for row in batch.to_pylist()]
    return batch.filter(pa.array(mask, pa.bool_()))


def split_held_out(rows: ray.data.Dataset, seed: int, fraction: float) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(training rows, held-out rows) of raw ``rows``, as two streaming filters over the same source."""
    def side(keep: bool) -> ray.data.Dataset:
        return rows.map_batches(_side, batch_format="pyarrow",
                                fn_kwargs={"seed": seed, "fraction": fraction, "keep_held_out": keep})

    return side(False), side(True)
