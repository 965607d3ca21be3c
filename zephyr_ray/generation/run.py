"""The generate stage: prompts → completions of one engine, on an actor pool (``zephyr-ray generate``)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import EngineConfig, GenerateRecipe, PromptsConfig, resolve_path
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.prompts import prompt_rows
from zephyr_ray.data.readers import read_rows
from zephyr_ray.data.rows import raise_bad_row
from zephyr_ray.generation import check_params
from zephyr_ray.generation.pool import KEY, resolve_engine, run_pool
from zephyr_ray.generation.types import Engine, SamplingParams

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


def _prompt_batch(batch: pa.Table, on_bad_row: str) -> pa.Table:
    rows, _ = prompt_rows(batch.to_pylist(), on_bad_row)
    return pa.Table.from_pylist([{KEY: r["prompt_id"], **r} for r in rows], schema=prompt_schema())


def prompt_schema() -> pa.Schema:
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([(KEY, pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()), ("messages", pa.list_(turn))])


def load_prompts(cfg: PromptsConfig) -> ray.data.Dataset:
    """Validated prompts keyed by ``prompt_id`` (materialized: they are small and read more than once).
    A repeated ``prompt_id`` is an error: resume and binarization key on it."""
    rows = read_rows(resolve_path(cfg.path), cfg.format, cfg.split, cfg.limit)
    try:
        prompts = rows.map_batches(_prompt_batch, batch_format="pyarrow", fn_kwargs={"on_bad_row": cfg.on_bad_row})
        prompts = prompts.materialize()
    except Exception as exc:
        raise_bad_row(exc)
        raise
    ids = Counter(prompts.to_pandas()["prompt_id"])
    repeated = [pid for pid, n in ids.items() if n > 1]
    if repeated:
        raise ValueError(f"{cfg.path}: {len(repeated)} prompt_id values occur more than once, e.g. {repeated[:3]}")
    if not ids:
        raise ValueError(f"{cfg.path}: no usable prompts")
    return prompts


def generate_work(engine: Engine, units: list[dict[str, Any]], *, params: SamplingParams, model: str) -> list[dict[str, Any]]:
    """One output row per completion: the prompt, the model, its sampling params and token accounting."""
    completions = engine.generate([u["messages"] for u in units], params)
    sampling = json.dumps(asdict(params))
    return [
        {KEY: u[KEY], "prompt_id": u["prompt_id"], "prompt": u["prompt"], "messages": u["messages"], "model": model,
         "sample": i, "completion": c.text, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
         "finish_reason": c.finish_reason, "sampling": sampling}
        for u, outs in zip(units, completions, strict=True)
        for i, c in enumerate(outs)
    ]


def generate(prompts: ray.data.Dataset, engine: EngineConfig, params: SamplingParams, out_dir: Path) -> pa.Table:
    """Completions of ``engine`` for every prompt, in ``out_dir/completions/<engine.name>`` (resumable)."""
    check_params(params)
    engine = resolve_engine(engine, out_dir / "models")
    work = partial(generate_work, params=params, model=engine.name)
    table = run_pool(prompts, engine, work, out_dir / "completions" / engine.name, f"generate [{engine.name}]")
    assert table is not None  # load_prompts guarantees at least one prompt
    return table


def run_generate(cfg: GenerateRecipe) -> Path:
    cfg, out = open_run(cfg)
    ensure_ray()
    table = generate(load_prompts(cfg.prompts), cfg.engine, cfg.sampling, out)
    table = table.sort_by([("prompt_id", "ascending"), ("sample", "ascending")]).drop_columns([KEY])
    path = write_jsonl(table.to_pylist(), out / "completions.jsonl")
    log.info("%d completions in %s", table.num_rows, path)
    return path
