"""Serving load: the Ray Serve chat endpoint over HTTP vs the same generation called in-process, same run.

Each side runs at concurrency 1, 8 and 32 (closed loop: ``c`` clients, each sends its next request when its
previous one has ended), greedy, ``--max-tokens`` tokens per request, distinct prompts, in two modes: ``json``
(non-streamed; latency = request sent -> whole response) and ``stream`` (SSE; latency = request sent -> end of
stream, TTFT = request sent -> first content text):

* ``served``: ``zephyr_ray.serve`` on a fresh local Ray cluster (2 CPUs) owned by this script: one replica
  (``num_cpus`` 1, ``--threads`` torch threads), reached through the Serve HTTP proxy by ``httpx.AsyncClient``
  (SSE parsed on the client). The ``serve.stream_interval_s`` default applies to streams.
* ``in-process``: the replica's generation path without HTTP, Serve or Ray: the same ``Batcher`` +
  ``HFStreamingBackend`` on an ``HFEngine`` in this process (``--threads`` torch threads), the same clients as
  asyncio tasks; latency = submit -> finished; TTFT = submit -> first text delta.
* ``engine`` (concurrency 1, json): ``HFEngine.generate`` on one conversation, the engine the AIF stage uses.

Both servers batch with the same ``--max-batch-size`` and ``--batch-wait-ms``. Models (random init, so rows
nearly always run to ``--max-tokens``): ``tiny`` (``build_tiny``: hidden 128, 2 layers; ~1 ms a token, so fixed
per-request costs weigh most) and ``medium`` (hidden 512, 6 layers, MLP 1536). Prompts: the first ``--prompts``
instructions of ../shared/data/alpaca_eval/completions.jsonl when present (else the sample prompts), cycled.
Concurrency 1 runs request by request in turn (served, in-process, engine), ``--rounds`` x ``--requests``
requests pooled, so load changes on the shared machine hit every side alike; higher levels run ``--rounds``
times per side and mode, interleaved, and the round with the lowest p50 latency is reported (every round is in
the JSON). ``same_text``: the served greedy texts equal the in-process ones.
``foreign``: cores other processes (not this script, not its Ray cluster) used during the run.

    .venv/bin/python bench/serve_load.py [--models tiny,medium] [--max-tokens 64] [--concurrency 1,8,32]
        [--requests 24] [--rounds 2] [--threads 1] [--out bench/results/serve_load.json]
    .venv/bin/python bench/serve_load.py --kill-replica [--kill-clients 16] [--kill-after-s 45]
        (a replica SIGKILLed under load: failed requests, kill -> first new success; serve_replica_kill.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import build_model, envelope, load_prompts, start_local_ray, write_result  # noqa: E402

from zephyr_ray.cluster import free_port  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "serve_load.json"

def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(records: list[dict], seconds: float) -> dict:
    lat = [r["latency_s"] for r in records]
    ttft = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in records)
    return {"requests": len(records), "seconds": seconds, "requests_per_s": len(records) / seconds,
            "tokens_per_s": tokens / seconds, "completion_tokens": tokens,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "latency_mean_s": statistics.mean(lat),
            "ttft_p50_s": pct(ttft, 0.5) if ttft else None, "ttft_p95_s": pct(ttft, 0.95) if ttft else None}


class CpuClock:
    """Machine busy CPU seconds minus this process tree's (this script and the Ray cluster it started)."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()

    def _own(self) -> float:
        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self.psutil.Error:
                pass
        return total

    def sample(self) -> tuple[float, float, float]:
        m = self.psutil.cpu_times()
        busy = m.user + m.nice + m.system + getattr(m, "irq", 0) + getattr(m, "softirq", 0)
        return busy, self._own(), time.perf_counter()

    @staticmethod
    def foreign(a: tuple, b: tuple) -> float:
        return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


# ------------------------------------------------------------------------------------------------ sides


async def closed_loop(one, conversations: list, concurrency: int, total: int) -> tuple[list[dict], float]:
    """``concurrency`` workers send ``total`` requests (prompt i = request i, cycled), one after another each."""
    queue = list(range(total))
    records: list[dict] = []

    async def worker():
        while queue:
            i = queue.pop(0)
            rec = await one(conversations[i % len(conversations)])
            rec["prompt"] = i % len(conversations)
            records.append(rec)

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return records, time.perf_counter() - start


def http_request(client, url: str, model: str, max_tokens: int, stream: bool):
    async def one(conversation) -> dict:
        body = {"model": model, "messages": conversation, "max_tokens": max_tokens, "temperature": 0}
        t0 = time.perf_counter()
        if not stream:
            r = await client.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]!r}")
            out = r.json()
            return {"latency_s": time.perf_counter() - t0, "ttft_s": None, "text": out["choices"][0]["message"]["content"],
                    "tokens": out["usage"]["completion_tokens"]}
        body.update(stream=True, stream_options={"include_usage": True})
        ttft, text, tokens, done = None, [], 0, False
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    piece = c["delta"].get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        text.append(piece)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens, "text": "".join(text)}

    return one


def in_process_request(batcher, tokenize, max_tokens: int, stream: bool):
    from zephyr_ray.generation.types import SamplingParams
    from zephyr_ray.serve.batching import Job

    async def one(conversation) -> dict:
        t0 = time.perf_counter()
        job = Job(conversation, tokenize(conversation), SamplingParams(max_new_tokens=max_tokens), stream=stream)
        batcher.submit(job)
        ttft, text = None, []
        while True:
            kind, _, value = await job.events.get()
            if kind == "delta":
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(value)
            elif kind == "finish":
                return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": value.completion_tokens,
                        "text": "".join(text) if stream else value.text}
            else:
                raise value

    return one


# ------------------------------------------------------------------------------------------------ main


def bench_model(kind: str, a: argparse.Namespace, levels: list[int], conversations: list, work: Path,
                clock: CpuClock) -> dict:
    """Both sides for one model: a fresh local Ray cluster and Serve app, shut down at the end."""
    import httpx
    import ray
    import torch
    from ray import serve

    from zephyr_ray.config import EngineConfig, ServeRecipe, load_config
    from zephyr_ray.generation.hf import HFEngine
    from zephyr_ray.generation.types import SamplingParams
    from zephyr_ray.serve.app import build_app
    from zephyr_ray.serve.batching import Batcher, HFStreamingBackend

    path = build_model(kind, work / kind)
    engine = HFEngine(EngineConfig(max_prompt_length=1024), path)

    def tokenize(conversation):
        return engine.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]

    def thread_init():
        torch.set_num_threads(a.threads)

    port = free_port()
    wait = [] if a.batch_wait_ms is None else [f"serve.batch_wait_timeout_s={a.batch_wait_ms / 1000}"]
    cfg = load_config(ROOT / "configs/tiny/serve.yaml", [
        f"engine.path={path}", "engine.name=bench", "engine.max_prompt_length=1024", f"serve.port={port}",
        f"serve.torch_threads={a.threads}", f"serve.max_batch_size={a.max_batch_size}", *wait, "serve.num_cpus=1",
        "serve.max_ongoing_requests=128", f"run.output_dir={work}"], ServeRecipe)
    t0 = time.time()
    start_local_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, api_key=None), name="bench", route_prefix="/")
    startup_s = time.time() - t0
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    print(f"[{kind}] Serve app up in {startup_s:.1f} s at {url}", flush=True)

    # results[side][mode][concurrency] = one summary per round
    results: dict[str, dict[str, dict[int, list[dict]]]] = {}
    texts: dict[str, dict[int, str]] = {"served": {}, "in-process": {}}

    async def measure(side: str, mode: str, one, c: int, total: int, stats) -> None:
        stats0 = await stats()
        s0 = clock.sample()
        records, seconds = await closed_loop(one, conversations, c, total)
        foreign = CpuClock.foreign(s0, clock.sample())
        stats1 = await stats()
        summary = summarize(records, seconds)
        batches = stats1["batches"] - stats0["batches"]
        summary.update({"concurrency": c, "foreign_cpu_cores": foreign, "batches": batches,
                        "mean_batch_rows": (stats1["rows"] - stats0["rows"]) / max(1, batches),
                        "batch_rows": list(stats1["recent_rows"][-batches:]) if batches <= 16 else None})
        results.setdefault(side, {}).setdefault(mode, {}).setdefault(c, []).append(summary)
        for rec in records:
            texts[side].setdefault(rec["prompt"], rec["text"])
        ttft = "" if summary["ttft_p50_s"] is None else f"  ttft p50 {summary['ttft_p50_s'] * 1000:6.1f} ms"
        print(f"  c={c:<3} {side:10} {mode:6}: {summary['requests_per_s']:6.2f} req/s  p50 "
              f"{summary['latency_p50_s'] * 1000:7.1f} ms{ttft}  batch rows {summary['mean_batch_rows']:5.1f} "
              f"{summary['batch_rows']}  foreign CPU {foreign:.2f}", flush=True)

    async def paired(sides: dict, total: int) -> None:
        """Concurrency 1, request by request in turn (served, in-process, engine), all rounds pooled: a change in
        the machine's load hits every side alike."""
        engine_params = SamplingParams(max_new_tokens=a.max_tokens)
        for mode in ("json", "stream"):
            ones = {side: make(mode == "stream") for side, (make, _) in sides.items()}
            records: dict[str, list[dict]] = {side: [] for side in [*ones, *(["engine"] if mode == "json" else [])]}
            s0 = clock.sample()
            for i in range(total * a.rounds):
                conversation = conversations[i % len(conversations)]
                for side, one in ones.items():
                    rec = await one(conversation)
                    rec["prompt"] = i % len(conversations)
                    records[side].append(rec)
                if mode == "json":
                    t = time.perf_counter()
                    [[done]] = engine.generate([conversation], engine_params)
                    records["engine"].append({"latency_s": time.perf_counter() - t, "ttft_s": None, "text": done.text,
                                              "tokens": done.completion_tokens, "prompt": i % len(conversations)})
            foreign = CpuClock.foreign(s0, clock.sample())
            for side, recs in records.items():
                summary = summarize(recs, sum(r["latency_s"] for r in recs))
                summary.update({"concurrency": 1, "foreign_cpu_cores": foreign, "paired": True})
                if side != "engine":
                    summary.update({"batches": len(recs), "mean_batch_rows": 1.0})
                    for rec in recs:
                        texts[side].setdefault(rec["prompt"], rec["text"])
                results.setdefault(side, {}).setdefault(mode, {}).setdefault(1, []).append(summary)
                ttft = "" if summary["ttft_p50_s"] is None else f"  ttft p50 {summary['ttft_p50_s'] * 1000:6.1f} ms"
                print(f"  c=1   {side:10} {mode:6}: {summary['requests_per_s']:6.2f} req/s  p50 "
                      f"{summary['latency_p50_s'] * 1000:7.1f} ms{ttft}  (paired)  foreign CPU {foreign:.2f}", flush=True)

    async def run_all():
        limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            batcher = Batcher(HFStreamingBackend(engine), a.max_batch_size, cfg.serve.batch_wait_timeout_s, thread_init)
            health = f"http://127.0.0.1:{port}/health"

            async def served_stats():
                return (await client.get(health)).json()["batching"]

            async def local_stats():
                return dict(vars(batcher.stats))

            sides = {"served": (lambda stream: http_request(client, url, "bench", a.max_tokens, stream), served_stats),
                     "in-process": (lambda stream: in_process_request(batcher, tokenize, a.max_tokens, stream),
                                    local_stats)}
            for make, _ in sides.values():  # warm both paths
                await closed_loop(make(True), conversations, 4, 8)
            for c in levels:
                total = max(a.requests, 4 * c)
                if c == 1:
                    await paired(sides, total)
                    continue
                for _ in range(a.rounds):
                    for mode in ("json", "stream"):
                        for side, (make, stats) in sides.items():
                            await measure(side, mode, make(mode == "stream"), c, total, stats)
            await batcher.close()

    try:
        asyncio.run(run_all())
    finally:
        serve.shutdown()
        ray.shutdown()

    best = {side: {mode: {c: min(rounds, key=lambda s: s["latency_p50_s"]) for c, rounds in by_c.items()}
                   for mode, by_c in by_mode.items()} for side, by_mode in results.items()}
    common = sorted(set(texts["served"]) & set(texts["in-process"]))
    ratios: dict[str, dict[str, float]] = {}
    for mode in ("json", "stream"):
        for c in levels:
            srv, loc = best["served"][mode][c], best["in-process"][mode][c]
            r = {"latency_p50": srv["latency_p50_s"] / loc["latency_p50_s"],
                 "requests_per_s": srv["requests_per_s"] / loc["requests_per_s"]}
            if mode == "stream":
                r["ttft_p50"] = srv["ttft_p50_s"] / loc["ttft_p50_s"]
            ratios[f"{mode}@{c}"] = r
    rps = {mode: [best["served"][mode][c]["requests_per_s"] for c in levels] for mode in ("json", "stream")}
    goals = {"p50_latency_c1_within_1.1x_in_process": ratios["json@1"]["latency_p50"] <= 1.1 if 1 in levels else None,
             "served_throughput_rises_with_concurrency": {m: all(y > x for x, y in zip(v, v[1:])) for m, v in rps.items()}}
    arch = {k: getattr(engine.model.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    return {"model": kind, "arch": arch, "parameters": sum(p.numel() for p in engine.model.parameters()),
            "serve_startup_s": startup_s, "stream_interval_s": cfg.serve.stream_interval_s,
            "stream_events_per_s": cfg.serve.stream_events_per_s, "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
            "best": best,
            "ratios_served_over_in_process": ratios,
            "same_text": all(texts["served"][i] == texts["in-process"][i] for i in common),
            "same_text_prompts": len(common), "goals": goals, "all_rounds": results}


def bench_replica_kill(a: argparse.Namespace, conversations: list, work: Path) -> dict:
    """``--kill-replica``: the tiny model on 2 replicas, ``--kill-clients`` streaming clients in a closed loop;
    once every client has had a success, one replica process is SIGKILLed, and the clients go on for
    ``--kill-after-s`` seconds. Reports the requests that failed (by error), the time from the kill to the first
    success of a request sent after it, and to the replica's return (2 replica processes again)."""
    import httpx
    import psutil
    import ray
    from ray import serve

    from zephyr_ray.config import ServeRecipe, load_config
    from zephyr_ray.serve.app import build_app

    path = build_model("tiny", work / "tiny")
    port = free_port()
    cfg = load_config(ROOT / "configs/tiny/serve.yaml", [
        f"engine.path={path}", "engine.name=bench", f"serve.port={port}", f"serve.torch_threads={a.threads}",
        "serve.num_replicas=2", "serve.num_cpus=0.5", f"run.output_dir={work}"], ServeRecipe)
    start_local_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, api_key=None), name="bench-kill", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def replicas() -> list:
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "ServeReplica:bench-kill" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    records: list[dict] = []
    state: dict = {}

    async def client(http, c: int) -> None:
        one = http_request(http, url, "bench", a.max_tokens, True)
        i = c
        while "killed" not in state or time.time() < state["killed"] + a.kill_after_s:
            t0 = time.time()
            try:
                await asyncio.wait_for(one(conversations[i % len(conversations)]), timeout=120)
                outcome = "ok"
            except asyncio.TimeoutError:
                outcome = "hang (120 s)"
            except Exception as e:  # noqa: BLE001 (reported by kind)
                outcome = f"{type(e).__name__}: {str(e)[:48]}"
            records.append({"start": t0, "end": time.time(), "outcome": outcome})
            i += a.kill_clients

    async def killer() -> None:
        while sum(r["outcome"] == "ok" for r in records) < a.kill_clients:
            await asyncio.sleep(0.05)
        victim = replicas()[0]
        victim.kill()
        state["killed"] = time.time()
        while len(replicas()) < 2:
            await asyncio.sleep(0.2)
        state["back"] = time.time()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            await asyncio.gather(killer(), *[client(http, c) for c in range(a.kill_clients)])

    try:
        asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()
    killed = state["killed"]
    failed = [r for r in records if r["outcome"] != "ok"]
    after = [r for r in records if r["start"] > killed]
    first_new = min((r["end"] for r in after if r["outcome"] == "ok"), default=None)
    late = [r for r in records if r["start"] > killed + 30]
    return {"replicas": 2, "clients": a.kill_clients, "max_tokens": a.max_tokens, "requests": len(records),
            "failed": len(failed), "failed_by_error": {k: sum(r["outcome"] == k for r in failed)
                                                      for k in sorted({r["outcome"] for r in failed})},
            "kill_to_first_new_success_s": None if first_new is None else first_new - killed,
            "kill_to_replica_back_s": state.get("back", float("nan")) - killed,
            "sent_30s_after_kill": len(late), "sent_30s_after_kill_failed": sum(r["outcome"] != "ok" for r in late)}


def print_table(results: list[dict], levels: list[int]) -> None:
    head = (f"{'model':7} {'side':10} {'mode':6} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'ttft p50':>9} {'ttft p95':>9} {'batch':>6} {'foreign':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        best = r["best"]
        for mode in ("json", "stream"):
            for c in levels:
                for side in ("engine", "in-process", "served"):
                    s = best.get(side, {}).get(mode, {}).get(c)
                    if s is None:
                        continue
                    ttft50 = "-" if s["ttft_p50_s"] is None else f"{s['ttft_p50_s'] * 1000:.1f}"
                    ttft95 = "-" if s["ttft_p95_s"] is None else f"{s['ttft_p95_s'] * 1000:.1f}"
                    batch = f"{s['mean_batch_rows']:.1f}" if "mean_batch_rows" in s else "-"
                    print(f"{r['model']:7} {side:10} {mode:6} {c:4d} {s['requests_per_s']:7.2f} {s['tokens_per_s']:8.1f} "
                          f"{s['latency_p50_s'] * 1000:8.1f} {s['latency_p95_s'] * 1000:8.1f} {ttft50:>9} {ttft95:>9} "
                          f"{batch:>6} {s['foreign_cpu_cores']:7.2f}")
        print()
        for key, ratio in r["ratios_served_over_in_process"].items():
            print(f"{r['model']}: served / in-process, {key}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
        print(f"{r['model']}: same greedy text served vs in-process: {r['same_text']} ({r['same_text_prompts']} prompts); "
              f"goals: {r['goals']}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=24, help="requests per level and run (at least 4x the concurrency)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, replica and in-process alike")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="serve.batch_wait_timeout_s x 1000 "
                    "(default: the config's)")
    ap.add_argument("--kill-replica", action="store_true", help="instead: the replica-kill check (2 replicas, "
                    "--kill-clients streaming clients, one replica SIGKILLed); see bench_replica_kill")
    ap.add_argument("--kill-clients", type=int, default=16)
    ap.add_argument("--kill-after-s", type=float, default=45.0, help="how long the clients go on after the kill")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="smallest settings (checks the bench; not a result)")
    a = ap.parse_args()
    if a.quick:
        a.models, a.concurrency, a.requests, a.rounds, a.max_tokens, a.prompts = "tiny", "1,4", 16, 1, 8, 16
    env = envelope("serve_load", a.quick)
    levels = [int(x) for x in a.concurrency.split(",")]
    models = [m for m in a.models.split(",") if m]
    if not set(models) <= {"tiny", "medium"}:
        raise SystemExit(f"--models: unknown {sorted(set(models) - {'tiny', 'medium'})}; known: tiny, medium")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import torch

    torch.set_num_threads(a.threads)
    prompts, source = load_prompts(a.prompts)
    print(f"{len(prompts)} prompts from {source}", flush=True)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if a.kill_replica:
        out = a.out if a.out != DEFAULT_OUT else DEFAULT_OUT.with_name("serve_replica_kill.json")
        with tempfile.TemporaryDirectory(prefix="serve_kill_") as work:
            report = bench_replica_kill(a, conversations, Path(work))
        report["loadavg_end"] = list(os.getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return
    clock = CpuClock()
    before = clock.sample()
    with tempfile.TemporaryDirectory(prefix="serve_load_") as work:
        results = [bench_model(kind, a, levels, conversations, Path(work), clock) for kind in models]
    after = clock.sample()
    report = {
        "foreign_cpu_cores_whole_run": CpuClock.foreign(before, after),
        "params": {"max_tokens": a.max_tokens, "greedy": True, "modes": ["json", "stream"], "concurrency": levels,
                   "requests_per_level": {c: max(a.requests, 4 * c) for c in levels}, "rounds": a.rounds,
                   "torch_threads": a.threads, "max_batch_size": a.max_batch_size,
                   "replica_num_cpus": 1, "prompts": len(prompts), "prompt_source": source},
        "results": results,
    }
    print()
    print_table(results, levels)
    write_result(a.out, env, report)


if __name__ == "__main__":
    main()
