"""AI feedback and self-instruct end to end on the session's Ray cluster with tiny models."""

from __future__ import annotations

import json

import pytest

from zephyr_ray.tracking import numeric_leaves

from .conftest import ROOT, shared_file
from .wandb_records import read_offline_run

pytestmark = [pytest.mark.ray]

PROMPTS = 6


def _aif(out, *extra):
    from zephyr_ray.config import AIFRecipe, load_config

    return load_config(ROOT / "configs/tiny/aif.yaml", [
        f"run.output_dir={out}", f"prompts.limit={PROMPTS}", "sampling.max_new_tokens=8", "wandb.enabled=false",
        *extra], AIFRecipe)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_aif_pairs_are_exact_deterministic_and_feed_dpo(ray_cluster, tmp_path, tiny_model):
    from functools import partial

    from zephyr_ray.config import DataConfig
    from zephyr_ray.data.pipeline import plan
    from zephyr_ray.data.preference import preference_examples
    from zephyr_ray.data.readers import read_rows
    from zephyr_ray.feedback.aif import run_aif

    first = run_aif(_aif(tmp_path / "a", "wandb.enabled=true", "wandb.mode=offline", "wandb.group=zr-aif"))
    report = first.report
    # The stage's summary is one offline W&B run: run.name in the group, aif_report.json's numbers as "/" keys.
    wb = read_offline_run(tmp_path / "a")
    assert (wb.name, wb.group, wb.project) == ("tiny-aif", "zr-aif", "zephyr-ray") and len(wb.history) == 1
    assert wb.history[0] == {**numeric_leaves(json.loads((tmp_path / "a" / "aif_report.json").read_text())),
                             **{k: v for k, v in wb.history[0].items() if k.startswith("_")}}
    assert wb.summary["binarize/pairs"] == first.pairs and wb.summary["judging/completions"] == PROMPTS * 3
    assert {"completions_per_model/tiny-a/completions", "seconds/judge/tiny-judge"} <= wb.history_keys
    assert wb.config["run"]["name"] == "tiny-aif"
    assert report["judging"]["completions"] == PROMPTS * 3
    assert report["judging"]["failed_ratings"] == 0  # expected ratings never fail to parse
    assert {m: s["completions"] for m, s in report["completions_per_model"].items()} == \
        {"tiny-a": PROMPTS, "tiny-b": PROMPTS, "tiny-c": PROMPTS}
    assert first.pairs == PROMPTS - first.skipped == report["binarize"]["pairs"]
    assert first.pairs >= PROMPTS - 1  # three random models rarely tie exactly on a continuous score
    pairs = _lines(first.path)
    scored = _lines_parquet(tmp_path / "a" / "scores" / "tiny-judge")
    by_prompt = {}
    for row in scored:
        assert 1.0 <= row["score"] <= 5.0
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    for pair in pairs:
        group = by_prompt[pair["prompt_id"]]
        assert pair["score_chosen"] == max(r["score"] for r in group)
        assert pair["score_rejected"] < pair["score_chosen"]
        assert pair["chosen"][-1]["content"] == next(r["completion"] for r in group if r["model"] == pair["chosen_model"])
        assert pair["judge"] == "tiny-judge" and len(pair["candidates"]) == 3
    # Same config, fresh directory: the same pairs byte for byte.
    second = run_aif(_aif(tmp_path / "b"))
    assert second.path.read_text() == first.path.read_text()
    # The dDPO stage's own planning pass reads the pairs unchanged.
    examples = partial(preference_examples, max_prompt_length=128)
    data = plan(read_rows(str(first.path)), examples, tiny_model, DataConfig(max_length=256))
    assert data.used == first.pairs and not data.skipped


def _lines_parquet(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]).to_pylist()


def test_two_judges_are_averaged_with_agreement_reported(ray_cluster, tmp_path):
    from zephyr_ray.feedback.aif import run_aif

    judge = "{engine: {name: %s, backend: transformers, tiny_seed: %d, rows_per_task: 32}, mode: expected}"
    result = run_aif(_aif(tmp_path / "two", f"judges=[{judge % ('j1', 4)},{judge % ('j2', 5)}]"))
    rows = _lines_parquet(tmp_path / "two" / "scores" / "j2")
    for row in rows:
        scores = [j["score"] for j in row["judgements"]]
        assert [j["judge"] for j in row["judgements"]] == ["j1", "j2"]
        assert row["score"] == pytest.approx(sum(scores) / 2)
    agreement = result.report["binarize"]["agreement"]
    assert agreement["judges"] == 2 and agreement["prompts"] == PROMPTS


def test_judge_and_binarize_on_shared_pregenerated_completions(ray_cluster, tmp_path):
    from zephyr_ray.feedback.aif import run_aif

    path = shared_file("alpaca_eval", "completions.jsonl")
    result = run_aif(_aif(tmp_path / "shared", f"completions={path}", "prompts.limit=12",
                          "judges.0.engine.max_prompt_length=512"))
    models = result.report["completions_per_model"]
    assert len(models) == 4 and all(s["completions"] == 12 for s in models.values())
    assert result.pairs + result.skipped == 12


def test_selfinstruct_writes_valid_multi_turn_dialogues(ray_cluster, tmp_path):
    from zephyr_ray.config import SelfInstructRecipe, load_config
    from zephyr_ray.data.schema import validate_messages
    from zephyr_ray.feedback.selfinstruct import run_selfinstruct

    cfg = load_config(ROOT / "configs/tiny/selfinstruct.yaml",
                      [f"run.output_dir={tmp_path}", "prompts.limit=8", "sampling.max_new_tokens=8"], SelfInstructRecipe)
    rows = _lines(run_selfinstruct(cfg))
    report = json.loads((tmp_path / "selfinstruct_report.json").read_text())
    assert report["seeds"] == 8 and report["dialogues"] == len(rows)
    assert len(rows) + sum(report["dropped"].values()) == 8
    for row in rows:
        messages = validate_messages(row["messages"])
        assert messages[0]["content"] == row["prompt"]
        assert len(messages) in (2, 4)  # 1 or 2 exchanges (turns=2; an empty turn ends a dialogue early)
