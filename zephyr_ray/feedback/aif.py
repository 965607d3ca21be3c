"""The AIF stage (``zephyr-ray aif``): candidates answer → judges rate → best vs a random lower pair.

Every model step is a resumable actor pool (:mod:`zephyr_ray.generation.pool`) writing under
``run.output_dir``: ``completions/<candidate>/``, ``scores/<judge>/``. Judges run one after the other,
each over the previous one's output, so a completion carries every judge's ratings and the mean.
The pairs (``pairs.jsonl``, the dDPO input) and ``aif_report.json`` are written last.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import AIFRecipe, JudgeConfig, PromptsConfig, resolve_path, to_dict
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.prompts import validate_completions
from zephyr_ray.data.readers import read_rows
from zephyr_ray.data.rows import DataReport, raise_bad_row, valid_rows
from zephyr_ray.feedback.binarize import binarize, group_by_prompt
from zephyr_ray.feedback.judge import score_batch, summarize_judging
from zephyr_ray.generation.pool import KEY, resolve_engine, run_pool
from zephyr_ray.generation.run import generate, load_prompts
from zephyr_ray.generation.types import Engine
from zephyr_ray.judging import load_templates
from zephyr_ray.tracking import log_summary_run, write_summary

log = logging.getLogger(__name__)


@dataclass
class AIFResult:
    path: Path
    pairs: int
    skipped: int
    report: dict[str, Any]


def _completion_key(row: dict[str, Any]) -> str:
    return f"{row['model']}\x1f{row['sample']}\x1f{row['prompt_id']}"


def _keyed_completions(batch: pa.Table) -> pa.Table:
    keys = [_completion_key(r) for r in batch.select(["model", "sample", "prompt_id"]).to_pylist()]
    return batch.drop_columns([KEY]).append_column(KEY, pa.array(keys, pa.string()))


def _completion_batch(batch: pa.Table, on_bad_row: str) -> pa.Table:
    rows = [r for _, group in valid_rows(batch.to_pylist(), validate_completions, on_bad_row, DataReport())
            for r in group]
    return pa.Table.from_pylist([{KEY: _completion_key(r), **r} for r in rows])


def load_completions(path: str, prompts: PromptsConfig) -> ray.data.Dataset:
    """Pre-generated completions (flat or grouped per prompt), validated, keyed per completion;
    ``prompts.limit`` / ``on_bad_row`` / ``format`` / ``split`` apply to this file's rows."""
    rows = read_rows(resolve_path(path), prompts.format, prompts.split, prompts.limit)
    try:
        return rows.map_batches(_completion_batch, batch_format="pyarrow",
                                fn_kwargs={"on_bad_row": prompts.on_bad_row}).materialize()
    except Exception as exc:
        raise_bad_row(exc)
        raise


def judge_work(engine: Engine, units: list[dict[str, Any]], *, cfg: JudgeConfig, templates: dict[str, str]
               ) -> list[dict[str, Any]]:
    """Rate each completion on every aspect; the judge sees the whole conversation (``messages``)."""
    rows = [{**u, "prompt": u["messages"]} for u in units]
    scored = score_batch(engine, rows, templates=templates, mode=cfg.mode, params=cfg.sampling,
                         max_attempts=cfg.max_attempts, judge=cfg.engine.name)
    return [{**row, "prompt": unit["prompt"]} for row, unit in zip(scored, units, strict=True)]


def _judge(completions: ray.data.Dataset, judge: JudgeConfig, out: Path) -> pa.Table:
    engine = resolve_engine(judge.engine, out / "models")
    templates = load_templates(resolve_path(judge.templates), judge.aspects)
    work = partial(judge_work, cfg=judge, templates=templates)
    table = run_pool(completions, engine, work, out / "scores" / engine.name, f"judge [{engine.name}]")
    assert table is not None
    return table


def _candidates(cfg: AIFRecipe, out: Path, seconds: dict[str, float]) -> ray.data.Dataset:
    if cfg.completions:
        return load_completions(cfg.completions, cfg.prompts)
    prompts = load_prompts(cfg.prompts)
    tables = []
    for c in cfg.candidates:
        start = time.perf_counter()
        tables.append(generate(prompts, c, cfg.sampling, out))
        seconds[f"generate/{c.name}"] = time.perf_counter() - start
    return ray.data.from_arrow(pa.concat_tables(tables, promote_options="default")).map_batches(
        _keyed_completions, batch_format="pyarrow")


def run_aif(cfg: AIFRecipe) -> AIFResult:
    cfg, out = open_run(cfg)
    ensure_ray()
    seconds: dict[str, float] = {}  # wall time per model step (a resumed step only counts what it redid)
    scored = _candidates(cfg, out, seconds)
    for judge in cfg.judges:
        start = time.perf_counter()
        table = _judge(scored, judge, out)
        seconds[f"judge/{judge.engine.name}"] = time.perf_counter() - start
        scored = ray.data.from_arrow(table)
    rows = table.sort_by([(KEY, "ascending")]).to_pylist()
    pairs, binarized = binarize(group_by_prompt(rows), seed=cfg.seed)
    pairs.sort(key=lambda p: p["prompt_id"])
    report = {"judging": summarize_judging(rows), "binarize": binarized.to_dict(),
              "completions_per_model": _per_model(rows), "seconds": seconds}
    write_summary(out / "aif_report.json", report)
    path = out / "pairs.jsonl"
    write_jsonl(pairs, path)
    log.info("AI feedback:\n%s\njudging: %s\npairs: %s", binarized.summary(), report["judging"], path.absolute())
    log_summary_run(cfg.wandb, cfg.run.name, out, report, config=to_dict(cfg))
    skipped = sum(binarized.skipped.values())
    return AIFResult(path, len(pairs), skipped, report)


def _per_model(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = stats.setdefault(r["model"], {"completions": 0, "scored": 0, "mean_score": 0.0})
        s["completions"] += 1
        if r.get("score") is not None:
            s["scored"] += 1
            s["mean_score"] += r["score"]
    for s in stats.values():
        s["mean_score"] = s["mean_score"] / s["scored"] if s["scored"] else None
    return stats
