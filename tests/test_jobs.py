"""``ray job submit`` end to end: a token-authenticated local head started by the test, one generate job
uploaded as a working_dir, and only that head stopped afterwards.

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
    """SIGTERM, then SIGKILL, this head's processes; the ones still alive (should be none)."""
    import psutil

    procs = _cluster_processes(temp_dir, gcs_port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=10)
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


# One job is enough to cover `ray job submit` / status / logs against a token-auth head: the pipeline's, below
# (it runs every stage as the job; a stage's own job entrypoint is the same thin wrapper).


def test_the_pipeline_job_with_a_relative_runs_dir_writes_under_the_persistent_base(ray_head: Head, tmp_path):
    """The README's ``ray job submit ... -- python jobs/pipeline.py``: the job's working directory is Ray's
    per-session copy (deleted with the session), so the relative ``pipeline.runs_dir`` resolves against
    ``ZEPHYR_RAY_BASE`` instead, which the driver prints; the run's results and the printed chat line are there.
    Every stage at its smallest (one step, one or two prompts, a few tokens)."""
    base = tmp_path / "base"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"ZEPHYR_RAY_BASE": str(base)}}
    small = ["pipeline.runs_dir=runs", "wandb.mode=disabled", "sft.train.max_steps=1", "sft.data.limit=16",
             "aif.prompts.limit=2", "aif.sampling.max_new_tokens=4", "dpo.train.max_steps=1",
             "eval.mt_bench.limit=1", "eval.mt_bench.sampling.max_new_tokens=4", "eval.alpaca_eval.limit=1",
             "eval.alpaca_eval.sampling.max_new_tokens=4", "eval.judge.sampling.max_new_tokens=4"]
    submit = ray_head.ray(
        "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/pipeline.py", "--config",
        "configs/tiny/pipeline.yaml", *small, timeout=2 * JOB_TIMEOUT_S,
    )
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0 and _status(_job_id(out), out) == "SUCCEEDED", out[-4000:]
    assert f"relative run and output paths resolve against {base}" in out
    [run] = list((base / "runs").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert {name: st["status"] for name, st in manifest["stages"].items()} == dict.fromkeys(
        ["sft", "aif", "dpo", "eval"], "done")
    assert (run / "summary.json").is_file() and (run / "eval" / "results.json").is_file()
    assert (run / "dpo" / "model" / "config.json").is_file()
    assert f"zephyr-ray chat --model {run / 'dpo' / 'model'}" in out
