"""Readers and the planning pass on the session's Ray cluster."""

import json

import pytest

from zephyr_ray.config import DataConfig
from zephyr_ray.data.readers import detect_format, read_rows
from zephyr_ray.data.rows import parse_row
from zephyr_ray.data.schema import BadRowError

pytestmark = pytest.mark.ray

ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]


def _write_all(tmp_path):
    import datasets
    import pandas as pd

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in ROWS[2:]) + "\n")
    parquet = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    hf = tmp_path / "hf"
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(ROWS)}).save_to_disk(hf)
    return jsonl, parquet, hf


def test_formats_keep_provenance(ray_cluster, tmp_path):
    jsonl, parquet, hf = _write_all(tmp_path)
    assert [detect_format(str(p)) for p in (jsonl, parquet, hf)] == ["jsonl", "parquet", "hf_disk"]
    assert detect_format("HuggingFaceH4/ultrachat_200k") == "hf_hub"
    with pytest.raises(FileNotFoundError):
        detect_format(str(tmp_path / "nope.txt"))

    got = sorted(read_rows(str(jsonl)).take_all(), key=lambda r: r["_row"])
    assert [r["_row"] for r in got] == [1, 2, 4, 5, 6]  # line numbers; the blank line 3 is not a row
    assert [parse_row(r) for r in got] == ROWS
    got = sorted(read_rows(str(parquet)).take_all(), key=lambda r: r["_row"])
    assert [r["_row"] for r in got] == [0, 1, 2, 3, 4] and got[0]["_source"].endswith("d.parquet")
    assert [parse_row(r)["messages"] for r in got] == [r["messages"] for r in ROWS]
    got = read_rows(str(hf), split="train_sft").take_all()
    assert {r["_source"] for r in got} == {f"{hf}[train_sft]"} and len(got) == 5
    with pytest.raises(ValueError, match="no split 'train'"):
        read_rows(str(hf))
    assert read_rows(str(parquet), limit=3).count() == 3


def test_plan_reports_skips_and_errors_name_the_row(ray_cluster, tiny_model, tmp_path):
    from zephyr_ray.data.pipeline import plan
    from zephyr_ray.data.sft import sft_examples

    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}))
    path.write_text("\n".join(lines) + "\n")
    report = plan(read_rows(str(path)), sft_examples, tiny_model, DataConfig(on_bad_row="skip", max_length=64))
    assert (report.rows, report.used) == (6, 5)
    assert dict(report.skipped) == {"messages[*].role: expected 'assistant' (system? then alternating user/assistant), got 'user'": 1}
    with pytest.raises(BadRowError, match=rf"{path} line 4: field messages\[1\].role"):
        plan(read_rows(str(path)), sft_examples, tiny_model, DataConfig(on_bad_row="error", max_length=64))
