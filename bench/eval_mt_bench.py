"""Wall time and judge calls/s of the MT-Bench evaluation (``zephyr-ray eval``) with tiny models on CPU.

Runs ``configs/tiny/eval.yaml`` with AlpacaEval off on the full question set (the 80 questions and FastChat's
judge prompts of ../shared/data/mt_bench when present, else the shipped sample under data/sample/mt_bench),
in a fresh output folder on a fresh local 2-CPU Ray cluster, through the real entry point: question loading,
each model's two answer passes (turn 1, then turn 2 with its own turn-1 answer; one actor pool each: actor
start + model load + batched generation), one judge pool over every (model, question, turn), results, report
and chart. Per phase: wall seconds (actor start and model load included), units (answers or judgments) and
units/s; for the judge also calls (attempts, retries included) and calls/s; and the parse failures.

The tiny judge is a random model: it writes no readable ``[[rating]]``, so every judgment takes
``--max-attempts`` calls and ends as a counted parse failure. That is the worst case for judge calls, and
it is what this measures: the pipeline's throughput, not a model's quality.

    .venv/bin/python bench/eval_mt_bench.py [--models 2] [--max-new-tokens 24] [--judge-max-new-tokens 24]
        [--max-attempts 2] [--set key=value ...] [--out bench/results/eval_mt_bench.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "mt_bench"
from common import envelope, timed_on_local_ray, write_result  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "mt_bench"
DEFAULT_OUT = ROOT / "bench" / "results" / "eval_mt_bench.json"


def _inputs() -> tuple[Path, Path]:
    if (SHARED / "question.jsonl").exists() and (SHARED / "judge_prompts.jsonl").exists():
        return SHARED / "question.jsonl", SHARED / "judge_prompts.jsonl"
    return SAMPLE / "question.jsonl", SAMPLE / "judge_prompts.jsonl"


def _busy_cores(seconds: float = 1.0) -> float:
    import psutil

    before = psutil.cpu_times()
    time.sleep(seconds)
    after = psutil.cpu_times()
    return sum(getattr(after, k) - getattr(before, k) for k in ("user", "nice", "system")) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2, help="tiny models evaluated (1 or 2: those of the tiny config)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="answer length per turn")
    ap.add_argument("--judge-max-new-tokens", type=int, default=24)
    ap.add_argument("--max-attempts", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more eval config overrides")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="smallest settings (checks the bench; not a result)")
    a = ap.parse_args()
    if a.quick:
        a.models, a.max_new_tokens, a.judge_max_new_tokens = 1, 8, 8
        a.set = [*a.set, "mt_bench.per_category=1"]
    env = envelope("eval_mt_bench", a.quick)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "zephyr-ray" / "torch_extensions"))

    from zephyr_ray.config import EvalRecipe, load_config
    from zephyr_ray.eval.run import run_eval

    questions, prompts = _inputs()
    idle_before = _busy_cores()
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config(ROOT / "configs/tiny/eval.yaml", [
            f"run.output_dir={work}/eval", f"mt_bench.questions={questions}", f"judge.prompts={prompts}",
            "alpaca_eval.enabled=false", f"mt_bench.sampling.max_new_tokens={a.max_new_tokens}",
            f"judge.sampling.max_new_tokens={a.judge_max_new_tokens}", f"judge.max_attempts={a.max_attempts}", *a.set],
            EvalRecipe)
        cfg = dataclasses.replace(cfg, models=cfg.models[:a.models])
        result, wall = timed_on_local_ray(run_eval, cfg)
    res = result.results
    phases = res["timings"]
    judging = res["judging"]
    mt = res["mt_bench"]
    answers = sum(t["units"] for name, t in phases.items() if name.startswith("mt_bench answer"))
    answer_s = sum(t["seconds"] for name, t in phases.items() if name.startswith("mt_bench answer"))
    judge = phases["judge"]
    rows = [("whole eval (driver wall)", wall, None, None, judging["calls"], judging["calls"] / wall)]
    rows += [(name, t["seconds"], t["units"], t["units"] / t["seconds"], None, None)
             for name, t in phases.items() if name.startswith("mt_bench answer")]
    rows.append(("answers, both turns", answer_s, answers, answers / answer_s, None, None))
    rows.append(("judge", judge["seconds"], judge["units"], judge["units"] / judge["seconds"], judge["calls"],
                 judge["calls"] / judge["seconds"]))

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"\nMT-Bench eval, {mt['questions']} questions x {len(cfg.models)} tiny models x 2 turns "
          f"({questions.relative_to(ROOT.parent) if questions.is_relative_to(ROOT.parent) else questions}), "
          f"answers {a.max_new_tokens} tokens, judge {a.judge_max_new_tokens} tokens x up to {a.max_attempts} attempts, "
          f"2-CPU local Ray:")
    print(f"{'phase':<28}{'wall s':>9}{'units':>8}{'units/s':>10}{'judge calls':>13}{'calls/s':>10}")
    for name, s, units, rate, calls, crate in rows:
        print(f"{name:<28}{s:>9.1f}{f(units, 'd'):>8}{f(rate, '.2f'):>10}{f(calls, 'd'):>13}{f(crate, '.2f'):>10}")
    print(f"judgments {judging['judgments']}, parse failures {judging['parse_failures']}, retries {judging['retries']}, "
          f"truncated judge prompts {judging['truncated_prompts']}")
    payload = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                             else sys.executable, *sys.argv]),
        "when_unix": time.time(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "busy_cores_before": round(idle_before, 2), "loadavg_end": os.getloadavg()},
        "params": {"questions_file": str(questions), "judge_prompts": str(prompts), "questions": mt["questions"],
                   "models": [m.name for m in cfg.models], "max_new_tokens": a.max_new_tokens,
                   "judge_max_new_tokens": a.judge_max_new_tokens, "max_attempts": a.max_attempts,
                   "overrides": a.set, "judge_actors": cfg.judge.engine.num_actors},
        "wall_s": wall,
        "answers": answers,
        "answers_per_s": answers / answer_s,
        "judge_calls": judge["calls"],
        "judge_calls_per_s": judge["calls"] / judge["seconds"],
        "judging": judging,
        "phases": phases,
        "scores": {name: {k: s[k] for k in ("overall", "rated", "parse_failures", "judge_calls")}
                   for name, s in mt["models"].items()},
    }
    write_result(a.out, env, payload)


if __name__ == "__main__":
    main()
