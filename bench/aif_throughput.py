"""Throughput of the whole AIF step (``zephyr-ray aif``) on tiny models and a local Ray cluster.

Runs ``configs/tiny/aif.yaml`` (3 tiny candidates, one tiny judge in ``expected`` mode, one actor each)
on ``--prompts`` prompts in a fresh output folder, end to end through the real entry point: Ray start,
prompt loading, each candidate's actor pool (model load + batched generation), the judge's pool (4
aspect prompts per completion), binarization and output. Reports completions/s of the whole step
(completions judged / wall time from the call to the written pairs) and per phase from
``aif_report.json``'s ``seconds`` (a phase includes its actor start and model load).

    .venv/bin/python bench/aif_throughput.py [--prompts 64] [--max-new-tokens 32] [--out bench/results/aif_throughput.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import envelope, timed_on_local_ray, write_result  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "aif_throughput.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="smallest settings (checks the bench; not a result)")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.max_new_tokens = 8, 8
    env = envelope("aif_throughput", a.quick)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "zephyr-ray" / "torch_extensions"))

    from zephyr_ray.config import AIFRecipe, load_config
    from zephyr_ray.feedback.aif import run_aif

    with tempfile.TemporaryDirectory() as work:
        cfg = load_config(ROOT / "configs/tiny/aif.yaml", [
            f"run.output_dir={work}/aif", f"prompts.limit={a.prompts}", f"sampling.max_new_tokens={a.max_new_tokens}"],
            AIFRecipe)
        result, wall = timed_on_local_ray(run_aif, cfg)
    report = result.report
    completions = report["judging"]["completions"]
    judge_calls = completions * len(cfg.judges[0].aspects)
    phases = report["seconds"]
    rows = [("whole AIF step", wall, completions, completions / wall)]
    rows += [(name, s, a.prompts, a.prompts / s) for name, s in phases.items() if name.startswith("generate/")]
    rows += [(name, s, judge_calls, judge_calls / s) for name, s in phases.items() if name.startswith("judge/")]
    print(f"{'phase':<24}{'seconds':>10}{'items':>8}{'items/s':>10}")
    for name, s, n, rate in rows:
        print(f"{name:<24}{s:>10.1f}{n:>8}{rate:>10.2f}")
    print(f"pairs {result.pairs}, prompts skipped {result.skipped}; items = prompts (generate), "
          f"judge calls = completions x aspects (judge), completions (whole step)")
    write_result(a.out, env, {
        "args": {k: str(v) for k, v in vars(a).items()},
        "wall_s": wall, "completions": completions, "completions_per_s": completions / wall,
        "judge_calls": judge_calls, "phases_s": phases, "pairs": result.pairs, "skipped": result.skipped,
    })


if __name__ == "__main__":
    main()
