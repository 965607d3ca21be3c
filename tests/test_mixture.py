"""data.mixture: weights, column mapping, per-source held-out share, the report, and the errors (no Ray)."""

import json
from pathlib import Path

import pytest

from zephyr_ray.config import ConfigError, DPORecipe, MixtureSource, PipelineRecipe, SFTRecipe, load_config
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.mixture import mix
from zephyr_ray.data.preference import validate_pair
from zephyr_ray.data.rows import DataReport, parse_row, row_ref, valid_rows
from zephyr_ray.data.schema import validate_messages
from zephyr_ray.data.split import held_out, prompt_text
from zephyr_ray.inputs import check_paths

from .conftest import ROOT

TINY_PIPELINE = ROOT / "configs" / "tiny" / "pipeline.yaml"


def _dialogue(q: str, a: str = "ok") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture
def two_sources(tmp_path) -> tuple[Path, Path]:
    a = write_jsonl([_dialogue(f"a{i}") for i in range(10)], tmp_path / "a.jsonl")
    b = write_jsonl([_dialogue(f"b{i}") for i in range(4)], tmp_path / "b.jsonl")
    return a, b


def _prompts(rows: list[dict]) -> list[str]:
    return [prompt_text(r) for r in rows]


def test_weights_take_exact_row_counts_seeded_and_stable(two_sources):
    a, b = two_sources
    sources = [MixtureSource(path=str(a), weight=0.5), MixtureSource(path=str(b), weight=2.0)]
    mixed = mix(sources, seed=0)
    # 10 x 0.5 = 5 rows of a (a seeded half, in file order), 4 x 2.0 = 8 rows of b (every row twice).
    assert _prompts(mixed.train) == ["a0", "a3", "a5", "a6", "a7", "b0", "b1", "b2", "b3", "b0", "b1", "b2", "b3"]
    assert mixed.held_out == []
    assert _prompts(mix(sources, seed=0).train) == _prompts(mixed.train)  # same seed, same rows
    assert _prompts(mix(sources, seed=1).train)[:5] != _prompts(mixed.train)[:5]
    # 2.5: every row twice plus a seeded half (4 x 0.5 = 2 more).
    extra = mix([MixtureSource(path=str(b), weight=2.5)], seed=0).train
    assert _prompts(extra) == ["b0", "b1", "b2", "b3"] * 2 + ["b2", "b3"]
    # Rows keep where they came from: file and 1-based line.
    assert str(row_ref(mixed.train[0])) == f"{a} line 1"
    assert str(row_ref(mixed.train[5])) == f"{b} line 1"


def test_column_mapping_feeds_the_stage_validators(tmp_path):
    chats = write_jsonl([{"id": 7, "conversations": _dialogue("hi", "hello")["messages"]}], tmp_path / "chats.jsonl")
    prefs = write_jsonl([{"question": "2+2?", "good": "4", "bad": "5", "source": "x"}], tmp_path / "prefs.jsonl")
    sft = mix([MixtureSource(path=str(chats), columns={"conversations": "messages"})], seed=0).train
    row = parse_row(sft[0])
    assert row == {"id": 7, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert validate_messages(row["messages"])[-1]["content"] == "hello"
    dpo = mix([MixtureSource(path=str(prefs), columns={"question": "prompt", "good": "chosen", "bad": "rejected"})],
              seed=0).train
    row = parse_row(dpo[0])
    assert row == {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source": "x"}
    pair = validate_pair(row)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([{"role": "user", "content": "2+2?"}], "4", "5")


def test_a_mapped_column_no_row_has_names_source_column_and_file(two_sources):
    a, _ = two_sources
    with pytest.raises(ConfigError, match=rf"data.mixture\[0\] \({a}\): columns maps 'conversations', which no row "
                                          rf"of {a} has; its columns: messages"):
        mix([MixtureSource(path=str(a), columns={"conversations": "messages"})], seed=0)


def test_parquet_source_rows_are_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "x?", "good": "y", "bad": "z"}] * 3), path)
    rows = mix([MixtureSource(path=str(path), columns={"q": "prompt", "good": "chosen", "bad": "rejected"})], 0).train
    assert [str(row_ref(r)) for r in rows] == [f"{path} row {i}" for i in range(3)]
    assert validate_pair(parse_row(rows[2])).chosen == "y"


def test_held_out_share_per_source_is_by_prompt_and_disjoint(tmp_path):
    # 20 prompts, 2 dialogues each (different answers): a prompt's dialogues land on one side together.
    rows = [_dialogue(f"question {i}", answer) for i in range(20) for answer in ("x", "y")]
    path = write_jsonl(rows, tmp_path / "d.jsonl")
    other = write_jsonl([_dialogue(f"other {i}") for i in range(6)], tmp_path / "o.jsonl")
    mixed = mix([MixtureSource(path=str(path), weight=2.0, eval_fraction=0.3), MixtureSource(path=str(other))], seed=0)
    held = _prompts(mixed.held_out)
    train = _prompts(mixed.train)
    assert held and not set(held) & set(train)
    # The same rule as data.eval_fraction: split.held_out of (seed, prompt text, fraction).
    expected = [f"question {i}" for i in range(20) if held_out(f"question {i}", 0, 0.3)]
    assert held == [p for p in expected for _ in range(2)]  # each held-out row once, not weighted
    k = len(held)
    assert sorted(set(train)) == sorted({f"question {i}" for i in range(20)} - set(expected) | {f"other {i}" for i in range(6)})
    assert len(train) == 2 * (40 - k) + 6
    assert mixed.report() == [
        {"index": 0, "path": str(path), "weight": 2.0, "eval_fraction": 0.3, "rows": 40, "held_out": k,
         "used": 2 * (40 - k)},
        {"index": 1, "path": str(other), "weight": 1.0, "eval_fraction": 0.0, "rows": 6, "held_out": 0, "used": 6},
    ]


def test_malformed_lines_stay_bad_rows_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_dialogue("fine")) + "\n{not json\n")
    rows = mix([MixtureSource(path=str(path), columns={"messages": "messages"})], seed=0).train
    report = DataReport()
    good = list(valid_rows(rows, lambda r: validate_messages(r.get("messages")), "skip", report))
    assert len(good) == 1 and report.rows == 2
    assert list(report.skipped) == ["<json>: malformed JSON (Expecting property name enclosed in double quotes at column 2)"]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_config_errors_name_the_source(tmp_path, two_sources):
    a, b = two_sources
    mixture = f"data:\n  mixture:\n    - {{path: {a}, weight: 0.5}}\n    - {{path: {b}, weight: 0}}\n"
    with pytest.raises(ConfigError, match=rf"data.mixture\[1\].weight=0.0: must be > 0 \(source {b}\)"):
        load_config(_yaml(tmp_path, mixture), schema=SFTRecipe)
    both = f"data:\n  path: {a}\n  mixture:\n    - {{path: {b}}}\n"
    with pytest.raises(ConfigError, match=r"data.path=.*a.jsonl': is exclusive with data.mixture \(1 sources\)"):
        load_config(_yaml(tmp_path, both), schema=DPORecipe)
    with pytest.raises(ConfigError, match=r"data.eval_fraction=0.1: .* data.mixture\[i\].eval_fraction per source"):
        load_config(_yaml(tmp_path, f"data:\n  eval_fraction: 0.1\n  mixture:\n    - {{path: {b}}}\n"))
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].eval_fraction=1.5: must be within \[0, 1\)"):
        load_config(_yaml(tmp_path, f"data:\n  mixture:\n    - {{path: {b}, eval_fraction: 1.5}}\n"))
    # The default data.path (or null) goes with a mixture; the file check runs before Ray starts.
    missing = tmp_path / "missing.jsonl"
    cfg = load_config(_yaml(tmp_path, f"data:\n  path: null\n  mixture:\n    - {{path: {a}}}\n    - {{path: {missing}}}\n"))
    assert [s.path for s in cfg.data.mixture] == [str(a), str(missing)]
    with pytest.raises(ConfigError, match=rf"data.mixture.1.path={missing}: no such file or folder"):
        check_paths(cfg)
    with pytest.raises(ConfigError, match=rf"data.mixture\[1\] \({missing}\): .*No such file or directory"):
        mix(cfg.data.mixture, cfg.data.seed)


def test_pipeline_adds_the_aif_pairs_as_one_more_source(tmp_path, two_sources):
    from zephyr_ray.pipeline import dpo_config

    a, _ = two_sources
    cfg = load_config(TINY_PIPELINE, ["dpo.data.path=null", f"dpo.data.mixture=[{{path: {a}, weight: 0.5}}]"], schema=PipelineRecipe)
    dpo = dpo_config(cfg, tmp_path, "sft-model", "pairs.jsonl")
    assert [(s.path, s.weight) for s in dpo.data.mixture] == [(str(a), 0.5), ("pairs.jsonl", 1.0)]
    assert dpo.data.path == cfg.dpo.data.path  # untouched: the mixture is the data
    plain = dpo_config(load_config(TINY_PIPELINE, schema=PipelineRecipe), tmp_path, "sft-model", "pairs.jsonl")
    assert plain.data.path == "pairs.jsonl" and plain.data.mixture == []
