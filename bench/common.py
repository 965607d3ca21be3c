"""Machinery shared by the throughput benchmarks (``sft_throughput.py``, ``dpo_throughput.py``).

Each benchmark runs every configuration of each side ("ours": zephyr_ray on a fresh local Ray cluster; "trl": a
TRL trainer) in a fresh subprocess of the benchmark script (``--_side``), so memory and threads do not leak from
one configuration into the next. The parent samples the subprocess's whole process tree (RSS, PSS, CPU), waits
for the shared machine to go quiet before each run, and keeps each configuration's best run over ``--repeats``
rounds. The code under test is a snapshot of zephyr_ray/ and configs/ taken at start, first on PYTHONPATH for
every process (Ray workers included), so edits to the checkout during a run do not mix versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = ROOT.parent / "shared" / "data" / "alpaca_eval"
DEFAULT_TORCH_EXTENSIONS = Path.home() / ".cache" / "zephyr-ray" / "torch_extensions"
MB = 2**20


# --------------------------------------------------------------------------------------------------------------
# small helpers


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def deltas(cumulative: list[float]) -> list[float]:
    """Per-step amounts from a cumulative counter (metrics.jsonl's ``tokens``/``samples``)."""
    return [b - a for a, b in zip([0, *cumulative], cumulative)]


def names_in(option: str, known: dict) -> list[str]:
    """The comma-separated configuration names of an option, each checked against ``known``."""
    names = [x for x in option.split(",") if x]
    unknown = [x for x in names if x not in known]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(known)}")
    return names


# --------------------------------------------------------------------------------------------------------------
# the code under test and the machine


def env_for_children(src: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS))
    env.setdefault("WANDB_SILENT", "true")
    env["WANDB_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)  # never join someone else's cluster
    # The snapshot of zephyr_ray/ + configs/ comes first on the path (ahead of the editable install), for the side
    # process and for the Ray processes it starts, so every configuration runs the same code.
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def snapshot_code(work: Path) -> tuple[Path, dict]:
    """Copy zephyr_ray/ and configs/ (others may edit the checkout while this runs) and describe the copy."""
    import hashlib

    src = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("zephyr_ray", "configs"):
        shutil.rmtree(src / name, ignore_errors=True)
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    digest = hashlib.sha256()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except Exception:
            return ""

    info = {
        "snapshot": str(src),
        "sha256": digest.hexdigest(),
        "git_head": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "zephyr_ray", "configs").splitlines(),
    }
    return src, info


def foreign_load(seconds: float = 2.0) -> float:
    """Cores busy over ``seconds`` minus this process's own use (call it while no side is running)."""
    import psutil

    me = psutil.Process()

    def sample() -> tuple[float, float]:
        m, t = psutil.cpu_times(), me.cpu_times()
        return m.user + m.nice + m.system + getattr(m, "irq", 0) + getattr(m, "softirq", 0), t.user + t.system

    (b0, o0), t0 = sample(), time.time()
    time.sleep(seconds)
    (b1, o1), t1 = sample(), time.time()
    return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))


def wait_quiet(max_wait: float, threshold: float) -> dict:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores."""
    t0 = time.time()
    load = foreign_load()
    while load >= threshold and time.time() - t0 < max_wait:
        load = foreign_load()
    return {"foreign_cores_at_start": round(load, 3), "waited_s": round(time.time() - t0, 1)}


def matmul_flops(n: int = 2048, seconds: float = 1.5, trials: int = 3) -> dict[str, float]:
    """fp32 C = A @ B FLOP/s with torch's default thread count: best and median of ``trials``."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    rates = []
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / trials:
            torch.matmul(a, b)
            reps += 1
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
    rates.sort()
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "best_flops": rates[-1],
        "median_flops": rates[len(rates) // 2],
    }


def machine_info(mm_before: dict, mm_after: dict) -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "matmul_fp32_before": mm_before,
        "matmul_fp32_after": mm_after,
        "matmul_fp32_peak_flops": max(mm_before["best_flops"], mm_after["best_flops"]),
        "loadavg_end": os.getloadavg(),
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "ray", "peft", "psutil")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the benches measure (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """The checkout's commit and whether the code under test (zephyr_ray/, configs/, bench/) differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "zephyr_ray", "configs", "bench", ":!bench/results"))}


def envelope(bench: str, quick: bool = False) -> dict:
    """What every ``bench/results/<bench>.json`` starts with, so a figure can be traced to its run: the bench, the
    command line, the commit, the machine (cores, CPU model, load) and package versions. ``quick``: a smoke run
    whose figures are not results (``bench/report.py`` refuses to publish them)."""
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return {
        "schema": 1,
        "bench": bench,
        "command": " ".join([exe, *sys.argv]),
        "quick": quick,
        "when_unix": time.time(),
        "git": git_state(),
        "machine": {"cores": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "packages": package_versions(),
    }


def write_result(out: Path, env: dict, payload: dict) -> None:
    """``env`` (from :func:`envelope`) + the bench's figures, with the load at the end added to the machine."""
    machine = {**env["machine"], **payload.get("machine", {}), "loadavg_end": os.getloadavg()}  # the bench's own
    # machine figures (matmul rates, foreign load) join the envelope's, never replace them
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**env, **payload, "machine": machine, "elapsed_s": time.time() - env["when_unix"]},
                              indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


def token_parity(tokens: dict[str, int], allowed: dict[str, int] | None = None) -> dict:
    """Did every configuration train the same real (non-pad) tokens? ``allowed``: per configuration, how many
    tokens it may differ from the reference (the first configuration) by, for a stated reason such as packing
    dropping a different remainder; beyond that no ratio may be printed."""
    names = list(tokens)
    if not names:
        return {"ok": False, "reference": None, "tokens": {}, "differences": {}, "allowed": {}, "beyond_allowed": {}}
    ref = tokens[names[0]]
    diff = {n: tokens[n] - ref for n in names}
    allowed = allowed or {}
    bad = {n: d for n, d in diff.items() if abs(d) > allowed.get(n, 0)}
    return {"ok": not bad, "reference": names[0], "tokens": tokens, "differences": diff, "allowed": allowed,
            "beyond_allowed": bad}


def fastest(summary: dict[str, dict], side: str, key: str) -> dict | None:
    """The configuration of ``side`` with the highest ``key`` in this run (the peer a headline ratio is against)."""
    rows = [v for v in summary.values() if v["side"] == side and v.get(key) is not None]
    return max(rows, key=lambda v: v[key], default=None)


def memory_goal(summary: dict[str, dict], ours: str, goal: float) -> list[dict]:
    """Summed training-process RSS of ``ours`` against each peer with the same number of training processes and
    against each single-process peer: ratio and whether it is <= ``goal``."""
    o = summary[ours]
    out = []
    for v in summary.values():
        if v["side"] == o["side"] or v.get("train_sum_rss_mb") is None or not o.get("train_sum_rss_mb"):
            continue
        if v["train_processes"] in (1, o["train_processes"]):
            r = o["train_sum_rss_mb"] / v["train_sum_rss_mb"]
            out.append({"ours": ours, "peer": v["name"], "peer_processes": v["train_processes"],
                        "ours_processes": o["train_processes"], "ratio": r, "goal": goal, "met": r <= goal})
    return out


def bench_name(script: str, model: str | None) -> str:
    """A bench's name in bench/results/: the script's, plus the real model's when one is given (so the tiny and the
    real-model runs keep separate files)."""
    return script if not model else f"{script}-{Path(model).name.removesuffix('.gguf')}"


def headline(name: str, ours: dict | None, peer: dict | None, key: str, unit: str, parity_ok: bool,
             goal: float | None = None, lower_is_better: bool = False) -> dict:
    """One ratio for the README: ours against the named peer, or the reason there is none."""
    if ours is None or peer is None:
        return {"name": name, "ratio": None, "why_none": "a side failed", "unit": unit}
    if not parity_ok:
        return {"name": name, "ratio": None, "why_none": "token parity failed", "unit": unit,
                "ours_config": ours["name"], "peer_config": peer["name"]}
    r = ours[key] / peer[key] if peer[key] else None
    met = None if goal is None or r is None else (r <= goal if lower_is_better else r >= goal)
    return {"name": name, "ratio": r, "unit": unit, "ours_config": ours["name"], "ours_value": ours[key],
            "peer_config": peer["name"], "peer_value": peer[key], "goal": goal, "met": met}


# --------------------------------------------------------------------------------------------------------------
# measurements taken inside a side


def steady_state(ends: list[float], units: dict[str, list[float]], warmup: int) -> dict[str, float]:
    """Rates between the end of step ``warmup`` (of step 1 when ``warmup`` is 0) and the end of the last step
    (1-based steps): for each unit (tokens, pairs, ...) ``<unit>_per_s``, ``window_<unit>``, ``<unit>_per_step``."""
    if len(ends) <= warmup + 1:
        raise RuntimeError(f"only {len(ends)} steps finished; need more than warmup={warmup} + 1")
    first = max(warmup, 1)
    window = ends[-1] - ends[first - 1]
    steps = len(ends) - first
    out = {"window_s": window, "window_steps": steps, "step_time_s": window / steps}
    for unit, per_step in units.items():
        total = sum(per_step[first:])
        out.update({f"{unit}_per_s": total / window, f"window_{unit}": total, f"{unit}_per_step": total / steps})
    out.update({"window_start_unix": ends[first - 1], "window_end_unix": ends[-1]})
    return out


class MetricsTail(threading.Thread):
    """Records the wall time at which each step's line appears in metrics.jsonl (tailed every 20 ms)."""

    def __init__(self, path: Path, period: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.period = path, period
        self.stop_event = threading.Event()
        self.arrivals: dict[int, float] = {}

    def run(self) -> None:
        pos, buf = 0, ""
        while True:
            stopping = self.stop_event.is_set()  # one more read after stop, so no line is missed
            if self.path.exists() and self.path.stat().st_size > pos:
                now = time.time()
                with self.path.open() as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    if line.strip():
                        self.arrivals.setdefault(int(json.loads(line)["step"]), now)
            if stopping:
                break
            self.stop_event.wait(self.period)

    def finish(self) -> dict[int, float]:
        self.stop_event.set()
        self.join()
        return self.arrivals


def start_local_ray(src: Path | None = None) -> tuple[float, str]:
    """A fresh 2-CPU local cluster owned (and shut down) by this process, never a running one (``RAY_ADDRESS``
    is dropped; the project's ``ensure_ray`` does the rest); with ``src``, checked to run that code snapshot in
    the driver and in Ray workers. Returns the ``ray.init`` time and the workers' package file."""
    import ray

    import zephyr_ray
    from zephyr_ray.cluster import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.time()
    ensure_ray(num_cpus=2)
    t_ray = time.time() - t0

    @ray.remote(num_cpus=0)
    def package_file() -> str:  # nested: pickled by value, so Ray workers need not import this module
        import zephyr_ray

        return zephyr_ray.__file__

    worker_pkg = ray.get(package_file.remote())
    if src is not None and not (worker_pkg.startswith(str(src)) and zephyr_ray.__file__.startswith(str(src))):
        raise RuntimeError(f"not running the snapshot: driver {zephyr_ray.__file__}, Ray worker {worker_pkg}")
    return t_ray, worker_pkg


def run_ours(run_fn: Callable, cfg, src: Path, out: Path) -> dict:
    """One of our stages (``run_sft`` / ``run_dpo``) on a fresh local cluster, its ``metrics.jsonl`` tailed so every
    optimizer step has its wall-clock end. Returns the metrics rows, the step ends and the timers around them."""
    import ray

    t_ray, worker_pkg = start_local_ray(src)
    tail = MetricsTail(out / "metrics.jsonl")
    tail.start()
    t1 = time.time()
    run_fn(cfg)
    t_fit = time.time() - t1
    arrivals = tail.finish()
    ray.shutdown()
    metrics = read_jsonl(out / "metrics.jsonl")
    return {"metrics": metrics, "ends": [arrivals[m["step"]] for m in metrics], "t_start": t1, "t_fit": t_fit,
            "ray_init_s": t_ray, "package_in_workers": worker_pkg,
            "data_report": json.loads((out / "data_report.json").read_text())}


def trl_figures(trainer, clock, train_output, t_train: float) -> dict:
    """What both benches record of a finished TRL run (rank 0's view)."""
    import torch

    return {"side": "trl", "steps": len(clock.ends), "step_end_unix_list": clock.ends, "train_s": t_train,
            "train_loss": train_output.training_loss, "threads": torch.get_num_threads(),
            "processes": trainer.args.world_size, "padding_free": trainer.padding_free}


def timed_on_local_ray(run_fn: Callable, cfg) -> tuple[object, float]:
    """``run_fn(cfg)`` on a fresh local cluster (``start_local_ray``), shut down afterwards: (its result, wall
    seconds of ``run_fn``)."""
    import ray

    start_local_ray()
    try:
        start = time.perf_counter()
        result = run_fn(cfg)
        return result, time.perf_counter() - start
    finally:
        ray.shutdown()


def flop_model(model_path: str, lengths: list[int], head_positions: int) -> dict:
    """Training FLOPs per token of ``model_path`` on sequences of ``lengths`` tokens, ``head_positions`` of which
    are followed by a trained token: 6 * N_body + 6 * N_head * f + 6 * n_layers * d_model * sum(n_i^2) / sum(n_i)
    (N_body = parameters outside the input embedding and LM head, which is needed only at the fraction f of
    positions; the last term is causal attention within each sequence, forward + backward). Both sides of a
    comparison get the same figure: useful work only, whatever a side computes beyond it."""
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    c = net.config
    total = sum(p.numel() for p in net.parameters())
    emb, out_w = net.get_input_embeddings().weight, net.get_output_embeddings().weight
    head = out_w.numel()
    body = total - emb.numel() - (0 if out_w is emb else head)  # a tied head (SmolLM2) is counted once in total
    s_eff = sum(x * x for x in lengths) / sum(lengths)
    f_head = head_positions / sum(lengths)
    arch = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    return {
        "params_total": total, "params_non_embedding": total - emb.numel(), "params_body": body,
        "params_head": head, "head_fraction": f_head, "attn_effective_len": s_eff,
        "flops_per_token": 6 * body + 6 * head * f_head + 6 * c.num_hidden_layers * c.hidden_size * s_eff,
        "flops_formula": "6*N_body + 6*N_head*f + 6*n_layers*d_model*sum(n_i^2)/sum(n_i); N_body = params outside "
        "the input embedding and LM head, f = fraction of positions followed by a trained token, n_i = tokens of "
        "each sequence after truncation",
        "arch": {k: getattr(c, k, None) for k in arch},
    }


def check_snapshot(src: str) -> None:
    """A TRL side imports zephyr_ray (tokenizer, data) from the snapshot too."""
    import zephyr_ray

    if not zephyr_ray.__file__.startswith(src):
        raise RuntimeError(f"not running the snapshot: {zephyr_ray.__file__}")


# TrainingArguments both benchmarks give TRL's trainers: AdamW and clipping as in our recipes, fp32 on CPU,
# no gradient checkpointing, nothing evaluated, saved, logged or reported during the run.
TRL_COMMON_ARGS = {
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "bf16": False,
    "fp16": False,
    "use_cpu": True,
    "gradient_checkpointing": False,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "seed": 42,
}


def step_clock(trainer):
    """A callback on a transformers ``Trainer`` recording the wall time of each optimizer step's end and the
    trainer's running count of training tokens (``_total_train_tokens``, kept by TRL's trainers) at that time."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cum_tokens: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.time())
            self.cum_tokens.append(trainer._total_train_tokens)

    clock = StepClock()
    trainer.add_callback(clock)
    return clock


# --------------------------------------------------------------------------------------------------------------
# process-tree sampler (runs in the parent, around each side's subprocess)


class TreeSampler(threading.Thread):
    """Peak summed RSS (every ``period`` s) and PSS (every ``pss_period`` s) of a process and its descendants,
    each process's own peak RSS/PSS, the summed RSS over time (for peaks within a phase), plus cumulative CPU of
    the tree and of the whole machine (to tell how busy everything else was)."""

    def __init__(self, pid: int, period: float = 1.0, pss_period: float = 5.0,
                 is_trainer: Callable[[str], bool] | None = None):
        super().__init__(daemon=True)
        import psutil

        # Which processes train (by label): their RSS/PSS are also summed per sample, so "all training processes"
        # is a simultaneous peak, not a sum of peaks reached at different times.
        self.is_trainer = is_trainer or (lambda label: False)
        self.peak_train_pss = 0

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.me = psutil.Process()  # this benchmark process (the sampler's own cost), kept out of "foreign"
        self.period, self.pss_period = period, pss_period
        self.stop_event = threading.Event()
        self.peak_rss, self.peak_pss, self.peak_procs = 0, 0, 0
        self.peak_breakdown: list[tuple[str, int]] = []
        self.peak_rss_by_pid: dict[int, int] = {}
        self.peak_group_rss: dict[str, int] = {}  # per group (TreeSampler.group), the peak of its per-sample sum
        self.peak_pss_by_pid: dict[int, int] = {}
        self.rss_series: list[tuple[float, int]] = []  # (unix time, summed RSS)
        self.cpu_by_pid: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        self.series: list[tuple[float, float, float, float]] = []  # (unix time, machine busy, tree, me) cpu-s
        self.per_pid: list[tuple[float, dict[int, float]]] = []  # (unix time, {pid: cpu-s})

    @staticmethod
    def _label(p) -> str:
        cmd = p.cmdline()  # raises for a process that is gone; [] while it exits (the caller keeps the old label)
        if not cmd:
            raise ValueError("no command line")
        if cmd[0].startswith("ray::"):
            return cmd[0]
        for part in cmd[:3]:
            base = os.path.basename(part)
            if base.endswith(".py") or base in ("raylet", "gcs_server"):
                return base
        return p.name()

    @staticmethod
    def group(label: str, root: bool, trainer: bool) -> str:
        """train (training processes), driver (the side's own process when it does not train), ray_workers (Ray Data
        tasks, actors), ray_daemons (GCS, raylet, dashboard, ...)."""
        if trainer:  # a single-process peer trains in the root process itself
            return "train"
        if root:
            return "driver"
        return "ray_workers" if label.startswith("ray::") else "ray_daemons"

    def _relabel(self, p) -> None:
        old = self.labels.get(p.pid, "")
        if not old.startswith("ray::") or old == "ray::IDLE":  # Ray retitles its workers once started
            with contextlib.suppress(Exception):
                self.labels[p.pid] = self._label(p)

    def _machine_busy(self) -> float:
        m = self.psutil.cpu_times()
        return (
            m.user + m.nice + m.system + getattr(m, "irq", 0) + getattr(m, "softirq", 0) + getattr(m, "steal", 0)
        )

    def run(self) -> None:
        last_pss = 0.0
        while not self.stop_event.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.NoSuchProcess:
                break
            total, parts = 0, []
            want_pss = time.time() - last_pss >= self.pss_period
            pss, train_pss = 0, 0
            group_rss: dict[str, int] = {}
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu_by_pid[p.pid] = t.user + t.system
                    self._relabel(p)
                    trainer = self.is_trainer(self.labels.get(p.pid, "?"))
                    if want_pss:
                        own_pss = p.memory_full_info().pss
                        pss += own_pss
                        train_pss += own_pss if trainer else 0
                        self.peak_pss_by_pid[p.pid] = max(self.peak_pss_by_pid.get(p.pid, 0), own_pss)
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    continue
                total += rss
                parts.append((self.labels.get(p.pid, "?"), rss))
                g = self.group(self.labels.get(p.pid, "?"), p.pid == self.root.pid, trainer)
                group_rss[g] = group_rss.get(g, 0) + rss
                self.peak_rss_by_pid[p.pid] = max(self.peak_rss_by_pid.get(p.pid, 0), rss)
            for g, rss in group_rss.items():
                self.peak_group_rss[g] = max(self.peak_group_rss.get(g, 0), rss)
            if want_pss:
                last_pss = time.time()
                self.peak_pss = max(self.peak_pss, pss)
                self.peak_train_pss = max(self.peak_train_pss, train_pss)
            if total > self.peak_rss:
                self.peak_rss, self.peak_procs = total, len(parts)
                self.peak_breakdown = sorted(parts, key=lambda x: -x[1])
            now = time.time()
            mine = self.me.cpu_times()
            self.rss_series.append((now, total))
            self.series.append((now, self._machine_busy(), sum(self.cpu_by_pid.values()), mine.user + mine.system))
            self.per_pid.append((now, dict(self.cpu_by_pid)))
            self.stop_event.wait(self.period)

    def _inside(self, start: float, end: float) -> list[tuple[float, float, float, float]] | None:
        inside = [s for s in self.series if start <= s[0] <= end]
        return inside if len(inside) >= 2 else None

    def foreign_cores(self, start: float, end: float) -> float | None:
        """Average cores used by processes outside the tree between ``start`` and ``end`` (unix time)."""
        inside = self._inside(start, end)
        if inside is None:
            return None
        (t0, b0, c0, m0), (t1, b1, c1, m1) = inside[0], inside[-1]
        return max(0.0, ((b1 - b0) - (c1 - c0) - (m1 - m0)) / (t1 - t0))

    def sampler_cores(self, start: float, end: float) -> float | None:
        """Average cores this (parent) process used in the window: the cost of sampling."""
        inside = self._inside(start, end)
        if inside is None:
            return None
        return (inside[-1][3] - inside[0][3]) / (inside[-1][0] - inside[0][0])

    def tree_cores(self, start: float, end: float) -> float | None:
        inside = self._inside(start, end)
        if inside is None:
            return None
        (t0, _, c0, _), (t1, _, c1, _) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)

    def cores_by_process(self, start: float, end: float) -> dict[str, float]:
        """Average cores each kind of process in the tree used between ``start`` and ``end``."""
        inside = [s for s in self.per_pid if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        out: dict[str, float] = {}
        for pid, cpu in b.items():
            label = self.labels.get(pid, "?")
            out[label] = out.get(label, 0.0) + (cpu - a.get(pid, 0.0)) / (t1 - t0)
        return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.005}

    def timeline(self, bin_s: float = 0.5) -> list[dict]:
        """Cores used per kind of process, in bins of ``bin_s`` seconds (for lining up with step times)."""
        out, prev = [], None
        for t, cpu in self.per_pid:
            if prev is not None and t - prev[0] < bin_s:
                continue
            if prev is not None:
                by: dict[str, float] = {}
                for pid, c in cpu.items():
                    label = self.labels.get(pid, "?")
                    by[label] = by.get(label, 0.0) + (c - prev[1].get(pid, 0.0)) / (t - prev[0])
                out.append({"t": round(t, 3), **{k: round(v, 2) for k, v in by.items() if v >= 0.02}})
            prev = (t, cpu)
        return out

    def peak_rss_between(self, start: float, end: float) -> int | None:
        """Peak summed RSS over the samples taken between ``start`` and ``end`` (None if no sample fell there)."""
        inside = [rss for t, rss in self.rss_series if start <= t <= end]
        return max(inside) if inside else None

    def memory(self) -> dict:
        """Memory three ways (MB): the largest training process, all training processes together (peak of the
        per-sample sum), the whole process tree; each as RSS and PSS (PSS splits shared pages between processes)."""
        own = [(pid, rss) for pid, rss in self.peak_rss_by_pid.items() if self.is_trainer(self.labels.get(pid, "?"))]
        largest = max(own, key=lambda x: x[1], default=None)
        return {
            "train_processes": len(own),
            "largest_train_rss_mb": largest[1] / MB if largest else None,
            "largest_train_pss_mb": (self.peak_pss_by_pid.get(largest[0], 0) / MB) if largest else None,
            "train_sum_rss_mb": self.peak_group_rss.get("train", 0) / MB if own else None,
            "train_sum_pss_mb": self.peak_train_pss / MB if own else None,
            "tree_rss_mb": self.peak_rss / MB,
            "tree_pss_mb": self.peak_pss / MB,
        }

    def processes(self) -> list[dict]:
        """Every process seen (``root``: the side's own process), with its own peak RSS and PSS, largest peak RSS
        first."""
        rows = [
            {
                "process": self.labels.get(pid, "?"),
                "pid": pid,
                "root": pid == self.root.pid,
                "peak_rss_mb": round(rss / MB, 1),
                "peak_pss_mb": round(self.peak_pss_by_pid[pid] / MB, 1) if pid in self.peak_pss_by_pid else None,
            }
            for pid, rss in self.peak_rss_by_pid.items()
        ]
        return sorted(rows, key=lambda r: -r["peak_rss_mb"])


# --------------------------------------------------------------------------------------------------------------
# running the sides


def run_side(script: Path, spec: dict, work: Path, env_extra: dict[str, str], timeout: float) -> dict:
    """Run ``script --_side`` for one configuration in a fresh subprocess, sampling its process tree.

    The side's result may name ``phases`` ({name: [start, end]} unix times); the peak summed RSS within each
    is added as ``peak_rss_mb_by_phase``."""
    name = spec["name"]
    spec_path, result_path, log_path = (work / f"{name}.{x}" for x in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [str(script), "--_side", spec["side"], "--_spec", str(spec_path), "--_result", str(result_path)]
    nproc = int(spec.get("nproc", 1))
    if nproc > 1:  # a peer run data-parallel: torchrun starts nproc copies of the side (rank 0 writes the result)
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    cmd = [sys.executable, *cmd]
    trainer_label = spec.get("trainer_label") or script.name
    t0 = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                env=env_for_children(Path(spec["src"]), env_extra))
        sampler = TreeSampler(proc.pid, is_trainer=lambda label: label.startswith(trainer_label))
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc = -9
        sampler.stop_event.set()
        sampler.join()
    wall = time.time() - t0
    if rc != 0 or not result_path.exists():
        lines = log_path.read_text(errors="replace").splitlines(keepends=True)
        # under torchrun the last lines are the launcher's; the rank's own exception comes earlier
        errors = [x for x in lines[:-40] if "Error" in x or "error:" in x][:10]
        tail = "".join([*errors, *(["...\n"] if errors else []), *lines[-40:]])
        return {"name": name, "side": spec["side"], "ok": False, "rc": rc, "log": str(log_path), "log_tail": tail}
    (work / f"{name}.cpu_timeline.json").write_text(json.dumps(sampler.timeline()))
    res = json.loads(result_path.read_text())
    start, end = res["steady"]["window_start_unix"], res["steady"]["window_end_unix"]
    res.update({
        "name": name,
        "ok": True,
        "rc": rc,
        "process_wall_s": wall,
        "log": str(log_path),
        "peak_rss_mb": sampler.peak_rss / MB,
        "peak_pss_mb": sampler.peak_pss / MB,
        "peak_rss_processes": sampler.peak_procs,
        "peak_rss_top": [{"process": n, "rss_mb": round(r / MB, 1)} for n, r in sampler.peak_breakdown[:8]],
        "peak_rss_by_process": sampler.processes(),
        "peak_group_rss_mb": {g: round(v / MB, 1) for g, v in sampler.peak_group_rss.items()},
        "memory": sampler.memory(),
        "foreign_cpu_cores_in_window": sampler.foreign_cores(start, end),
        "own_cpu_cores_in_window": sampler.tree_cores(start, end),
        "sampler_cpu_cores_in_window": sampler.sampler_cores(start, end),
        "cores_by_process_in_window": sampler.cores_by_process(start, end),
    })
    if "phases" in res:
        peaks = {k: sampler.peak_rss_between(*w) for k, w in res["phases"].items()}
        res["peak_rss_mb_by_phase"] = {k: None if v is None else v / MB for k, v in peaks.items()}
    return res


def _kill_tree(proc: subprocess.Popen) -> None:
    """The side and everything it started (its own Ray cluster), by pid, children first."""
    import psutil

    procs = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait()


def run_rounds(script: Path, specs: list[tuple[dict, dict]], work: Path, a: argparse.Namespace,
               describe: Callable[[dict], str]) -> list[dict]:
    """``a.repeats`` rounds over ``specs`` ((spec, extra env) pairs; order reversed every other round), each run
    after waiting for the machine to go quiet. ``describe(result)`` is the one-line progress report of a run."""
    runs: list[dict] = []
    for rnd in range(a.repeats):
        for spec, env in specs if rnd % 2 == 0 else specs[::-1]:
            quiet = wait_quiet(a.quiet_wait, a.quiet_threshold)
            # how fast the (virtual) host is right now: 2-core matmul varies +-20% from second to second here
            quiet["host_matmul_gflops_before"] = round(matmul_flops(seconds=1.0, trials=1)["best_flops"] / 1e9, 1)
            print(
                f"[bench] round {rnd + 1}/{a.repeats}: {spec['name']} (others using "
                f"{quiet['foreign_cores_at_start']:.2f} cores, waited {quiet['waited_s']:.0f}s; matmul now "
                f"{quiet['host_matmul_gflops_before']:.0f} GFLOP/s) ...",
                flush=True,
            )
            shutil.rmtree(spec["output_dir"], ignore_errors=True)
            res = run_side(script, spec, work, env, a.timeout)
            res.update({"round": rnd + 1, "config": {**spec, "env": env}, **quiet})
            if res["ok"]:
                print(f"[bench]   {describe(res)}, others used {fmt(res['foreign_cpu_cores_in_window'], '.2f')} "
                      "cores in the window", flush=True)
            else:
                print(f"[bench]   FAILED rc={res['rc']} (log {res['log']})", flush=True)
            runs.append(res)
    return runs


def best_per_config(runs: list[dict], names: list[str], key: Callable[[dict], float]) -> dict[str, dict]:
    """Each configuration's best successful run by ``key`` (configurations with none are left out)."""
    best = {}
    for name in names:
        ok = [r for r in runs if r["name"] == name and r["ok"]]
        if ok:
            best[name] = max(ok, key=key)
    return best


def best_of_side(best: dict[str, dict], side: str, key: Callable[[dict], float]) -> dict | None:
    return max((r for r in best.values() if r["side"] == side), key=key, default=None)


def print_failures(runs: list[dict]) -> None:
    for r in runs:
        if not r["ok"]:
            print(f"\n--- {r['name']} (round {r['round']}) log tail ---\n{r['log_tail']}")


# --------------------------------------------------------------------------------------------------------------
# the benchmark scripts' command line and session


def print_noise_notes(foreign_cores: dict[str, float | None], a: argparse.Namespace) -> None:
    """Flag configurations whose measured window shared the machine, and single-run results."""
    noisy = [name for name, cores in foreign_cores.items() if (cores or 0) > a.quiet_threshold]
    if noisy:
        print(
            f"WARNING: other processes used > {a.quiet_threshold} cores during {noisy}: those numbers are low; "
            "rerun on a quiet machine or with --repeats 2"
        )
    if a.repeats == 1:
        print(
            "note: on a shared 2-core VM single runs vary by +-15% (the host's matmul speed alone does); use "
            "--repeats 3 before drawing conclusions from differences that small"
        )


def add_comparison_args(ap: argparse.ArgumentParser, ours: dict, trl: dict, default_ours: str, default_trl: str
                        ) -> None:
    """The options both training benches take: the measured window, the model, which configurations run."""
    ap.add_argument("--steps", type=int, default=None,
                    help="measured optimizer steps per run (default: the rest of one epoch after the warmup steps)")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps excluded from the measurement")
    ap.add_argument("--max-length", type=int, default=None, help="default 1024 (512 with --model)")
    ap.add_argument("--model", default=None,
                    help="a real model both sides train instead of the tiny random one (an embedded name such as "
                    "smollm2-135m-instruct, a GGUF file or an HF folder; zephyr_ray.gguf_import.resolve)")
    ap.add_argument("--ours", default=None, help=f"of {list(ours)} (default {default_ours})")
    ap.add_argument("--trl", default=None, help=f"of {list(trl)} (default {default_trl})")


def plan_steps(units: int, global_batch: int, steps: int | None, warmup: int, what: str) -> tuple[int, int, int]:
    """(measured steps, total steps, epochs) for ``units`` rows or pairs in batches of ``global_batch``; by default
    the measured window is the rest of one epoch after the warmup steps."""
    epoch_steps = units // global_batch
    measured = steps if steps is not None else epoch_steps - warmup
    if measured < 2:
        raise SystemExit(f"{units} {what} make {epoch_steps} steps: too few; raise --limit")
    total = warmup + measured
    return measured, total, math.ceil(total / epoch_steps)


def split_batch(global_batch: int, parts: int, what: str) -> int:
    """The share of one of ``parts`` workers or processes; the global batch must divide evenly."""
    if global_batch % parts:
        raise SystemExit(f"--global-batch {global_batch} is not divisible by {parts} {what}")
    return global_batch // parts


def print_table(columns: list[tuple[str, str, str]], summary: dict[str, dict], specs: list, work: Path) -> None:
    """``columns`` = (key, header, format) rows of the table printed here and in docs/benchmarks.md."""
    widths = [max(len(h), 8) + 2 for _, h, _ in columns]
    print("".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths)))
    for spec, _ in specs:
        v = summary.get(spec["name"])
        if v is None:
            print(f"{spec['name']} FAILED (logs in {work})")
            continue
        print("".join(f"{v[k] if not f else fmt(v[k], f):>{w}}" for (k, _, f), w in zip(columns, widths)))


def ratio_text(h: dict, bold: bool = True) -> str:
    """One headline as a sentence: the ratio, both figures, both configurations, and the goal (the README's line;
    ``bold=False`` for the console)."""
    if h.get("ratio") is None:
        return f"{h['name']}: no ratio ({h.get('why_none', 'not measured')})"
    spec = ".0f" if max(abs(h["ours_value"]), abs(h["peer_value"])) >= 100 else ".2f"
    goal = ""
    if h.get("goal") is not None:
        sign = "<=" if h["unit"] == "MB" else ">="
        goal = f"; goal {sign} {h['goal']}x {'met' if h['met'] else 'not met'}"
    ratio = f"**{h['ratio']:.2f}x**" if bold else f"{h['ratio']:.2f}x"
    return (f"{h['name']}: {ratio} ({h['ours_config']} {h['ours_value']:{spec}} vs "
            f"{h['peer_config']} {h['peer_value']:{spec}} {h['unit']}{goal})")


def print_headlines(heads: list[dict], parity: dict) -> None:
    if not parity["ok"]:
        print(f"\nNO RATIO: the configurations trained different tokens beyond what packing explains: "
              f"{parity['beyond_allowed']} (reference {parity['reference']}, allowed {parity['allowed']})")
    for h in heads:
        print(ratio_text(h, bold=False))


def comparison_record(columns: list, summary: dict[str, dict], specs: list, ours: dict, trl: dict) -> dict:
    """The parts of a training bench's JSON both benches share: each side's configurations and the table."""
    return {
        "configs": {"ours": {s["name"]: ours[s["name"]] for s, _ in specs if s["side"] == "ours"},
                    "trl": {s["name"]: trl[s["name"]] for s, _ in specs if s["side"] == "trl"}},
        "table": {"columns": columns, "rows": [summary[s["name"]] for s, _ in specs if s["name"] in summary]},
    }


def add_common_args(ap: argparse.ArgumentParser, default_out: Path) -> None:
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over all configs (order reversed every other round); each config's best run counts",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=30,
        help="before each run, wait up to this many seconds for other processes to go quiet",
    )
    ap.add_argument("--quiet-threshold", type=float, default=0.25, help="cores used by others that count as quiet")
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--quick", action="store_true",
                    help="smallest settings (a minute or two): checks the bench end to end; its figures are not results")
    ap.add_argument("--_side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, help=argparse.SUPPRESS)


def side_main(a: argparse.Namespace, sides: dict[str, Callable[[dict], dict | None]]) -> None:
    """The body of a ``--_side`` subprocess: run one configuration's spec, write its result (under torchrun only
    rank 0 returns one; the other ranks return None)."""
    spec = json.loads(a._spec.read_text())
    result = sides[a._side](spec)
    if result is not None:
        a._result.write_text(json.dumps(result))


@dataclass
class Session:
    work: Path
    src: Path  # the code snapshot (first on sys.path from here on)
    code: dict
    env: dict  # envelope(): command, commit, machine, packages
    keep_work: bool


def start_session(work_dir: Path | None, prefix: str, note: str, quick: bool = False, bench: str | None = None
                  ) -> Session:
    """Work folder, code snapshot (put first on this process's path too), and the run's envelope for the record
    (``bench``: its name in bench/results/, default the script's)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS))
    env = envelope(bench or Path(sys.argv[0]).stem, quick)
    work = (work_dir or Path(tempfile.mkdtemp(prefix=prefix))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    src, code = snapshot_code(work)
    sys.path.insert(0, str(src))
    print(
        f"[bench] work dir {work}; code snapshot {code['sha256'][:12]} (HEAD {code['git_head'][:10]}, "
        f"{len(code['uncommitted'])} uncommitted files); {note}",
        flush=True,
    )
    return Session(work, src, code, env, keep_work=work_dir is not None)


def finish_session(s: Session, payload: dict, out: Path) -> None:
    write_result(out, s.env, {"code": s.code, **payload})
    if not s.keep_work:
        shutil.rmtree(s.work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Generation benches (engine vs naive loop, serving): prompts and models
# ---------------------------------------------------------------------------------------------------

ALPACA = SHARED_DATA_DIR / "completions.jsonl"
# A 19M-parameter random Mistral: big enough that matmuls, not Python, dominate generation on CPU.
MEDIUM = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
          "num_key_value_heads": 2}


def load_prompts(n: int) -> tuple[list[str], str]:
    if ALPACA.exists():
        with ALPACA.open(encoding="utf-8") as f:
            rows = [json.loads(line) for _, line in zip(range(n), f)]
        return [r["prompt"] for r in rows], str(ALPACA.relative_to(ROOT.parent))
    from zephyr_ray.data.samples import sample_prompts

    return [r["prompt"] for r in sample_prompts(n)], "zephyr_ray.data.samples.sample_prompts"


def build_model(kind: str, out: Path) -> str:
    """``tiny`` as built by the project; ``medium`` = the tiny tokenizer with a bigger random Mistral; anything else
    is a real model (an embedded name such as smollm2-135m-instruct, a GGUF file, an HF folder), resolved."""
    from zephyr_ray.gguf_import import resolve
    from zephyr_ray.models import build_tiny

    if kind not in ("tiny", "medium"):
        return resolve(kind)
    path = build_tiny(out, seed=0)
    if kind == "medium":
        import torch
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig.from_pretrained(path)
        for k, v in MEDIUM.items():
            setattr(config, k, v)
        config.head_dim = MEDIUM["hidden_size"] // MEDIUM["num_attention_heads"]
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(path, safe_serialization=True)
    return path
