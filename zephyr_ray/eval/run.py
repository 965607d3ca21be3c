"""The eval stage (``zephyr-ray eval``): MT-Bench and AlpacaEval-style pairwise win rate with an LLM judge.

Every model step is a resumable actor pool (:func:`zephyr_ray.generation.pool.run_pool`) writing under
``run.output_dir``:

- ``mt_bench/answers/<model>/turn-1``, ``turn-2``: each model answers turn 1, then turn 2 with its own turn-1
  answer in the context (two passes);
- ``alpaca_eval/completions/<model>``: the models (and a generated reference) answer the instructions;
- ``judgments/<judge>``: one pool for every judgment of the run (MT-Bench grading, both orders of every
  AlpacaEval pair, agreement rows), so the judge is loaded once.

A unit's key includes a hash of what it asks (prompt, sampling, the judge's settings), so a rerun with the same
``run.output_dir`` resumes and reuses exactly the work that is still valid. Written at the end:
``results.json``, ``report.md``, ``mt_bench_radar.png``, answers and judgments in FastChat's formats
(``mt_bench/model_answer/<model>.jsonl``, ``mt_bench/model_judgment/<judge>_single.jsonl``), AlpacaEval's
``alpaca_eval/model_outputs/<model>.json`` and ``annotations.jsonl``, ``alpaca_eval/agreement.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import EngineConfig, EvalRecipe, resolve_path, to_dict
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.eval import mt_bench
from zephyr_ray.eval.inputs import read_input_rows
from zephyr_ray.eval.judging import judge_label, judge_work, verdict_of
from zephyr_ray.eval.length_controlled import Judged, length_controlled_win_rates, with_length_controlled
from zephyr_ray.eval.mt_bench import digest
from zephyr_ray.eval.pairwise import (
    agreement_stats,
    collect_instructions,
    instruction_score,
    pairwise_stats,
    validate_preference,
)
from zephyr_ray.eval.report import markdown_report, radar_chart
from zephyr_ray.generation.pool import KEY, resolve_engine, run_pool
from zephyr_ray.generation.run import generate, prompt_schema
from zephyr_ray.judging import (
    EXPECTED,
    EXPECTED_OPTIONS,
    EXPECTED_PREFIX,
    EXPECTED_SUFFIX,
    PAIRWISE,
    JudgePrompt,
    decided,
    load_judge_prompts,
    require_prompt,
)
from zephyr_ray.models import tiny_label
from zephyr_ray.tracking import log_summary_run, write_summary

log = logging.getLogger(__name__)

CHART = "mt_bench_radar.png"


@dataclass
class EvalResult:
    dir: Path
    results: dict[str, Any]
    report: Path
    chart: Path | None


@dataclass
class _Timings:
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, phase: str, seconds: float, units: int) -> None:
        t = self.phases.setdefault(phase, {"seconds": 0.0, "units": 0})
        t["seconds"] += seconds
        t["units"] += units


# ---------------------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------------------

def _messages_type() -> pa.DataType:
    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _dataset(units: list[dict[str, Any]], schema: pa.Schema):
    return ray.data.from_arrow(pa.Table.from_pylist(units, schema=schema))


def _outputs(table: pa.Table | None, units: list[dict[str, Any]], what: str) -> dict[str, dict[str, Any]]:
    """The pool's rows for exactly these units (a folder may hold rows of earlier, different runs)."""
    wanted = {u[KEY] for u in units}
    rows = {r[KEY]: r for r in (table.to_pylist() if table is not None else []) if r[KEY] in wanted}
    missing = wanted - rows.keys()
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} of {len(wanted)} units have no output, e.g. {sorted(missing)[:3]}")
    return rows


def _answer_turn(questions: list[mt_bench.Question], engine: EngineConfig, turn: int, first: dict[str, str] | None,
                 cfg: EvalRecipe, out: Path, timings: _Timings) -> dict[str, dict[str, Any]]:
    m = cfg.mt_bench
    params = replace(m.sampling, n=1)
    units = mt_bench.answer_units(questions, turn, first, m.temperatures, params)
    schema = pa.schema([(KEY, pa.string()), ("question_id", pa.string()), ("category", pa.string()),
                        ("turn", pa.int64()), ("temperature", pa.float64()), ("messages", _messages_type())])
    started = time.perf_counter()
    table = run_pool(_dataset(units, schema), engine, partial(mt_bench.answer_work, params=params, model=engine.name),
                     out / "mt_bench" / "answers" / engine.name / f"turn-{turn}", f"MT-Bench turn {turn} [{engine.name}]")
    timings.add(f"mt_bench answer turn {turn}", time.perf_counter() - started, len(units))
    rows = _outputs(table, units, f"MT-Bench turn {turn} [{engine.name}]")
    return {u["question_id"]: rows[u[KEY]] for u in units}


def _generate(items: list[dict[str, str]], engine: EngineConfig, cfg: EvalRecipe, out: Path, timings: _Timings
              ) -> dict[str, dict[str, Any]]:
    """``{instruction: completion row}`` of ``engine`` for the AlpacaEval instructions."""
    params = replace(cfg.alpaca_eval.sampling, n=1)
    units = [{KEY: f"{it['instruction_id']}#{digest(it['instruction'], asdict(params))}",
              "prompt_id": it["instruction_id"], "prompt": it["instruction"],
              "messages": [{"role": "user", "content": it["instruction"]}]} for it in items]
    started = time.perf_counter()
    table = generate(_dataset(units, prompt_schema()), engine, params, out / "alpaca_eval")
    timings.add("alpaca_eval generate", time.perf_counter() - started, len(units))
    rows = _outputs(table, units, f"AlpacaEval outputs [{engine.name}]")
    return {u["prompt"]: rows[u[KEY]] for u in units}


def _judge(units: list[dict[str, Any]], engine: EngineConfig, cfg: EvalRecipe, out: Path, timings: _Timings
           ) -> dict[str, dict[str, Any]]:
    schema = pa.schema([(KEY, pa.string()), ("kind", pa.string()), ("messages", _messages_type()), ("meta", pa.string())])
    work = partial(judge_work, params=replace(cfg.judge.sampling, n=1), max_attempts=cfg.judge.max_attempts,
                   judge=engine.name, mode=cfg.judge.mode)
    started = time.perf_counter()
    table = run_pool(_dataset(units, schema), engine, work, out / "judgments" / engine.name, f"judge [{engine.name}]")
    seconds = time.perf_counter() - started
    rows = _outputs(table, units, f"judge [{engine.name}]")
    timings.add("judge", seconds, len(units))
    timings.phases["judge"]["calls"] = timings.phases["judge"].get("calls", 0) + sum(int(r["attempts"]) for r in rows.values())
    return rows


# ---------------------------------------------------------------------------------------------------
# MT-Bench
# ---------------------------------------------------------------------------------------------------

@dataclass
class _MTBench:
    questions: list[mt_bench.Question]
    report: DataReport
    refs: dict[str, tuple[str, ...] | None]
    answers: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]]  # model -> qid -> (turn 1, turn 2) rows
    units: list[dict[str, Any]]


def _grading_prompts(prompts: dict[str, JudgePrompt], cfg: EvalRecipe, source: str) -> mt_bench.GradingPrompts:
    m = cfg.mt_bench
    return mt_bench.GradingPrompts(
        single=require_prompt(prompts, m.prompt, "single", source),
        reference=require_prompt(prompts, m.reference_prompt, "single-reference", source),
        multi_turn=require_prompt(prompts, f"{m.prompt}-multi-turn", "single-multi-turn", source),
        reference_multi_turn=require_prompt(prompts, f"{m.reference_prompt}-multi-turn", "single-reference-multi-turn",
                                            source))


def _mt_bench(cfg: EvalRecipe, models: list[EngineConfig], grading: mt_bench.GradingPrompts, salt: str, out: Path,
              timings: _Timings) -> _MTBench:
    m = cfg.mt_bench
    questions, report = mt_bench.load_questions(m)
    file_refs = mt_bench.load_reference_answers(m.reference_answers, m.on_bad_row) if m.reference_answers else {}
    refs = mt_bench.references(questions, file_refs, m.reference_categories)
    log.info("MT-Bench: %d questions (%s)", len(questions), report.summary().splitlines()[0])
    answers, units = {}, []
    for engine in models:
        first = _answer_turn(questions, engine, 1, None, cfg, out, timings)
        second = _answer_turn(questions, engine, 2, {q: r["answer"] for q, r in first.items()}, cfg, out, timings)
        answers[engine.name] = {q.qid: (first[q.qid], second[q.qid]) for q in questions}
        texts = {qid: (a["answer"], b["answer"]) for qid, (a, b) in answers[engine.name].items()}
        units += mt_bench.judge_units(engine.name, questions, texts, refs, grading, salt)
    return _MTBench(questions, report, refs, answers, units)


def _mt_bench_results(mt: _MTBench, judged: dict[str, dict[str, Any]], cfg: EvalRecipe, judge: str, out: Path
                      ) -> dict[str, Any]:
    rows = []
    for u in mt.units:
        j = judged[u[KEY]]
        rows.append({**json.loads(u["meta"]), "score": j["score"], "attempts": j["attempts"], "judgment": j["judgment"],
                     "probs": j.get("probs"), "user_prompt": u["messages"][-1]["content"]})
    present = {q.category for q in mt.questions}
    categories = [c for c in cfg.mt_bench.categories if c in present]
    names = list(mt.answers)
    results = {"source": cfg.mt_bench.questions, "questions": len(mt.questions), "categories": categories,
               "judge": judge_label(judge, cfg.judge.mode),
               "reference_categories": [c for c in cfg.mt_bench.reference_categories if c in present],
               "question_report": {"rows": mt.report.rows, "used": mt.report.used,
                                   "skipped": dict(mt.report.skipped)},
               "models": mt_bench.scores(rows, names, categories)}
    now = time.time()
    for name, by_qid in mt.answers.items():  # FastChat's model_answer format
        write_jsonl(({"question_id": q.question_id, "answer_id": digest(name, q.qid, a["answer"], b["answer"]),
                      "model_id": name, "choices": [{"index": 0, "turns": [a["answer"], b["answer"]]}], "tstamp": now,
                      "category": q.category, "finish_reasons": [a["finish_reason"], b["finish_reason"]],
                      "completion_tokens": [a["completion_tokens"], b["completion_tokens"]]}
                     for q in mt.questions for a, b in [by_qid[q.qid]]),
                    out / "mt_bench" / "model_answer" / f"{name}.jsonl")
    # FastChat's model_judgment format (score -1 = unreadable, as FastChat writes it), plus attempts, the judge's
    # mode and in expected mode the probabilities of the ratings 1..10 (the judgment text is then empty).
    write_jsonl(({"question_id": r["question_id"], "model": r["model"], "judge": [judge, r["prompt"]],
                  "user_prompt": r["user_prompt"], "judgment": r["judgment"],
                  "score": -1 if r["score"] is None else r["score"], "turn": r["turn"], "tstamp": now,
                  "category": r["category"], "attempts": r["attempts"], "reference": r["reference"],
                  "mode": cfg.judge.mode, "probs": r["probs"]} for r in rows),
                out / "mt_bench" / "model_judgment" / f"{judge}_single.jsonl")
    return results


# ---------------------------------------------------------------------------------------------------
# AlpacaEval
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Alpaca:
    items: list[dict[str, str]] = field(default_factory=list)
    source: str = ""
    report: DataReport = field(default_factory=DataReport)
    reference: str | None = None
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> instruction -> output
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)
    agreement_rows: list[dict[str, Any]] = field(default_factory=list)
    agreement_units: list[dict[str, Any]] = field(default_factory=list)


def _pair_units(tag: str, question: str, first: str, second: str, prompt: JudgePrompt, meta: dict[str, Any],
                salt: str) -> list[dict[str, Any]]:
    """Both orders of one pair: ``first`` shown as A, then as B."""
    units = []
    for first_is_a in (True, False):
        a, b = (first, second) if first_is_a else (second, first)
        messages = prompt.conversation(question=question, answer_a=a, answer_b=b)
        units.append({KEY: f"{tag}|{'AB' if first_is_a else 'BA'}#{digest(messages, salt)}", "kind": PAIRWISE,
                      "messages": messages, "meta": json.dumps({**meta, "first_is_a": first_is_a})})
    return units


def _alpaca(cfg: EvalRecipe, models: list[EngineConfig], prompt: JudgePrompt, salt: str, out: Path,
            timings: _Timings) -> _Alpaca:
    a = cfg.alpaca_eval
    res = _Alpaca()
    evaluated = cfg.alpaca_models()
    if evaluated:
        res.source = a.instructions
        inst = collect_instructions(read_input_rows(resolve_path(a.instructions)), a.on_bad_row, a.instructions)
        res.items, res.report = inst.items[:a.limit] if a.limit is not None else inst.items, inst.report
        if not res.items:
            raise ValueError(f"{a.instructions}: no usable instructions")
        texts = [it["instruction"] for it in res.items]
        from_file = [*a.output_models, *([a.reference_model] if a.reference_model else [])]
        if from_file:
            source = a.outputs or a.instructions
            table = inst.outputs if a.outputs is None else collect_instructions(
                read_input_rows(resolve_path(a.outputs)), a.on_bad_row, a.outputs).outputs
            for name in from_file:
                res.outputs[name] = {t: table[t][name] for t in texts if name in table.get(t, {})}
                if not res.outputs[name]:
                    known = sorted({m for outs in table.values() for m in outs})
                    raise ValueError(f"{source}: no outputs of model {name!r} for these instructions; "
                                     f"models there: {known}")
        engines = [*(models if a.generate else []), *([resolve_engine(a.reference, out / "models")] if a.reference else [])]
        for engine in engines:
            rows = _generate(res.items, engine, cfg, out, timings)
            res.outputs[engine.name] = {t: r["completion"].strip() for t, r in rows.items()}
            res.tokens[engine.name] = {t: r["completion_tokens"] for t, r in rows.items()}
        res.reference = cfg.reference_name()
        ref_outputs = res.outputs[res.reference]
        for name in evaluated:
            res.missing[name] = 0
            for it in res.items:
                text = it["instruction"]
                if text not in res.outputs[name] or text not in ref_outputs:
                    res.missing[name] += 1
                    continue
                meta = {"bench": "alpaca_eval", "model": name, "reference": res.reference,
                        "instruction_id": it["instruction_id"]}
                res.units += _pair_units(f"alpaca_eval|{name}|{res.reference}|{it['instruction_id']}", text,
                                         res.outputs[name][text], ref_outputs[text], prompt, meta, salt)
    if a.agreement:
        report = DataReport()
        checked = valid_rows(read_input_rows(resolve_path(a.agreement)), validate_preference, a.on_bad_row, report)
        rows = [r for _, r in checked]
        res.agreement_rows = rows[:a.agreement_limit] if a.agreement_limit is not None else rows
        if not res.agreement_rows:
            raise ValueError(f"{a.agreement}: no usable preference rows")
        for i, r in enumerate(res.agreement_rows):
            meta = {"bench": "agreement", "row": i, "label": r["label"]}
            res.agreement_units += _pair_units(f"agreement|{i}", r["instruction"], r["output_1"], r["output_2"],
                                               prompt, meta, salt)
    return res


def _outcomes(units: list[dict[str, Any]], judged: dict[str, dict[str, Any]], group: str
              ) -> dict[Any, list[Any]]:
    """``{group value: [verdict with the first answer as A, verdict with it as B, units...]}``; a verdict is the
    judge's probabilities in expected mode."""
    out: dict[Any, list[Any]] = defaultdict(lambda: [None, None, []])
    for u in units:
        meta = json.loads(u["meta"])
        entry = out[(meta.get("model"), meta[group])]
        entry[0 if meta["first_is_a"] else 1] = verdict_of(judged[u[KEY]])
        entry[2].append(judged[u[KEY]])
    return out


def _probs_fields(first: Any, second: Any, tag_first: str, tag_second: str) -> dict[str, Any]:
    """The judge's verdict probabilities of both orders (expected mode), for the annotation rows."""
    if not isinstance(first, dict) and not isinstance(second, dict):
        return {}
    return {f"probs{tag_first}": first, f"probs{tag_second}": second}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _alpaca_results(al: _Alpaca, judged: dict[str, dict[str, Any]], cfg: EvalRecipe, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if al.units:
        outcomes = _outcomes(al.units, judged, "instruction_id")
        ref = al.reference
        models: dict[str, Any] = {}
        annotations = []
        judged_pairs: dict[str, list[Judged]] = {}  # the length-controlled win rate's input
        for name in cfg.alpaca_models():
            pairs, used = [], []
            judged_pairs[name] = []
            for it in al.items:
                key = (name, it["instruction_id"])
                if key in outcomes:
                    first, second, rows = outcomes[key]
                    pairs.append((first, second))
                    used.append(it["instruction"])
                    p = instruction_score((first, second))
                    if p is not None:
                        judged_pairs[name].append(Judged(it["instruction_id"], p, len(al.outputs[name][it["instruction"]]),
                                                         len(al.outputs[ref][it["instruction"]])))
                    annotations.append({
                        "instruction": it["instruction"], "instruction_id": it["instruction_id"],
                        "output_1": al.outputs[ref][it["instruction"]], "generator_1": ref,
                        "output_2": al.outputs[name][it["instruction"]], "generator_2": name,
                        # AlpacaEval's convention: 1 = output_1 (the reference) better, 2 = output_2 (the model).
                        "preference": None if p is None else 1 + p,
                        "verdict_model_first": decided(first), "verdict_model_second": decided(second),
                        **_probs_fields(first, second, "_model_first", "_model_second"),
                        "judgments": [r["judgment"] for r in rows], "attempts": [r["attempts"] for r in rows]})
            s = pairwise_stats(pairs).to_dict()
            name_rows = [r for key, (_, _, rows) in outcomes.items() if key[0] == name for r in rows]
            s.update({
                "missing_outputs": al.missing.get(name, 0),
                "mean_length": _mean([len(al.outputs[name][t]) for t in used]),
                "reference_mean_length": _mean([len(al.outputs[ref][t]) for t in used]),
                "mean_tokens": _mean([al.tokens[name][t] for t in used]) if name in al.tokens else None,
                "reference_mean_tokens": _mean([al.tokens[ref][t] for t in used]) if ref in al.tokens else None,
                "parse_failures": sum(r["verdict"] is None for r in name_rows),
                "judge_calls": sum(int(r["attempts"]) for r in name_rows)})
            models[name] = s
        lc = length_controlled_win_rates(judged_pairs)
        models = {name: with_length_controlled(s, lc[name]) for name, s in models.items()}
        write_jsonl(annotations, out / "alpaca_eval" / "annotations.jsonl")
        for name in al.tokens:  # generated outputs in AlpacaEval's model_outputs.json format
            path = out / "alpaca_eval" / "model_outputs" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([{"instruction": it["instruction"], "output": al.outputs[name][it["instruction"]],
                                         "generator": name, "dataset": cfg.alpaca_eval.instructions}
                                        for it in al.items], indent=1, ensure_ascii=False))
        results.update({"source": al.source, "instructions": len(al.items), "reference": ref,
                        "judge": judge_label(cfg.judge.engine.name, cfg.judge.mode),
                        "instruction_report": {"rows": al.report.rows, "used": al.report.used,
                                               "skipped": dict(al.report.skipped)},
                        "models": models})
    if al.agreement_units:
        outcomes = _outcomes(al.agreement_units, judged, "row")
        pairs, labels, rows_out, judged_rows = [], [], [], []
        for i, r in enumerate(al.agreement_rows):
            first, second, rows = outcomes[(None, i)]
            pairs.append((first, second))
            labels.append(r["label"])
            judged_rows += rows
            rows_out.append({**r, "verdict_first": decided(first), "verdict_second": decided(second),
                             **_probs_fields(first, second, "_first", "_second"),
                             "judge_preference_1": instruction_score((first, second))})
        s = agreement_stats(pairs, labels).to_dict()
        s.update({"source": cfg.alpaca_eval.agreement, "judge": judge_label(cfg.judge.engine.name, cfg.judge.mode),
                  "parse_failures": sum(r["verdict"] is None for r in judged_rows),
                  "judge_calls": sum(int(r["attempts"]) for r in judged_rows)})
        results["agreement"] = s
        write_jsonl(rows_out, out / "alpaca_eval" / "agreement.jsonl")
    return results


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def _judging_totals(judged: list[dict[str, Any]], judge: EngineConfig) -> dict[str, Any]:
    calls = sum(int(r["attempts"]) for r in judged)
    failures = sum(r["score"] is None and r["verdict"] is None for r in judged)
    truncated = 0
    if judge.backend != "openai":  # local judges cut prompts from the left at max_prompt_length
        truncated = sum(int(r["prompt_tokens"]) >= judge.max_prompt_length * int(r["attempts"]) for r in judged)
    return {"judgments": len(judged), "calls": calls, "retries": calls - len(judged), "parse_failures": failures,
            "truncated_prompts": truncated}


def run_eval(cfg: EvalRecipe) -> EvalResult:
    cfg, out = open_run(cfg)
    prompts_path = resolve_path(cfg.judge.prompts)
    prompts = load_judge_prompts(prompts_path)
    grading = _grading_prompts(prompts, cfg, cfg.judge.prompts) if cfg.mt_bench.enabled else None
    pair_prompt = require_prompt(prompts, cfg.alpaca_eval.prompt, "pairwise", cfg.judge.prompts) \
        if cfg.alpaca_eval.enabled else None
    ensure_ray()
    started = time.perf_counter()
    timings = _Timings()
    answering = cfg.mt_bench.enabled or (cfg.alpaca_eval.enabled and cfg.alpaca_eval.generate)
    models = [resolve_engine(m, out / "models") for m in cfg.models] if answering else []
    judge = resolve_engine(cfg.judge.engine, out / "models")
    # What a judgment depends on besides its messages: sampling and attempts (generate), the scored options (expected).
    salt = digest(asdict(cfg.judge.sampling), cfg.judge.max_attempts) if cfg.judge.mode != EXPECTED else \
        digest(EXPECTED, EXPECTED_PREFIX, EXPECTED_OPTIONS, EXPECTED_SUFFIX)

    mt = _mt_bench(cfg, models, grading, salt, out, timings) if grading else None
    al = _alpaca(cfg, models, pair_prompt, salt, out, timings) if pair_prompt else None
    units = [*(mt.units if mt else []), *(al.units + al.agreement_units if al else [])]
    judged = _judge(units, judge, cfg, out, timings)

    results: dict[str, Any] = {
        "run": cfg.run.name,
        "judge": {"name": judge.name, "backend": judge.backend,
                  "model": cfg.judge.engine.path or tiny_label(judge.tiny_seed, judge.tiny_arch),
                  "prompts": cfg.judge.prompts, "mode": cfg.judge.mode, "label": judge_label(judge.name, cfg.judge.mode),
                  "max_attempts": cfg.judge.max_attempts, "sampling": asdict(cfg.judge.sampling)},
        "models": [{"name": m.name, "backend": m.backend, "path": m.path or tiny_label(m.tiny_seed, m.tiny_arch)}
                   for m in cfg.models],
    }
    if mt:
        results["mt_bench"] = _mt_bench_results(mt, judged, cfg, judge.name, out)
    if al:
        results["alpaca_eval"] = _alpaca_results(al, judged, cfg, out)
    results["judging"] = _judging_totals(list(judged.values()), judge)
    results["timings"] = timings.phases
    results["wall_s"] = time.perf_counter() - started
    chart = None
    if mt:
        chart = radar_chart(results["mt_bench"]["categories"],
                            {n: s["categories"] for n, s in results["mt_bench"]["models"].items()},
                            out / CHART, title=f"MT-Bench by category (judge: {judge.name}, {cfg.judge.mode})")
    write_summary(out / "results.json", results)
    report = out / "report.md"
    report.write_text(markdown_report(results, CHART if chart else None))
    log.info("evaluation:\n%s", report.read_text())
    log_summary_run(cfg.wandb, cfg.run.name, out, results, config=to_dict(cfg), images={"mt_bench/radar": chart})
    return EvalResult(out, results, report, chart)
