"""The leaderboard stage (``zephyr-ray leaderboard``): Open LLM Leaderboard-style multiple-choice log-likelihood
benchmarks (ARC, HellaSwag, MMLU, TruthfulQA-MC2 or any task file in that format) for several models.

``backend: native`` (default): the driver reads every task file, builds each row's few-shot context and its
continuations (``zephyr_ray/eval/leaderboard.py``); one resumable actor pool per model
(:func:`zephyr_ray.generation.pool.run_pool`, the model's ``EngineConfig``: actors, CPUs/GPUs, batch size) tokenizes
them at lm-eval's token boundary and scores them (``zephyr_ray/eval/loglikelihood.py``), writing Parquet parts
under ``loglik/<model>/`` (a unit = one row; its key hashes the context and continuations, so a rerun redoes only
what is missing or changed). ``backend: lm_eval``: lm-evaluation-harness's ``simple_evaluate`` on each model's HF
folder, one call per task, in a Ray task with the model's resources: a task with ``lm_eval_task`` is the harness's
own (e.g. ``arc_challenge``, downloaded by it); one without is this task's file, handed to the harness as a task config
(scored rows and few-shot pool written under ``lm_eval_tasks/``, prompts and per-row metrics from
``zephyr_ray/eval/leaderboard.py``), so the harness's batching, token split and log-likelihoods score exactly the
native prompts (few-shot examples drawn by its sampler).

Written to ``run.output_dir``: ``results.json`` (per model and task: acc, acc_norm or mc2, their standard errors,
n, num_fewshot; the average of the headline metrics), ``report.md``, and (native) ``details/<model>/<task>.jsonl``
(each row's log-likelihoods and metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
import torch

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import EngineConfig, LeaderboardRecipe, LeaderboardTaskConfig, resolve_path, to_dict
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.rows import parse_row, row_ref
from zephyr_ray.data.schema import BadRowError, RowProblem
from zephyr_ray.eval import leaderboard as lb
from zephyr_ray.eval.inputs import read_input_rows
from zephyr_ray.eval.loglikelihood import loglikelihood
from zephyr_ray.eval.mt_bench import digest
from zephyr_ray.generation.pool import KEY, resolve_engine, run_pool
from zephyr_ray.models import DTYPES, tiny_label
from zephyr_ray.tracking import log_summary_run, write_summary

log = logging.getLogger(__name__)

LM_EVAL_EXTRA = "pip install 'zephyr-ray[leaderboard]'  (lm-eval>=0.4)"


@dataclass
class LeaderboardResult:
    dir: Path
    results: dict[str, Any]
    report: Path


@dataclass
class TaskData:
    cfg: LeaderboardTaskConfig
    docs: list[lb.Doc]  # the scored rows
    contexts: list[str]
    pool: list[lb.Doc]  # few-shot examples are drawn from these


# ---------------------------------------------------------------------------------------------------
# Checks and inputs
# ---------------------------------------------------------------------------------------------------

def import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise RuntimeError(f"leaderboard backend lm_eval needs lm-evaluation-harness: {LM_EVAL_EXTRA}") from exc
    return lm_eval


def check_recipe(cfg: LeaderboardRecipe) -> None:
    """What the loaded config cannot tell: backend lm_eval needs lm-evaluation-harness installed (the rules
    between fields are ``LeaderboardRecipe.problems``, checked when the config loads)."""
    if cfg.backend == "lm_eval":
        import_lm_eval()


def _docs(path: str, metric: str) -> list[lb.Doc]:
    """The task file's rows as validated docs; a bad row raises naming file, line and field."""
    docs = []
    for row in read_input_rows(resolve_path(path)):
        ref = row_ref(row)
        try:
            docs.append(lb.parse_doc(parse_row(row), metric, str(ref)))
        except RowProblem as problem:
            raise BadRowError(f"{ref}: {problem}") from None
    return docs


def load_task(t: LeaderboardTaskConfig, seed: int) -> TaskData:
    """The scored rows of a task and each one's few-shot context."""
    docs = _docs(t.path, t.metric)
    if t.fewshot_path:
        pool, scored = _docs(t.fewshot_path, t.metric), docs
    else:
        k = t.num_fewshot if t.fewshot_pool is None else t.fewshot_pool
        pool, scored = docs[:k], docs[k:]
    if t.limit is not None:
        scored = scored[:t.limit]
    if not scored:
        raise ValueError(f"task {t.name}: no rows left to score in {t.path} (after {len(pool)} few-shot rows)")
    if len(pool) < t.num_fewshot:
        raise ValueError(f"task {t.name}: {t.num_fewshot} few-shot examples asked, the pool has {len(pool)} "
                         f"({t.fewshot_path or t.path})")
    contexts = [lb.fewshot_context(d, t.format, lb.sample_fewshot(pool, t.num_fewshot, seed, t.name, i, exclude=d),
                                   t.description) for i, d in enumerate(scored)]
    return TaskData(t, scored, contexts, pool)


# ---------------------------------------------------------------------------------------------------
# Native scoring on the actor pool
# ---------------------------------------------------------------------------------------------------

def loglikelihood_work(engine: Any, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool ``work``: every continuation of every unit scored on the actor's transformers model."""
    if not hasattr(engine, "model") or not hasattr(engine, "tokenizer"):
        raise TypeError(f"leaderboard scoring needs a transformers engine, got {type(engine).__name__}")
    tok = engine.tokenizer
    encode, prefix = lb.hf_encoder(tok), lb.prefix_token(tok)
    requests, spans = [], []
    for u in units:
        pairs = [lb.encode_pair(encode, u["context"], cont, prefix) for cont in u["continuations"]]
        spans.append((len(requests), len(pairs)))
        requests += pairs
    scored = loglikelihood(engine.model, tok, requests, batch_size=engine.cfg.batch_size)
    out = []
    for u, (start, n) in zip(units, spans):
        part = scored[start:start + n]
        out.append({KEY: u[KEY], "task": u["task"], "doc": u["doc"], "lls": [ll for ll, _ in part],
                    "greedy": [g for _, g in part],
                    "continuation_tokens": [len(requests[start + j][1]) for j in range(n)],
                    "context_tokens": len(requests[start][0])})
    return out


def _units(tasks: list[TaskData]) -> list[dict[str, Any]]:
    units = []
    for td in tasks:
        t = td.cfg
        for i, (doc, ctx) in enumerate(zip(td.docs, td.contexts)):
            conts = [cont for _, cont in lb.requests_for(doc, t.format, ctx)]
            units.append({KEY: f"{t.name}|{i}#{digest(ctx, conts)}", "task": t.name, "doc": i, "context": ctx,
                          "continuations": conts})
    return units


def _schema() -> pa.Schema:
    return pa.schema([(KEY, pa.string()), ("task", pa.string()), ("doc", pa.int64()), ("context", pa.string()),
                      ("continuations", pa.list_(pa.string()))])


def _score_native(engine: EngineConfig, units: list[dict[str, Any]], out: Path) -> dict[str, dict[str, Any]]:
    ds = ray.data.from_arrow(pa.Table.from_pylist(units, schema=_schema()))
    table = run_pool(ds, engine, loglikelihood_work, out / "loglik" / engine.name, f"leaderboard [{engine.name}]")
    wanted = {u[KEY] for u in units}
    rows = {r[KEY]: r for r in (table.to_pylist() if table is not None else []) if r[KEY] in wanted}
    if wanted - rows.keys():
        raise RuntimeError(f"leaderboard [{engine.name}]: {len(wanted - rows.keys())} of {len(wanted)} rows unscored")
    return rows


def _native_model(engine: EngineConfig, tasks: list[TaskData], units: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    scored = _score_native(engine, units, out)
    by_task: dict[str, Any] = {}
    for td in tasks:
        t = td.cfg
        per_doc, details = [], []
        for u in (u for u in units if u["task"] == t.name):
            doc, row = td.docs[u["doc"]], scored[u[KEY]]
            m = lb.doc_metrics(doc, t.format, row["lls"])
            per_doc.append(m)
            details.append({"doc": u["doc"], "gold": doc.gold, "labels": doc.labels, "lls": row["lls"],
                            "greedy": row["greedy"], "context_tokens": row["context_tokens"], **m})
        by_task[t.name] = lb.aggregate(per_doc, t.metric, t.num_fewshot)
        write_jsonl(details, out / "details" / engine.name / f"{t.name}.jsonl")
    return by_task


# ---------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ---------------------------------------------------------------------------------------------------


def _doc(row: dict[str, Any]) -> lb.Doc:
    """A row of the files :func:`local_task_spec` writes (``Doc`` fields) back as a ``Doc``."""
    return lb.Doc(row["question"], tuple(row["choices"]), row["gold"],
                  tuple(row["labels"]) if row.get("labels") is not None else None, row.get("subject") or "")


def _lm_eval_text(row: dict[str, Any], fmt: str) -> str:
    return lb.doc_to_text(_doc(row), fmt)


def _lm_eval_choices(row: dict[str, Any], fmt: str) -> list[str]:
    return lb.doc_to_choices(_doc(row), fmt)


def _lm_eval_target(row: dict[str, Any]) -> int:
    return row["gold"]


def _lm_eval_metrics(row: dict[str, Any], results: list[tuple[float, bool]], fmt: str) -> dict[str, float]:
    return lb.doc_metrics(_doc(row), fmt, [ll for ll, _ in results])


def local_task_spec(td: TaskData, folder: Path) -> dict[str, Any]:
    """This task's scored rows and few-shot pool as JSONL under ``folder/<task>/`` and what the harness needs to
    build a task config from them (plain data: it travels to the Ray task)."""
    t = td.cfg
    files = {}
    for split, docs in (("test", td.docs), ("fewshot", td.pool)):
        if docs:
            files[split] = str(folder / t.name / f"{split}.jsonl")
            write_jsonl((dataclasses.asdict(d) for d in docs), files[split])
    return {"name": t.name, "format": t.format, "labels": all(d.labels is not None for d in td.docs),
            "description": t.description, "data_files": files}


def lm_eval_task_config(spec: dict[str, Any]) -> dict[str, Any]:
    """An lm-evaluation-harness task config (the dict form of its task YAML) for a :func:`local_task_spec`:
    prompts, choices and per-row metrics are this project's functions, delimiters are lm-eval's."""
    fmt = spec["format"]
    metrics = ["acc", "acc_norm", *(["mc2"] if spec["labels"] else [])]
    cfg = {
        "task": f"zephyr_ray_{spec['name']}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": spec["data_files"]}, "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": functools.partial(_lm_eval_text, fmt=fmt),
        "doc_to_choice": functools.partial(_lm_eval_choices, fmt=fmt),
        "doc_to_target": _lm_eval_target,
        "process_results": functools.partial(_lm_eval_metrics, fmt=fmt),
        "target_delimiter": lb.TARGET_DELIMITER, "fewshot_delimiter": lb.FEWSHOT_DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
    }
    if spec["description"]:  # the harness renders it with Jinja against the row
        cfg["description"] = spec["description"].replace("{subject}", "{{ subject | replace('_', ' ') }}")
    if "fewshot" in spec["data_files"]:
        cfg["fewshot_split"] = "fewshot"
    return cfg


def _lm_eval_task(path: str, engine: dict[str, Any], task: str | dict[str, Any], num_fewshot: int, seed: int,
                  limit: int | None) -> dict[str, Any]:
    """One ``simple_evaluate`` call (runs inside a Ray task holding the model's resources) of a harness task name
    or a :func:`local_task_spec`; its metrics and each row's log-likelihoods."""
    lm_eval = import_lm_eval()
    if engine.get("threads_per_actor"):
        torch.set_num_threads(engine["threads_per_actor"])
    args = f"pretrained={path},dtype={DTYPES[engine['precision']]}"
    if engine.get("revision"):
        args += f",revision={engine['revision']}"
    if engine.get("trust_remote_code"):
        args += ",trust_remote_code=True"
    config = lm_eval_task_config(task) if isinstance(task, dict) else task
    name = config["task"] if isinstance(config, dict) else config
    res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[config], num_fewshot=num_fewshot,
                                  batch_size=engine["batch_size"], device="cuda" if torch.cuda.is_available() else "cpu",
                                  limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, log_samples=True)
    rows = sorted(res["samples"][name], key=lambda r: r["doc_id"])
    return {"metrics": {k: v for k, v in res["results"][name].items() if isinstance(v, (int, float))},
            "n": res.get("n-samples", {}).get(name, {}).get("effective"),
            "details": [{"doc": r["doc_id"], "lls": [resp[0][0] for resp in r["resps"]],
                         "greedy": [bool(resp[0][1]) for resp in r["resps"]]} for r in rows]}


def _lm_eval_model(engine: EngineConfig, cfg: LeaderboardRecipe, tasks: list[TaskData], out: Path) -> dict[str, Any]:
    local = {td.cfg.name: local_task_spec(td, out / "lm_eval_tasks") for td in tasks}
    remote = ray.remote(num_cpus=engine.num_cpus_per_actor, num_gpus=engine.num_gpus_per_actor)(_lm_eval_task)
    by_task: dict[str, Any] = {}
    for t in cfg.tasks:
        spec = local.get(t.name, t.lm_eval_task)
        limit = None if t.name in local else t.limit  # load_task has already cut the local rows
        got = ray.get(remote.remote(engine.path, to_dict(engine), spec, t.num_fewshot, cfg.seed, limit))
        m = got["metrics"]
        r: dict[str, Any] = {"metric": t.metric, "lm_eval_task": t.lm_eval_task}
        for name in lb.METRICS:
            if f"{name},none" in m:
                r[name] = m[f"{name},none"]
                r[f"{name}_stderr"] = m.get(f"{name}_stderr,none")
        if t.metric not in r:
            raise RuntimeError(f"lm_eval task {t.lm_eval_task or t.name} reported no {t.metric}: {sorted(m)}")
        r.update({"value": r[t.metric], "stderr": r[f"{t.metric}_stderr"], "n": got["n"],
                  "num_fewshot": t.num_fewshot})
        by_task[t.name] = r
        write_jsonl(got["details"], out / "details" / engine.name / f"{t.name}.jsonl")
    return by_task


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def run_leaderboard(cfg: LeaderboardRecipe) -> LeaderboardResult:
    check_recipe(cfg)
    cfg, out = open_run(cfg)
    started = time.perf_counter()
    tasks = [load_task(t, cfg.seed) for t in cfg.tasks if cfg.backend == "native" or not t.lm_eval_task]
    ensure_ray()
    results: dict[str, Any] = {
        "run": cfg.run.name, "backend": cfg.backend, "seed": cfg.seed,
        "tasks": {t.name: {"path": t.path, "format": t.format, "metric": t.metric, "num_fewshot": t.num_fewshot,
                           "fewshot_path": t.fewshot_path, "lm_eval_task": t.lm_eval_task} for t in cfg.tasks},
        "model_info": [{"name": m.name, "backend": m.backend, "path": m.path or tiny_label(m.tiny_seed, m.tiny_arch)}
                       for m in cfg.models],
        "models": {},
        "timings": {},
    }
    for td in tasks:
        results["tasks"][td.cfg.name].update({"rows": len(td.docs), "fewshot_pool": len(td.pool)})
    units = _units(tasks)
    for m in cfg.models:
        engine = resolve_engine(m, out / "models")
        t0 = time.perf_counter()
        by_task = _native_model(engine, tasks, units, out) if cfg.backend == "native" \
            else _lm_eval_model(engine, cfg, tasks, out)
        heads = [r["value"] for r in by_task.values()]
        results["models"][m.name] = {"tasks": by_task, "average": sum(heads) / len(heads) if heads else None}
        results["timings"][m.name] = time.perf_counter() - t0
    results["wall_s"] = time.perf_counter() - started
    write_summary(out / "results.json", results)
    report = out / "report.md"
    report.write_text(lb.markdown_table(results))
    log.info("leaderboard:\n%s", report.read_text())
    log_summary_run(cfg.wandb, cfg.run.name, out, {"models": results["models"]}, config=to_dict(cfg))
    return LeaderboardResult(out, results, report)
