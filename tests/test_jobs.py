"""``ray job submit`` end to end: a token-authenticated local head started by the test, the pipeline job uploaded
as a working_dir (its driver killed -9, then the run resubmitted with ``--resume``), and only that head stopped
afterwards.

Token auth (Ray >= 2.52; turned on by default for local clusters in 2.59+): ``RAY_AUTH_MODE=token`` must be
set on every process, cluster and CLI alike, and each of them looks the token up in ``RAY_AUTH_TOKEN``, then
the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. ``ray start`` never writes a token
(only ``ray.init()`` of a new local cluster or ``ray get-auth-token --generate`` do), so the test makes its
own token and passes it to both sides in ``RAY_AUTH_TOKEN``: nothing depends on, or touches, the shared
``~/.ray/auth_token``.

``ray stop`` cannot target one cluster (it stops every Ray process of the machine), so the teardown stops
the processes of this head only: those whose command line names the head's temp dir, with all their
descendants (workers retitle themselves ``ray::...`` but are children of the raylet).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
# Never uploaded (also in .gitignore, which Ray honours, but that can be switched off by
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): the venv alone is far over the 512 MiB working_dir limit.
EXCLUDES = [".git", ".venv", "runs", "bench/results", "wandb", "**/__pycache__", ".pytest_cache", ".ruff_cache",
            "*.egg-info", ".whl", "shared"]
JOB_TIMEOUT_S = 240


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    temp_dir: str
    gcs_port: int
    dashboard: str
    env: dict[str, str]

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RAY), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)


def _cluster_processes(temp_dir: str, gcs_port: int):
    """This head's processes: command line naming its temp dir or GCS port, plus their descendants."""
    import psutil

    marks = (temp_dir, f"--gcs_server_port={gcs_port}", f"127.0.0.1:{gcs_port}")
    me = os.getpid()
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != me and any(m in cmd for m in marks):
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _stop_cluster(temp_dir: str, gcs_port: int) -> list[str]:
    """SIGTERM, then (3 s on: some of Ray's processes ignore it for longer) SIGKILL, this head's processes; the
    ones still alive (should be none)."""
    import psutil

    procs = _cluster_processes(temp_dir, gcs_port)
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            break
    procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    procs += [p for p in _cluster_processes(temp_dir, gcs_port) if p.status() != psutil.STATUS_ZOMBIE]
    return [f"{p.pid} {p.name()}" for p in procs]


@pytest.fixture
def ray_head() -> Iterator[Head]:
    # Short: the raylet's and plasma's unix sockets live under it (sun_path is 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="zr", dir="/tmp")
    gcs, dash, client, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}")
    head = Head(temp_dir, gcs, f"http://127.0.0.1:{dash}", env)
    try:
        start = head.ray(
            "start", "--head", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={200 * 2**20}", "--disable-usage-stats",
            timeout=180,
        )
        assert start.returncode == 0, f"ray start failed:\n{start.stdout}\n{start.stderr}"
        yield head
    finally:
        alive = _stop_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"processes of the test's Ray head still alive: {alive}"


def _job_id(out: str) -> str:
    for word in out.replace("'", " ").split():
        if word.startswith("raysubmit_"):
            return word
    raise AssertionError(f"no job id in:\n{out}")


def _status(job: str, out: str) -> str:
    """The final state ``ray job status`` reports (cli.py ``_log_job_status``), or "" while it runs."""
    out = out.lower()
    for state, msg in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
        if f"job '{job.lower()}' {msg}" in out:
            return state
    return ""


def _poll(head: Head, job: str, until, deadline: float, every: float = 10.0) -> str:
    """Wait for ``until()`` while the job runs; ``ray job status`` (a second of CPU each) every ``every`` s.
    The job's final state, or "" while it still runs."""
    checked = time.monotonic()
    while time.monotonic() < deadline and not until():
        if time.monotonic() - checked > every:
            checked = time.monotonic()
            status = head.ray("job", "status", "--address", head.dashboard, job)
            if state := _status(job, status.stdout + status.stderr):
                return state
        time.sleep(0.1)
    return ""


# One pipeline run covers `ray job submit` / status / logs against a token-auth head and the recipe end to end
# (a stage's own job entrypoint is the same thin wrapper): the suite's only full pipeline run.


@pytest.fixture
def wandb_service() -> str:
    """A live W&B service named in this process's environment (``WANDB_SERVICE``), as in a notebook or shell
    that used W&B before starting Ray: a head started afterwards (``ray_head``, listed after this fixture) and its
    workers inherit it."""
    import wandb

    wandb.setup()
    return os.environ["WANDB_SERVICE"]


def test_the_pipeline_job_killed_mid_dsft_resumes_as_a_job_and_runs_the_recipe_under_the_persistent_base(
        wandb_service: str, ray_head: Head, tmp_path):
    """The README's ``ray job submit ... -- python jobs/pipeline.py``, and a kill -9 of the job's driver (its
    process group: the driver and what it started) once dSFT has a complete checkpoint; the job fails, and
    resubmitting with ``--resume runs/<id>`` (relative: the job's working directory is Ray's per-session copy,
    so run paths resolve against ``ZEPHYR_RAY_BASE``, which the driver prints) continues dSFT from its newest
    complete checkpoint and runs AIF, dDPO and evaluation on the tiny recipe, each stage at its smallest.

    The head inherits a live W&B service: a Train worker that logged through it would leave the killed
    attempt's run open there, and the resumed dSFT's run (the same id) would be refused ("run ID ... is in
    use"); each worker starts its own."""
    import psutil

    from zephyr_ray.tracking import read_metrics
    from zephyr_ray.train.loop import COMPLETE, newest_complete

    from .test_pipeline import SMALL

    assert ray_head.env["WANDB_SERVICE"] == wandb_service
    base = tmp_path / "base"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"ZEPHYR_RAY_BASE": str(base)}}
    job = ["--address", ray_head.dashboard, "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env)]
    overrides = ["pipeline.runs_dir=runs", *SMALL, "sft.train.max_steps=8", "sft.train.checkpoint_every=2",
                 "sft.run.max_failures=0"]
    submit = ray_head.ray("job", "submit", "--no-wait", *job, "--", "python", "jobs/pipeline.py", "--config",
                          "configs/tiny/pipeline.yaml", *overrides)
    first = _job_id(submit.stdout + submit.stderr)
    deadline = time.monotonic() + 2 * JOB_TIMEOUT_S
    checkpointed = lambda: any(base.glob(f"runs/*/sft/ray/*/checkpoints/step_{2:08d}/{COMPLETE}"))  # noqa: E731
    assert _poll(ray_head, first, checkpointed, deadline) == "" and checkpointed(), "no dSFT checkpoint in time"
    [driver] = [p for p in _cluster_processes(ray_head.temp_dir, ray_head.gcs_port)
                if "jobs/pipeline.py" in " ".join(p.cmdline()) and p.name().startswith("python")]
    os.killpg(os.getpgid(driver.pid), signal.SIGKILL)
    [run] = list((base / "runs").iterdir())
    assert json.loads((run / "manifest.json").read_text())["stages"]["sft"]["status"] == "running"  # no last word
    assert _poll(ray_head, first, lambda: False, deadline, every=2) == "FAILED"

    def train_workers() -> list[psutil.Process]:
        return [p for p in _cluster_processes(ray_head.temp_dir, ray_head.gcs_port)
                if "RayTrainWorker" in " ".join(p.cmdline())]
    while train_workers() and time.monotonic() < deadline:
        time.sleep(0.2)  # Ray ends the dead driver's job: its workers go (they may finish one more checkpoint)
    on_disk = newest_complete(str(next(run.glob("sft/ray/*/checkpoints"))))[0]
    assert on_disk >= 2

    resume = ray_head.ray("job", "submit", *job, "--", "python", "jobs/pipeline.py", "--resume",
                          f"runs/{run.name}", timeout=2 * JOB_TIMEOUT_S)
    out = resume.stdout + resume.stderr
    assert resume.returncode == 0 and _status(_job_id(out), out) == "SUCCEEDED", out[-4000:]
    assert f"relative run and output paths resolve against {base}" in out
    assert list((base / "runs").iterdir()) == [run]  # the same run continued, not a new one

    m = json.loads((run / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "done" for s in ("sft", "aif", "dpo", "eval"))
    assert m["stages"]["sft"]["attempts"] == 2 and m["stages"]["dpo"]["attempts"] == 1 and m["resumed"]
    restarts = [json.loads(line) for line in (run / "sft" / "restarts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in restarts] == [on_disk]  # the newest complete checkpoint, not an older one
    assert [x["step"] for x in read_metrics(run / "sft")] == list(range(1, 9))  # each step once

    # The rest of the recipe, chained through the earlier artifacts.
    sft_model = Path(m["stages"]["sft"]["artifacts"]["model"])
    pairs = [json.loads(line) for line in Path(m["stages"]["aif"]["artifacts"]["pairs"]).read_text().splitlines()]
    assert len(pairs) == m["stages"]["aif"]["artifacts"]["count"] > 0
    assert {r["chosen_model"] for r in pairs} | {r["rejected_model"] for r in pairs} <= {"tiny-a", "tiny-b", "tiny-c", "dsft"}
    assert list((run / "aif" / "completions" / "dsft").glob("part-*.parquet"))  # the dSFT model answered
    assert m["versions"]["deepspeed"] and m["config"]["sft"]["train"]["max_steps"] == 8
    # dDPO started from the dSFT model, which was also its reference, and trained on the AIF pairs.
    dpo_cfg = json.loads((run / "dpo" / "config.json").read_text())
    assert dpo_cfg["model"]["path"] == str(sft_model) and dpo_cfg["dpo"]["ref"]["path"] is None
    assert dpo_cfg["data"]["path"] == m["stages"]["aif"]["artifacts"]["pairs"]
    for png in ("sft/curves.png", "dpo/curves.png", "eval/mt_bench_radar.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG", png
    assert (run / "eval" / "results.json").is_file() and (run / "dpo" / "model" / "config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    dpo_steps = json.loads((run / "dpo" / "data_report.json").read_text())["total_steps"]
    assert summary["sft"]["steps"] == 8 and summary["dpo"]["step"] == dpo_steps >= 1
    assert set(summary["eval"]["mt_bench"]) == {"dsft", "ddpo"} and set(summary["eval"]["win_rate"]) == {"dsft", "ddpo"}
    assert summary["dpo"]["rewards/accuracies"] is not None
    # The printed summary: the tiny pipeline's random judge scores in expected mode, so every number is there
    # and says how it was made; the last line names the model to chat with.
    assert "MT-Bench" in out and "win rate vs tiny-reference" in out and "expected: probability-weighted" in out
    assert summary["eval"]["judge_mode"] == "expected"
    assert all(s["overall"] is not None and s["parse_failures"] == 0 for s in summary["eval"]["mt_bench"].values())
    assert all(s["win_rate"] is not None for s in summary["eval"]["win_rate"].values())
    assert f"zephyr-ray chat --model {run / 'dpo' / 'model'}" in out
