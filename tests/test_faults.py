"""Faults injected the way they happen (kill -9 of the real process, a file cut off on disk), and what survives.

Every kill here targets a process of this test session's own Ray cluster (a descendant of the pytest process),
found by its command line; nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from zephyr_ray.train.loop import (
    COMPLETE,
    _files,
    _write_atomic,
    checkpoint_storage,
    newest_complete,
    prune_checkpoints,
)

from .conftest import ROOT

# --- the completion protocol on disk (no Ray) ---------------------------------------------------------------

def _checkpoint(root: Path, step: int, complete: bool = True, size: int = 100) -> Path:
    d = root / f"step_{step:08d}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x" * size)
    (d / "ds" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"y" * size)
    if complete:
        fs, path = checkpoint_storage(str(d))
        _write_atomic(fs, f"{path}/{COMPLETE}", json.dumps({"step": step, "files": _files(fs, path)}))
    return d


def test_newest_complete_skips_unmarked_and_cut_off_checkpoints(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    cut = _checkpoint(tmp_path, 30)
    _checkpoint(tmp_path, 40, complete=False)  # a killed attempt: shards written, no marker
    assert newest_complete(str(tmp_path)) == (30, str(cut))
    # A shard of the newest complete one is cut off on disk afterwards: its size no longer matches the marker.
    shard = cut / "ds" / "zero_pp_rank_1_optim_states.pt"
    with shard.open("r+b") as f:
        f.truncate(37)
    assert newest_complete(str(tmp_path)) == (20, str(tmp_path / "step_00000020"))
    shard.unlink()
    assert newest_complete(str(tmp_path))[0] == 20
    # A marker cut off mid-write (not valid JSON) is no marker.
    (tmp_path / "step_00000020" / COMPLETE).write_text('{"step": 20, "fi')
    assert newest_complete(str(tmp_path))[0] == 10
    assert not list(tmp_path.rglob("*.tmp*")), "the marker's temp file is renamed away"
    assert newest_complete(str(tmp_path / "absent")) is None


def test_prune_keeps_the_newest_complete_and_drops_leftovers(tmp_path):
    for step in (5, 10, 15):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 12, complete=False)  # older than the newest complete: a dead attempt's
    _checkpoint(tmp_path, 20, complete=False)  # newer: maybe being written right now, so kept
    assert prune_checkpoints(str(tmp_path), keep=2) == [5, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010", "step_00000015", "step_00000020"]



def test_a_cut_off_pool_part_is_deleted_and_its_units_redone(tmp_path):
    from zephyr_ray.generation.pool import KEY, _write_part, done_keys, read_parts

    _write_part(tmp_path, ["a", "b"], [{KEY: "a", "x": 1}, {KEY: "b", "x": 2}])
    _write_part(tmp_path, ["c"], [{KEY: "c", "x": 3}])
    parts = sorted(tmp_path.glob("part-*.parquet"))
    cut = next(p for p in parts if "c" in read_parts_keys(p))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a writer killed mid-write, or a bad copy
    assert done_keys(tmp_path) == {"a", "b"}  # c is redone, never loaded
    assert not cut.exists()
    assert read_parts(tmp_path).column(KEY).to_pylist() == ["a", "b"]


def read_parts_keys(part: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(part).column("key").to_pylist()


class _AddOne:
    """A stand-in for a frozen model's actor: adds ``y = x + 1`` (no model to load)."""

    def __init__(self, threads=None):
        pass

    def __call__(self, batch):
        import pyarrow.compute as pc

        return batch.append_column("y", pc.add(batch["x"], 1))


@pytest.mark.ray
def test_a_cut_off_frozen_pass_part_is_redone_never_loaded(ray_cluster, tmp_path):
    import ray.data

    from zephyr_ray.config import ActorPoolConfig
    from zephyr_ray.train.frozen import frozen_pass

    def run():
        ds = ray.data.from_items([{"x": i} for i in range(40)], override_num_blocks=4)
        out = frozen_pass(ds, _AddOne, {}, ActorPoolConfig(batch_size=10, num_cpus_per_actor=0.5), tmp_path / "p",
                          {"v": 1})
        return sorted((r["x"], r["y"]) for r in out.take_all())

    assert run() == [(i, i + 1) for i in range(40)]
    success = json.loads((tmp_path / "p" / "_SUCCESS").read_text())
    parts = sorted((tmp_path / "p").glob("*.parquet"))
    assert success["files"] == {p.name: p.stat().st_size for p in parts} and parts
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    assert run() == [(i, i + 1) for i in range(40)]
    assert {p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / "p").glob("*.parquet"))} == mtimes
    with parts[0].open("r+b") as f:
        f.truncate(parts[0].stat().st_size - 9)  # cut off after the pass finished: footer gone
    assert run() == [(i, i + 1) for i in range(40)]  # redone, not loaded (a cut-off part would not read)
    assert json.loads((tmp_path / "p" / "_SUCCESS").read_text())["files"] == {
        p.name: p.stat().st_size for p in sorted((tmp_path / "p").glob("*.parquet"))}



def test_after_a_restart_wandb_gets_no_step_twice_and_metrics_jsonl_every_step_once(tmp_path):
    from zephyr_ray.config import WandbConfig
    from zephyr_ray.tracking import MetricsLogger, read_metrics

    from .wandb_records import _parse

    cfg = WandbConfig(mode="offline", group="g")
    first = MetricsLogger(tmp_path, cfg, "run", {}, 0)
    for step in range(1, 6):  # the attempt that dies after step 5; its last checkpoint is step 3
        first.log({"step": step, "loss": 10.0 - step})
    first.close()
    second = MetricsLogger(tmp_path, cfg, "run", {}, resume_step=3)
    for step in range(4, 8):
        second.log({"step": step, "loss": 10.0 - step})
    second.close()
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 8))
    deadline = time.monotonic() + 20
    while True:  # W&B's service may still be flushing the second file after finish() returned
        try:
            runs = [_parse(f) for f in sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))]
        except AssertionError:
            runs = []
        if (len(runs) == 2 and all(r.run_id for r in runs)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id  # one W&B run, resumed
    steps = [h["step"] for run in runs for h in run.history]
    assert sorted(steps) == list(range(1, 8)), steps  # every step once


# --- kill -9 of a Ray Train worker ---------------------------------------------------------------------------

def own_processes(marker: str) -> list[psutil.Process]:
    """This session's processes (descendants of the pytest process) whose command line holds ``marker``."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return sorted(found, key=lambda p: p.pid)


class KillWhenCheckpointed(threading.Thread):
    """Once ``root/step_N`` is complete, SIGKILL one of this session's Ray Train worker processes, once."""

    def __init__(self, root: str, step: int, which: int = -1, timeout: float = 600):
        super().__init__(daemon=True)
        self.root, self.step, self.which, self.timeout = root, step, which, timeout
        self.killed_at: float | None = None
        self.pid: int | None = None
        self.newest_at_kill: int | None = None

    def run(self) -> None:
        marker = Path(self.root, f"step_{self.step:08d}", COMPLETE)
        deadline = time.monotonic() + self.timeout
        while not marker.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        workers = own_processes("RayTrainWorker")
        if not workers:
            return
        victim = workers[self.which]
        os.kill(victim.pid, signal.SIGKILL)
        self.killed_at, self.pid = time.time(), victim.pid
        time.sleep(3)  # a survivor may still finish a marker whose shards were all written: that one counts
        found = newest_complete(self.root)
        self.newest_at_kill = found[0] if found else None


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _check_killed_run(clean, killed, killer: KillWhenCheckpointed, total: int, keep: int, every: int) -> dict:
    from zephyr_ray.tracking import read_metrics

    assert killer.pid is not None, "the worker was never killed"
    restarts = [json.loads(line) for line in (killed.output_dir / "restarts.jsonl").read_text().splitlines()]
    # Resumed from the newest checkpoint complete when the attempt died, never an older one or step 0.
    assert [r["step"] for r in restarts] == [killer.newest_at_kill]
    assert killer.newest_at_kill >= killer.step
    ma, mb = read_metrics(clean.output_dir), read_metrics(killed.output_dir)
    assert [m["step"] for m in mb] == [m["step"] for m in ma] == list(range(1, total + 1)), "every step once"
    assert [m["loss"] for m in mb] == pytest.approx([m["loss"] for m in ma], abs=1e-4)
    diff = _max_abs_diff(clean.model_dir, killed.model_dir)
    assert diff <= 1e-4, diff
    # train.keep_checkpoints holds, counting the ones Ray never registered; no half-written one is left.
    root = Path(killer.root)
    left = sorted(int(p.name[5:]) for p in root.iterdir())
    assert left == list(range(every, total + 1, every))[-keep:], left
    assert all((root / f"step_{s:08d}" / COMPLETE).exists() for s in left)
    recovery = restarts[0]["time"] - killer.killed_at
    return {"killed_pid": killer.pid, "resumed_at": restarts[0]["step"], "recovery_s": round(recovery, 1),
            "max_abs_weight_diff": diff}


@pytest.mark.ray
@pytest.mark.slow
def test_kill9_of_a_train_worker_resumes_from_the_newest_complete_checkpoint_sft(ray_cluster, tiny_model, tmp_path):
    from zephyr_ray.config import load_config
    from zephyr_ray.train.loop import checkpoint_root
    from zephyr_ray.train.sft import run_sft

    total, every, keep = 12, 3, 2
    # ZeRO-3 (parameters sharded across the workers: the hardest state to put back together)
    common = [f"model.path={tiny_model}", "wandb.enabled=false", f"train.max_steps={total}",
              "deepspeed.config=configs/deepspeed/zero3.json",
              f"train.checkpoint_every={every}", f"train.keep_checkpoints={keep}", "run.max_failures=1"]
    clean = run_sft(load_config(ROOT / "configs/tiny/sft.yaml", [*common, f"run.output_dir={tmp_path / 'clean'}"]))
    cfg = load_config(ROOT / "configs/tiny/sft.yaml", [*common, f"run.output_dir={tmp_path / 'killed'}"])
    killer = KillWhenCheckpointed(checkpoint_root(cfg), step=3)
    killer.start()
    killed = run_sft(cfg)
    killer.join(timeout=10)
    figures = _check_killed_run(clean, killed, killer, total, keep, every)
    print("dSFT kill -9:", figures)


@pytest.mark.ray
@pytest.mark.slow
def test_kill9_of_rank0_resumes_from_the_newest_complete_checkpoint_dpo(ray_cluster, tiny_model, tmp_path):
    from zephyr_ray.config import DPORecipe, load_config
    from zephyr_ray.data.io import write_jsonl
    from zephyr_ray.data.samples import sample_preferences
    from zephyr_ray.train.dpo import run_dpo
    from zephyr_ray.train.loop import checkpoint_root

    pairs = write_jsonl(sample_preferences(48, seed=2), tmp_path / "prefs.jsonl")
    total, every, keep = 10, 2, 2
    common = [f"model.path={tiny_model}", "wandb.enabled=false", f"data.path={pairs}", "train.epochs=4",
              "train.micro_batch_size=4", f"train.max_steps={total}", f"train.checkpoint_every={every}",
              f"train.keep_checkpoints={keep}", "run.max_failures=1", "data.shuffle=false",
              "dpo.ref.mode=online"]  # the reference actor pool has its own kill test
    clean = run_dpo(load_config(ROOT / "configs/tiny/dpo.yaml", [*common, f"run.output_dir={tmp_path / 'clean'}"],
                                DPORecipe))
    cfg = load_config(ROOT / "configs/tiny/dpo.yaml", [*common, f"run.output_dir={tmp_path / 'killed'}"], DPORecipe)
    killer = KillWhenCheckpointed(checkpoint_root(cfg), step=4, which=0)  # the lowest pid: usually rank 0
    killer.start()
    killed = run_dpo(cfg)
    killer.join(timeout=10)
    figures = _check_killed_run(clean, killed, killer, total, keep, every)
    print("dDPO kill -9:", figures)


# --- kill -9 of an actor of a pool -------------------------------------------------------------------------

class KillWhenWritten(threading.Thread):
    """SIGKILL this session's process whose command line holds ``marker`` (an actor of the pool), once: when
    ``folder`` holds a ``*.parquet`` file, or (``folder`` None) once the actor has used ``cpu_s`` CPU seconds."""

    def __init__(self, folder: Path | None, marker: str, cpu_s: float = 0.0, timeout: float = 300):
        super().__init__(daemon=True)
        self.folder, self.marker, self.cpu_s, self.timeout = folder, marker, cpu_s, timeout
        self.pid: int | None = None
        self.written_at_kill = 0
        self.restarted = False

    def _due(self, actor: psutil.Process) -> bool:
        if self.folder is not None:
            return bool(list(self.folder.glob("*.parquet")))
        try:
            t = actor.cpu_times()
        except psutil.Error:
            return False
        return t.user + t.system >= self.cpu_s

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            actors = own_processes(self.marker)
            if actors and self._due(actors[0]):
                self.written_at_kill = len(list(self.folder.glob("*.parquet"))) if self.folder else 0
                os.kill(actors[0].pid, signal.SIGKILL)
                self.pid = actors[0].pid
                break
            time.sleep(0.02)
        while self.pid is not None and time.monotonic() < deadline and not self.restarted:
            # Ray brings a new actor up to redo the dead one's task: proof the kill landed mid-pass.
            self.restarted = any(p.pid != self.pid for p in own_processes(self.marker))
            time.sleep(0.02)


def _pool_kill(run, folder: Path | None, marker: str, cpu_s: float = 0.0):
    killer = KillWhenWritten(folder, marker, cpu_s)
    killer.start()
    t0 = time.monotonic()
    result = run()
    killer.join(timeout=5)
    assert killer.pid is not None, f"no {marker} actor was killed (the pass ended first?)"
    assert killer.restarted, f"no {marker} actor came up after the kill"
    return result, killer, time.monotonic() - t0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.ray
def test_kill9_of_a_generation_actor_and_a_judge_actor_loses_no_row_and_repeats_none(ray_cluster, tmp_path):
    from dataclasses import replace

    from zephyr_ray.config import AIFRecipe, GenerateRecipe, PromptsConfig, load_config
    from zephyr_ray.feedback.aif import _judge, load_completions
    from zephyr_ray.generation.pool import KEY
    from zephyr_ray.generation.run import run_generate

    n = 16
    overrides = [f"prompts.limit={n}", "engine.rows_per_task=2", "engine.batch_size=2", "sampling.temperature=0",
                 "sampling.max_new_tokens=12"]

    def gen(out):
        return run_generate(load_config(ROOT / "configs/tiny/generate.yaml", [f"run.output_dir={out}", *overrides],
                                        GenerateRecipe))

    clean = _jsonl(gen(tmp_path / "clean"))
    path, killer, seconds = _pool_kill(lambda: gen(tmp_path / "killed"), tmp_path / "killed" / "completions" / "tiny-a",
                                       "_EngineActor")
    killed = _jsonl(path)
    ids = [r["prompt_id"] for r in killed]
    assert sorted(ids) == sorted(set(ids)) == [f"prompt-0-{i:05d}" for i in range(n)]  # each row exactly once
    assert killed == clean
    print(f"generation actor kill -9: pid {killer.pid} after {killer.written_at_kill} parts; pass {seconds:.1f} s")

    aif = load_config(ROOT / "configs/tiny/aif.yaml", [], AIFRecipe)
    judge = replace(aif.judges[0], engine=replace(aif.judges[0].engine, rows_per_task=2, batch_size=2,
                                                   threads_per_actor=1))
    judge = replace(judge, aspects=judge.aspects[:2])

    def rate(out):
        table = _judge(load_completions(str(tmp_path / "clean" / "completions.jsonl"), PromptsConfig()), judge, out)
        return sorted(table.to_pylist(), key=lambda r: r[KEY])

    clean_scores = rate(tmp_path / "judge-clean")
    scores, killer, seconds = _pool_kill(lambda: rate(tmp_path / "judge-killed"),
                                         tmp_path / "judge-killed" / "scores" / judge.engine.name, "_EngineActor")
    keys = [r[KEY] for r in scores]
    assert len(keys) == len(set(keys)) == n
    assert scores == clean_scores
    print(f"judge actor kill -9: pid {killer.pid} after {killer.written_at_kill} parts; pass {seconds:.1f} s")


@pytest.mark.ray
def test_kill9_of_a_reference_logprob_actor_loses_no_pair_and_repeats_none(ray_cluster, tiny_model, tmp_path):
    import functools

    import pyarrow.parquet as pq

    from zephyr_ray.config import DPORecipe, load_config
    from zephyr_ray.data.io import write_jsonl
    from zephyr_ray.data.pipeline import stage_dataset
    from zephyr_ray.data.preference import preference_examples, preference_schema
    from zephyr_ray.data.readers import read_rows
    from zephyr_ray.data.samples import sample_preferences
    from zephyr_ray.train.dpo import precompute_reference
    from zephyr_ray.train.objectives import REF_COLUMNS

    pairs = write_jsonl(sample_preferences(400, seed=3), tmp_path / "prefs.jsonl")
    cfg = load_config(ROOT / "configs/tiny/dpo.yaml", [f"model.path={tiny_model}", f"data.path={pairs}",
                                                       "data.shuffle=false", "dpo.ref.batch_size=2",
                                                       "dpo.ref.threads_per_actor=1"], DPORecipe)

    def ref_pass(out: Path) -> dict:
        examples = functools.partial(preference_examples, max_prompt_length=cfg.dpo.max_prompt_length)
        ds = stage_dataset(read_rows(str(pairs)), examples, preference_schema(), tiny_model, cfg.data)
        precompute_reference(ds, tiny_model, out, cfg)
        table = pq.read_table(out / "ref_logps")
        ids = [tuple(s) for s in table.column("sample_ids").to_pylist()]
        assert len(ids) == len(set(ids)), "a pair written twice"
        return dict(zip(ids, zip(*(table.column(c).to_pylist() for c in REF_COLUMNS), strict=True), strict=True))

    t0 = time.monotonic()
    clean = ref_pass(tmp_path / "clean")
    clean_s = time.monotonic() - t0
    # Ray Data writes the pass's Parquet at its end: kill once the actor has worked a few CPU seconds
    # (loading the model takes about one).
    killed, killer, seconds = _pool_kill(lambda: ref_pass(tmp_path / "killed"), None, "ReferenceLogps", cpu_s=3.0)
    assert killed.keys() == clean.keys() and len(clean) > 0
    for key, (chosen, rejected) in clean.items():
        assert killed[key] == pytest.approx((chosen, rejected), abs=1e-5), key
    print(f"reference actor kill -9: pid {killer.pid}; pass {seconds:.1f} s (clean {clean_s:.1f} s)")


# kill -9 of the pipeline driver (a Ray job), then --resume: tests/test_jobs.py, the suite's one full pipeline run.


# --- user errors as one line, exit code 2, the trace in a log file -----------------------------------------

def _cli(*args: str, env: dict | None = None, cwd: Path = ROOT):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "zephyr_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _one_line_error(proc, *parts: str) -> Path:
    """Exit code 2, no traceback on stderr, the last line names what is wrong and the log with the trace."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for part in parts:
        assert part in last, last
    log = Path(last.rsplit("(full trace: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    return log


def test_missing_paths_fail_before_ray_starts_with_one_line(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = _cli("sft", "--config", "configs/tiny/sft.yaml", f"data.path={tmp_path}/nope.jsonl", f"model.path={empty}",
                f"run.output_dir={out}", env={"RAY_ADDRESS": "127.0.0.1:1"})  # would fail loudly if Ray were used
    log = _one_line_error(proc, "config error:", f"data.path={tmp_path}/nope.jsonl: no such file",
                          f"model.path={empty}: the folder has no config.json")
    assert log == out / "error.log"  # the run folder's, named on the line
    assert time.monotonic() - t0 < 60
    # A path that is a file where a model folder is needed; the distillation teacher and a pipeline section.
    proc = _cli("sft", "--config", "configs/tiny/sft_distill.yaml", f"distill.teacher={tmp_path}/t",
                f"run.output_dir={out}")
    _one_line_error(proc, f"distill.teacher={tmp_path}/t: no such model folder")
    proc = _cli("pipeline", "--config", "configs/tiny/pipeline.yaml", f"aif.prompts.path={tmp_path}/p.jsonl",
                f"pipeline.runs_dir={tmp_path}/runs")
    log = _one_line_error(proc, f"aif.prompts.path={tmp_path}/p.jsonl: no such file")
    assert log.name.startswith("zephyr-ray-error-") and not (tmp_path / "runs").exists()  # before any run folder
    log.unlink()


def test_pipeline_chained_paths_are_not_checked_but_the_users_are():
    from zephyr_ray.config import PipelineRecipe, load_config
    from zephyr_ray.inputs import pipeline_path_problems

    assert pipeline_path_problems(load_config(ROOT / "configs/tiny/pipeline.yaml", [], PipelineRecipe)) == []
    cfg = load_config(ROOT / "configs/tiny/pipeline.yaml", ["eval.judge.engine.path=./no/judge"], PipelineRecipe)
    assert pipeline_path_problems(cfg) == [
        "eval.judge.engine.path=./no/judge: no such model folder; set eval.judge.engine.path to an existing folder "
        "or a hub id"]
    # A hub id is not a local path: left to the loader.
    hub = load_config(ROOT / "configs/tiny/pipeline.yaml", ["sft.model.path=HuggingFaceH4/zephyr-7b-beta"],
                      PipelineRecipe)
    assert pipeline_path_problems(hub) == []


@pytest.mark.ray
def test_a_bad_row_found_on_the_cluster_ends_in_one_line_and_exit_code_2(ray_cluster, tmp_path):
    rows = [json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})] * 3
    rows.insert(1, "{not json")
    rows.append(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}))
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    env = {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = _cli("sft", "--config", "configs/tiny/sft.yaml", f"data.path={data}", f"run.output_dir={tmp_path / 'run'}",
                "wandb.enabled=false", "data.shuffle=false", env=env)
    log = _one_line_error(proc, "bad input row:", f"{data} line 2")  # the first bad row; line 5 (role) is next
    assert log == tmp_path / "run" / "error.log"


# --- results where they last under `ray job submit` --------------------------------------------------------

def test_under_a_ray_job_relative_outputs_go_to_the_persistent_base(tmp_path, monkeypatch, capsys):
    from zephyr_ray.cluster import BASE_ENV, open_run, output_path
    from zephyr_ray.config import ConfigError, SFTRecipe, load_config
    from zephyr_ray.pipeline import new_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert output_path("runs/x") == tmp_path / "runs" / "x"  # not a job: the working directory, as before
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's driver
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "base"))
    cfg = load_config(ROOT / "configs/tiny/sft.yaml", ["run.output_dir=runs/sft"], SFTRecipe)
    placed, out = open_run(cfg)
    assert out == tmp_path / "base" / "runs" / "sft" and placed.run.output_dir == str(tmp_path / "base/runs/sft")
    assert new_run_dir("runs").parent == tmp_path / "base" / "runs"
    assert output_path("/abs/x") == Path("/abs/x")  # absolute paths are the user's
    assert f"resolve against {tmp_path / 'base'}" in capsys.readouterr().out
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "file" / "base"))
    with pytest.raises(ConfigError, match=f"{BASE_ENV}=.*file/base: not writable"):
        output_path("runs/x")


# --- a lost node (ray.cluster_utils.Cluster) ------------------------------------------------------------

@pytest.mark.slow
def test_a_lost_node_resumes_from_the_newest_complete_checkpoint_once_capacity_returns(tiny_model, tmp_path):
    """A head and two worker nodes (``tests/lost_node.py``, its own ``ray.cluster_utils.Cluster`` in a child
    process): the node of a Train worker is removed after the step-2 checkpoint, a replacement joins 5 s later,
    and the run finishes from the newest complete checkpoint on the storage every node sees."""
    import subprocess
    import sys

    from zephyr_ray.tracking import read_metrics

    proc = subprocess.run([sys.executable, "-m", "tests.lost_node", str(tmp_path), tiny_model], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "lost_node.json").read_text())
    assert record["driver_rc"] == 0, record["driver_tail"]
    run = Path(record["run_dir"])
    restarts = [json.loads(line) for line in (run / "restarts.jsonl").read_text().splitlines()]
    # The newest checkpoint complete when the node went (step 2, or one the survivors had finished).
    assert [r["step"] for r in restarts] == [record["newest_complete"]] and record["newest_complete"] >= 2
    assert restarts[0]["time"] > record["replaced_at"]  # it waited for capacity, then went on
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 9))
    assert Path(record["checkpoints"]).is_relative_to(tmp_path / "shared")  # run.storage_path
    print(f"lost node: worker {record['worker_pid']}'s node removed, newest complete {record['newest_complete']}, "
          f"replaced {record['replaced_at'] - record['removed_at']:.1f} s later; resumed at step "
          f"{restarts[0]['step']} {restarts[0]['time'] - record['removed_at']:.1f} s after the loss")


# --- Serve keeps serving when a replica dies ---------------------------------------------------------------

SERVE_MODEL = "zephyr-tiny-faults"


async def _stream_once(aclient, i: int) -> str:
    """One streamed chat; a stream that ends without a finish_reason is an error too (cut off silently)."""
    stream = await aclient.chat.completions.create(
        model=SERVE_MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=32,
        temperature=0, stream=True)
    finish, text = None, ""
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    if finish is None:
        raise RuntimeError("stream ended without a finish_reason (cut off silently)")
    return text


@pytest.mark.ray
@pytest.mark.slow
def test_kill9_of_a_serve_replica_errors_in_flight_requests_and_serving_goes_on(ray_cluster, tiny_model):
    import asyncio

    import httpx
    import openai
    from openai import AsyncOpenAI
    from ray import serve

    from zephyr_ray.cluster import free_port
    from zephyr_ray.config import ServeRecipe, load_config
    from zephyr_ray.serve.app import build_app

    port = free_port()
    cfg = load_config(ROOT / "configs/tiny/serve.yaml", [
        f"engine.path={tiny_model}", f"engine.name={SERVE_MODEL}", f"serve.port={port}", "serve.num_replicas=2",
        "serve.num_cpus=0.25", "serve.torch_threads=1", "serve.max_batch_size=8"], ServeRecipe)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="faults", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    records: list[dict] = []
    state: dict = {}
    after_s, clients = 30.0, 16

    async def client(aclient, c: int):
        i = 0
        while "killed_at" not in state or time.time() < state["killed_at"] + after_s + 10:
            t0 = time.time()
            try:
                await asyncio.wait_for(_stream_once(aclient, c * 1000 + i), timeout=90)
                outcome = "ok"
            except asyncio.TimeoutError:
                outcome = "hang"
            except openai.APIError as e:
                outcome = f"openai.{type(e).__name__}"
            except Exception as e:  # noqa: BLE001 (recorded: the test asserts there is none)
                outcome = f"other.{type(e).__name__}: {e}"
            records.append({"start": t0, "end": time.time(), "outcome": outcome})
            i += 1

    async def killer():
        while sum(r["outcome"] == "ok" for r in records) < clients:
            await asyncio.sleep(0.05)
        replicas = own_processes("ServeReplica:faults")
        assert len(replicas) == 2, [" ".join(p.cmdline()) for p in replicas]
        os.kill(replicas[0].pid, signal.SIGKILL)
        state["killed_at"], state["pid"] = time.time(), replicas[0].pid

    async def main():
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60) as aclient:
            await asyncio.gather(killer(), *[client(aclient, c) for c in range(clients)])

    try:
        asyncio.run(main())
        deadline = time.time() + 120
        while len(own_processes("ServeReplica:faults")) < 2 and time.time() < deadline:
            time.sleep(0.5)
        back = len(own_processes("ServeReplica:faults"))
        health = httpx.get(f"{base}/health", timeout=30).status_code
    finally:
        serve.delete("faults")
        serve.shutdown()
    killed = state["killed_at"]
    failed = [r for r in records if r["outcome"] != "ok"]
    assert not [r for r in failed if not r["outcome"].startswith("openai.")], failed  # no hang, no silent cut
    late = [r for r in records if r["start"] > killed + after_s]
    assert late and all(r["outcome"] == "ok" for r in late)
    first_new = min(r["end"] for r in records if r["start"] > killed and r["outcome"] == "ok")
    assert back == 2 and health == 200  # the replica came back
    print(f"serve replica kill -9: {len(records)} requests, {len(failed)} failed "
          f"({sorted({r['outcome'] for r in failed})}), first new success {first_new - killed:.2f} s after the kill")
