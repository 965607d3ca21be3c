"""The windowed shuffle of zephyr_ray.data.pipeline (no Ray): each window is a seeded permutation that does not
depend on the process (so a restart sees the same order), and a resume that skips the rows already trained
trains exactly the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from zephyr_ray.config import ConfigError, DataConfig, load_config
from zephyr_ray.data.pipeline import _shuffle_window, window_order


def _stream(rows: list[dict], window: int, seed: int) -> list[dict]:
    """What _shuffled streams: each window of the input in its own seeded order."""
    out = []
    for i in range(0, len(rows), window):
        table = pa.Table.from_pylist(rows[i:i + window])
        out += _shuffle_window(table, seed).to_pylist()
    return out


def test_window_is_a_seeded_permutation_within_the_window():
    rows = [{"prompt": f"p{i}", "n": i} for i in range(10)]
    out = _stream(rows, window=4, seed=7)
    assert sorted(r["n"] for r in out[:4]) == [0, 1, 2, 3]  # nothing leaves its window
    assert sorted(r["n"] for r in out[4:8]) == [4, 5, 6, 7]
    assert sorted(r["n"] for r in out[8:]) == [8, 9]
    assert [r["n"] for r in out] != list(range(10))
    assert _stream(rows, 4, 7) == out  # same seed, same order
    assert _stream(rows, 4, 8) != out  # another seed, another order
    assert window_order(1, 0, {"a": 1}) == [0]
    assert sorted(window_order(1000, 3, {"a": 1})) == list(range(1000))


def test_order_does_not_depend_on_the_process():
    """Python's hash() is salted per process: the order must come from the seed and the rows alone."""
    code = ("import json; from zephyr_ray.data.pipeline import window_order; "
            "print(json.dumps(window_order(50, 5, {'prompt': 'x', 'messages': [{'role': 'user'}]})))")
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout) for h in (1, 2)]
    assert runs[0] == runs[1] == window_order(50, 5, {"prompt": "x", "messages": [{"role": "user"}]})


def test_resume_skips_exactly_the_rows_already_trained():
    rows = [{"prompt": f"p{i}"} for i in range(37)]
    first = _stream(rows, window=8, seed=0)
    trained = 13  # rows consumed before the kill (the loop skips micro_batches_in_epoch on restart)
    after_restart = _stream(rows, window=8, seed=0)[trained:]
    assert after_restart == first[trained:]
    assert sorted(r["prompt"] for r in first[:trained] + after_restart) == sorted(r["prompt"] for r in rows)


def test_shuffle_window_is_validated():
    assert DataConfig().shuffle_window == 8192
    with pytest.raises(ConfigError, match="data.shuffle_window=0"):
        load_config(None, ["data.shuffle_window=0"])
