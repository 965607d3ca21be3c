"""Streaming memory: does the dSFT / dDPO data path's memory stay flat as the data grows?

Each stage runs through its real entry point (``run_sft`` / ``run_dpo`` on a fresh local Ray cluster, configs/tiny,
2 Ray Train workers) on ``--small`` (1k) and ``--large`` (100k) synthetic rows: the shipped samples
(data/sample/sft.jsonl, prefs.jsonl) repeated, each copy's prompt made unique. The planning pass reads, validates and
tokenizes every row; training streams the rows into the workers for ``--steps`` optimizer steps (the rest of the
stream is never pulled: Ray Data's backpressure). dDPO uses ``dpo.ref.mode=online`` (the reference in the workers):
the precompute pass writes a Parquet file over every pair, which is a pass over the data, not a stream.

Measured per run (common.TreeSampler every 1 s, PSS every 5 s; the object store by ``ray memory --stats-only`` from
the driver every 2 s): the peak RSS of the driver, of the Ray Data / Ray worker processes (summed over the
processes alive at one time, and the largest one), of the Train workers (largest and summed), of Ray's own daemons,
of the whole tree, and the peak object-store use (also per phase: planning pass, training stream). Goal: large /
small <= 1.1 for each process group (memory does not grow with the data). The object store holds up to one
shuffle window's tokenized rows whatever the data's size (``data.stream_buffer_mb``, sharded JSONL reads): a
1k-row run never fills a window, so its ratio to 100k says little; ``--small 100000 --large 300000`` shows it
(bench/results/streaming_memory_300k.json).

    .venv/bin/python bench/streaming_memory.py [--small 1000] [--large 100000] [--steps 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from pathlib import Path

from common import (
    MB,
    ROOT,
    add_common_args,
    finish_session,
    fmt,
    print_failures,
    read_jsonl,
    run_rounds,
    side_main,
    start_local_ray,
    start_session,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "streaming_memory.json"
SAMPLES = {"sft": ROOT / "data" / "sample" / "sft.jsonl", "dpo": ROOT / "data" / "sample" / "prefs.jsonl"}
GOAL = 1.1
GROUPS = ("driver", "train_workers_sum", "train_worker_max", "ray_workers", "ray_worker_max", "ray_daemons", "tree",
          "object_store")


def synthetic(stage: str, n: int, path: Path) -> None:
    """``n`` rows: the shipped sample cycled, copy ``k`` of a row prefixed "(k) " in every user turn (unique)."""
    base = read_jsonl(SAMPLES[stage])
    with path.open("w") as f:
        for i in range(n):
            row = json.loads(json.dumps(base[i % len(base)]))
            tag = f"({i // len(base)}) "
            for key in ("messages", "chosen", "rejected"):
                for m in row.get(key, []):
                    if m["role"] == "user":
                        m["content"] = tag + m["content"]
            if "prompt" in row:
                row["prompt"] = tag + row["prompt"]
            row.pop("prompt_id", None)
            f.write(json.dumps(row) + "\n")


class StoreSampler(threading.Thread):
    """Peak object-store (plasma) use, from ``ray memory --stats-only`` every ``period`` s."""

    def __init__(self, address: str, period: float = 2.0):
        super().__init__(daemon=True)
        self.address = address  # this run's cluster: another one may be up on the machine
        self.period, self.stop_event, self.peak_mib, self.samples = period, threading.Event(), 0.0, 0
        self.series: list[tuple[float, float]] = []  # (unix time, MiB)

    def run(self) -> None:
        from ray._private.internal_api import memory_summary

        while not self.stop_event.wait(self.period):
            try:
                text = memory_summary(address=self.address, stats_only=True)
            except Exception:  # the cluster is starting or stopping
                continue
            m = re.search(r"Plasma memory usage ([\d.]+) MiB", text)
            if m:
                self.peak_mib, self.samples = max(self.peak_mib, float(m.group(1))), self.samples + 1
                self.series.append((time.time(), float(m.group(1))))

    def peak_between(self, start: float, end: float) -> float | None:
        inside = [mib for t, mib in self.series if start <= t <= end]
        return max(inside) if inside else None


def side_ours(spec: dict) -> dict:
    import ray

    from zephyr_ray.config import DPORecipe, SFTRecipe, load_config

    src, out, stage = Path(spec["src"]), Path(spec["output_dir"]), spec["stage"]
    overrides = [f"data.path={spec['data_path']}", f"train.max_steps={spec['steps']}", "train.epochs=1",
                 f"train.checkpoint_every={10**9}", "wandb.enabled=false", f"run.output_dir={out}",
                 f"run.name={spec['name']}", f"deepspeed.config={src / 'configs' / 'deepspeed' / 'zero2.json'}"]
    if stage == "dpo":
        overrides.append("dpo.ref.mode=online")
    schema = DPORecipe if stage == "dpo" else SFTRecipe
    cfg = load_config(src / "configs" / "tiny" / f"{stage}.yaml", overrides, schema)
    start_local_ray(src)
    store = StoreSampler(ray.get_runtime_context().gcs_address)
    store.start()
    t0 = time.time()
    if stage == "dpo":
        from zephyr_ray.train.dpo import run_dpo

        run_dpo(cfg)
    else:
        from zephyr_ray.train.sft import run_sft

        run_sft(cfg)
    store.stop_event.set()
    store.join()
    ray.shutdown()
    metrics = read_jsonl(out / "metrics.jsonl")
    plan_end, end = (out / "data_report.json").stat().st_mtime, time.time()  # run_stage writes it after planning
    return {"side": "ours", "steps": len(metrics), "data_report": json.loads((out / "data_report.json").read_text()),
            "plan_s": plan_end - t0, "run_s": end - t0, "object_store_peak_mib": store.peak_mib,
            "object_store_samples": store.samples,
            "object_store_peak_mib_by_phase": {"plan": store.peak_between(t0, plan_end),
                                               "train": store.peak_between(plan_end, end)},
            "steady": {"window_start_unix": plan_end, "window_end_unix": end},  # the streaming phase
            "phases": {"plan": [t0, plan_end], "train": [plan_end, end]}}


def groups(res: dict) -> dict:
    """Peak RSS (MB) per process group of one run: each group's peak of its per-sample sum (processes alive at the
    same time; a bigger dataset runs more short-lived Ray Data tasks, whose peaks never coexist), the largest
    single Ray worker process, and the object store."""
    procs, peaks = res["peak_rss_by_process"], res["peak_group_rss_mb"]
    train = [p["peak_rss_mb"] for p in procs if p["process"].startswith("ray::RayTrainWorker")]
    workers = [p["peak_rss_mb"] for p in procs if p["process"].startswith("ray::")
               and not p["process"].startswith("ray::RayTrainWorker")]
    return {"driver": peaks.get("driver"), "train_workers_sum": res["memory"]["train_sum_rss_mb"],
            "train_worker_max": max(train, default=None), "ray_workers": peaks.get("ray_workers"),
            "ray_worker_max": max(workers, default=None), "ray_daemons": peaks.get("ray_daemons"),
            "tree": res["memory"]["tree_rss_mb"], "object_store": res["object_store_peak_mib"] * 2**20 / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=1000, help="rows of the small run")
    ap.add_argument("--large", type=int, default=100_000, help="rows of the large run")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps trained in each run")
    ap.add_argument("--stages", default="sft,dpo")
    add_common_args(ap, DEFAULT_OUT)
    a = ap.parse_args()
    if a._side:
        side_main(a, {"ours": side_ours})
        return
    if a.quick:
        a.small, a.large, a.steps = 200, 2000, 2
    session = start_session(a.work_dir, "streaming_memory_", f"{a.small} vs {a.large} rows", quick=a.quick)
    specs = []
    for stage in [s for s in a.stages.split(",") if s]:
        for size in (a.small, a.large):
            data = session.work / f"{stage}-{size}.jsonl"
            synthetic(stage, size, data)
            name = f"{stage}-{size}"
            specs.append(({"side": "ours", "name": name, "stage": stage, "rows": size, "src": str(session.src),
                           "data_path": str(data), "steps": a.steps, "output_dir": str(session.work / name),
                           "trainer_label": "ray::RayTrainWorker"}, {}))
    runs = run_rounds(Path(__file__).resolve(), specs, session.work, a,
                      lambda r: f"tree {r['memory']['tree_rss_mb']:.0f} MB, plan {r['plan_s']:.0f} s")
    rows, heads = [], []
    for stage in [s for s in a.stages.split(",") if s]:
        small = next((r for r in runs if r["ok"] and r["name"] == f"{stage}-{a.small}"), None)
        large = next((r for r in runs if r["ok"] and r["name"] == f"{stage}-{a.large}"), None)
        if small is None or large is None:
            continue
        gs, gl = groups(small), groups(large)
        for g in GROUPS:
            ratio = gl[g] / gs[g] if gs[g] and gl[g] is not None else None
            rows.append({"name": f"{stage} {g}", "small_mb": gs[g], "large_mb": gl[g], "ratio": ratio,
                         "met": None if ratio is None else ratio <= GOAL})
        worst = max((r for r in rows if r["name"].startswith(stage) and r["ratio"] is not None),
                    key=lambda r: r["ratio"], default=None)
        if worst is not None:
            heads.append({"name": f"{stage} peak memory, {a.large} vs {a.small} rows (worst group: {worst['name']})",
                          "ratio": worst["ratio"], "unit": "MB", "ours_config": f"{a.large} rows",
                          "ours_value": worst["large_mb"], "peer_config": f"{a.small} rows",
                          "peer_value": worst["small_mb"], "goal": GOAL, "met": worst["ratio"] <= GOAL})
    print(f"\n{'group':<28}{'small MB':>10}{'large MB':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['name']:<28}{fmt(r['small_mb']):>10}{fmt(r['large_mb']):>10}{fmt(r['ratio'], '.2f'):>8}"
              f"{'' if r['met'] is None else ('  ok' if r['met'] else '  GROWS')}")
    print_failures(runs)
    cols = [["name", "group", ""], ["small_mb", f"{a.small} rows MB", ".0f"], ["large_mb", f"{a.large} rows MB", ".0f"],
            ["ratio", "ratio", ".2f"], ["met", f"<= {GOAL}", ""]]
    finish_session(session, {"config": {"small": a.small, "large": a.large, "steps": a.steps, "goal": GOAL,
                                        "dpo_ref_mode": "online"},
                             "table": {"columns": cols, "rows": rows}, "headline": heads, "runs": runs}, a.out)


if __name__ == "__main__":
    main()
