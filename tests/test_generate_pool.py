"""The generate stage on the session's Ray cluster: actor pool, crash retry, resume after a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.ray]

PROMPTS = 12


def _cfg(out, *extra):
    from zephyr_ray.config import GenerateRecipe, load_config

    return load_config(ROOT / "configs/tiny/generate.yaml", [
        f"run.output_dir={out}", f"prompts.limit={PROMPTS}", "engine.rows_per_task=2", "engine.batch_size=2",
        "sampling.temperature=0", "sampling.max_new_tokens=6", *extra], GenerateRecipe)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_crashed_actor_batch_is_retried_once_and_rerun_skips_everything(ray_cluster, tmp_path):
    from zephyr_ray.generation.run import run_generate

    out = tmp_path / "gen"
    rows = _rows(run_generate(_cfg(out, "engine.inject_crash_once=true")))
    parts = out / "completions" / "tiny-a"
    assert (parts / ".crash-injected").exists()  # an actor did die mid-task
    assert sorted(r["prompt_id"] for r in rows) == [f"prompt-0-{i:05d}" for i in range(PROMPTS)]
    assert len(list(parts.glob("part-*.parquet"))) == PROMPTS // 2  # one whole part per task, none lost
    assert all(r["model"] == "tiny-a" and r["sample"] == 0 and json.loads(r["sampling"])["max_new_tokens"] == 6
               for r in rows)
    assert all(0 < r["completion_tokens"] <= 6 and r["finish_reason"] in ("stop", "length") for r in rows)
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    again = _rows(run_generate(_cfg(out)))
    assert again == rows
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")} == before  # nothing redone


def test_killed_driver_resumes_without_duplicates_or_gaps(ray_cluster, tmp_path):
    """SIGKILL a `zephyr-ray generate` driver once its first part is written; the rerun completes the
    set: every prompt exactly once, and greedy completions equal to an uninterrupted run's."""
    from zephyr_ray.generation.run import run_generate

    out = tmp_path / "killed"
    parts = out / "completions" / "tiny-a"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    # Long enough (~0.1-0.3 s per 2-prompt task) that the kill lands mid-run.
    overrides = ["prompts.limit=40", "engine.rows_per_task=2", "engine.batch_size=2", "sampling.temperature=0",
                 "sampling.max_new_tokens=24"]
    cmd = [sys.executable, "-m", "zephyr_ray.cli", "generate", "--config", "configs/tiny/generate.yaml",
           f"run.output_dir={out}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(parts.glob("part-*.parquet")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(parts.glob("part-*.parquet")))
    assert 1 <= written < 20, f"kill landed after {written} parts: {proc.stderr.read()[-2000:]}"
    resumed = _rows(run_generate(_cfg(out, *overrides)))
    assert sorted(r["prompt_id"] for r in resumed) == [f"prompt-0-{i:05d}" for i in range(40)]
    clean = _rows(run_generate(_cfg(tmp_path / "clean", *overrides)))
    assert resumed == clean
    assert not list(parts.glob(".tmp-*"))  # the killed run's half-written temp files were cleared
