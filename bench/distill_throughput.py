"""Throughput of dSFT distillation's teacher pass: the Ray actor pool adding the teacher's top-k log-probs to the
packed training rows (``zephyr_ray.train.distill``), vs the same computation in one plain process. Same machine,
same run, same rows.

Rows: the first ``--limit`` (256) dialogues of ../shared/data/alpaca_eval/sft_gpt4_teacher.jsonl (else the shipped
data/sample/sft.jsonl), tokenized and packed by ``zephyr_ray.data.sft.sft_examples`` into rows of ``--max-length``
(1024) tokens, once, before anything is timed. Teacher: ``--model`` ``tiny`` (``build_tiny``) or ``medium`` (the
tiny tokenizer with a 19M-parameter Mistral, ``bench/common.py``), fp32.

Sides, for each k in ``--ks`` (1, 20, 100), temperature 1:

* ``actors``: ``frozen_pass`` with ``TeacherTopK`` exactly as a distilling ``run_sft`` runs it, pool settings from
  configs/tiny/sft_distill.yaml (one actor x 0.5 CPU, 2 torch threads, 32 rows per batch), on a local 2-CPU Ray
  cluster started beforehand: the wall time of the whole pass (actor start and model load, Ray Data read of the
  rows, forward at the trained positions only, top-k, Parquet write of rows + columns), as its own timer writes it
  to ``_SUCCESS``;
* ``plain``: one process, torch with the same thread count: load the model, then per batch of the same rows: pad,
  ``model(input_ids, position_ids)`` (full logits), select the trained positions, ``log_softmax(. / T).topk(k)``,
  to numpy (no Ray, no Parquet): what a script without the pool would do.

Reported per (k, side): seconds, rows/s, input tokens/s (non-padding), top-k positions/s (trained positions), and
actors/plain; for the actors also tokens/s after startup, i.e. with the seconds of the same pass over one row
(actor start, model load, one forward, write; measured once per round, fastest kept) taken off, and how far the actors' columns are from the plain side's, row by row: the share of equal ids
(``id_agreement``; a near-tie at the k-th place may swap) and the largest log-prob difference (``max_logp_diff``).
Before each measurement the script waits (``--quiet-wait``) for other processes to go quiet; ``--repeats`` keeps
each side's fastest round.

    .venv/bin/python bench/distill_throughput.py [--limit 256] [--max-length 1024] [--ks 1,20,100] [--model tiny]
        [--repeats 1] [--out bench/results/distill_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    SHARED_DATA_DIR,
    build_model,
    fmt,
    machine_info,
    matmul_flops,
    start_local_ray,
    wait_quiet,
)

SHARED_DATA = SHARED_DATA_DIR / "sft_gpt4_teacher.jsonl"
SAMPLE_DATA = ROOT / "data" / "sample" / "sft.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results" / "distill_throughput.json"
TEMPERATURE = 1.0


def packed_rows(path: Path, tokenizer, limit: int, max_length: int) -> list[dict]:
    from zephyr_ray.config import DataConfig
    from zephyr_ray.data.sft import sft_examples

    with path.open(encoding="utf-8") as f:
        dialogues = [json.loads(line) for _, line in zip(range(limit), f)]
    cfg = DataConfig(max_length=max_length, pack_window=limit, on_bad_row="skip", overlong="truncate")
    rows, _ = sft_examples([{"messages": d["messages"]} for d in dialogues], tokenizer, cfg)
    return rows


def run_actors(rows: list[dict], teacher: str, pad_id: int, k: int, work: Path) -> tuple[float, dict]:
    """The real pass; returns its own timer's seconds and {sample ids: (ids, logps)}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from zephyr_ray.config import SFTRecipe, load_config
    from zephyr_ray.data.sft import sft_schema
    from zephyr_ray.train.distill import TeacherTopK
    from zephyr_ray.train.frozen import frozen_pass
    from zephyr_ray.train.objectives import TEACHER_IDS, TEACHER_LOGPS

    pool = load_config(ROOT / "configs" / "tiny" / "sft_distill.yaml", [], SFTRecipe).distill
    target = work / f"teacher_topk_k{k}_{time.time_ns()}"
    dataset = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=sft_schema()))
    kwargs = {"path": teacher, "pad_id": pad_id, "top_k": k, "temperature": TEMPERATURE, "dtype": "float32",
              "attn": "sdpa"}
    frozen_pass(dataset, TeacherTopK, kwargs, pool, target, {"k": k})
    seconds = json.loads((target / "_SUCCESS").read_text())["seconds"]
    table = pq.read_table(target, columns=["sample_ids", TEACHER_IDS, TEACHER_LOGPS]).to_pylist()
    return seconds, {tuple(r["sample_ids"]): (r[TEACHER_IDS], r[TEACHER_LOGPS]) for r in table}


def run_plain(rows: list[dict], teacher: str, pad_id: int, k: int, batch_size: int) -> tuple[float, dict]:
    """One process: HF forward over whole rows, then top-k at the trained positions."""
    import torch

    from zephyr_ray.data.packing import collate
    from zephyr_ray.models import load_model
    from zephyr_ray.train.losses import shifted_labels

    start = time.perf_counter()
    model = load_model(teacher).eval()
    out = {}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        batch = collate({key: [r[key] for r in chunk] for key in chunk[0]}, pad_id)
        keep = torch.nn.functional.pad(shifted_labels(batch["labels"], batch["position_ids"]) != -100, (0, 1))
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            top = torch.log_softmax(logits[keep].float() / TEMPERATURE, -1).topk(k)
        ids, logps = top.indices.numpy(), top.values.numpy()
        first = 0
        for row, n in zip(chunk, keep.sum(1).tolist()):
            out[tuple(row["sample_ids"])] = (ids[first:first + n].ravel(), logps[first:first + n].ravel())
            first += n
    return time.perf_counter() - start, out


def agreement(a: dict, b: dict) -> dict[str, float]:
    """Share of equal top-k ids and the largest log-prob difference between two sides' columns, row by row."""
    import numpy as np

    if a.keys() != b.keys():
        raise RuntimeError("the two sides saw different rows")
    ids = np.concatenate([np.asarray(a[key][0]) == np.asarray(b[key][0]) for key in a])
    diff = max(float(np.abs(np.asarray(a[key][1]) - np.asarray(b[key][1])).max()) for key in a)
    return {"id_agreement": float(ids.mean()), "max_logp_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--ks", default="1,20,100")
    ap.add_argument("--model", choices=["tiny", "medium"], default="tiny")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each (k, side) keeps its fastest")
    ap.add_argument("--quiet-wait", type=float, default=30)
    ap.add_argument("--quiet-threshold", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "zephyr-ray" / "torch_extensions"))
    import ray
    import torch

    from zephyr_ray.config import SFTRecipe, load_config
    from zephyr_ray.models import load_tokenizer

    pool = load_config(ROOT / "configs" / "tiny" / "sft_distill.yaml", [], SFTRecipe).distill
    torch.set_num_threads(pool.threads_per_actor or 1)  # the plain side gets the actor's threads
    data = SHARED_DATA if SHARED_DATA.exists() else SAMPLE_DATA
    started = time.time()
    mm_before = matmul_flops()
    with tempfile.TemporaryDirectory(prefix="distill_bench_") as tmp:
        work = Path(tmp)
        teacher = build_model(a.model, work / "teacher")
        tok = load_tokenizer(teacher)
        rows = packed_rows(data, tok, a.limit, a.max_length)
        tokens = sum(len(r["input_ids"]) for r in rows)
        positions = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
        print(f"{len(rows)} packed rows ({tokens} tokens, {positions} trained positions) from {data}", flush=True)
        start_local_ray()
        best: dict[tuple[int, str], dict] = {}
        startup = float("inf")
        try:
            for _ in range(a.repeats):
                wait_quiet(a.quiet_wait, a.quiet_threshold)
                startup = min(startup, run_actors(rows[:1], teacher, tok.pad_token_id, 1, work)[0])
                print(f"  startup (a pass over one row) {startup:.2f} s", flush=True)
                for k in ks:
                    for side in ("plain", "actors"):
                        quiet = wait_quiet(a.quiet_wait, a.quiet_threshold)
                        if side == "plain":
                            seconds, values = run_plain(rows, teacher, tok.pad_token_id, k, pool.batch_size)
                        else:
                            seconds, values = run_actors(rows, teacher, tok.pad_token_id, k, work)
                        print(f"  k={k:<4} {side:7} {seconds:7.2f} s  {tokens / seconds:9.0f} tok/s  (others used "
                              f"{quiet['foreign_cores_at_start']:.2f} cores before)", flush=True)
                        if (k, side) not in best or seconds < best[(k, side)]["seconds"]:
                            best[(k, side)] = {"seconds": seconds, "values": values, **quiet}
        finally:
            ray.shutdown()
    results = []
    for k in ks:
        plain = best[(k, "plain")]
        for side in ("plain", "actors"):
            r = best[(k, side)]
            results.append({"k": k, "side": side, "seconds": r["seconds"], "rows_per_s": len(rows) / r["seconds"],
                            "tokens_per_s": tokens / r["seconds"], "positions_per_s": positions / r["seconds"],
                            "vs_plain": plain["seconds"] / r["seconds"], **agreement(r["values"], plain["values"]),
                            "tokens_per_s_after_startup": tokens / (r["seconds"] - startup)
                            if side == "actors" and r["seconds"] > startup else None,
                            "foreign_cores_at_start": r["foreign_cores_at_start"]})
    head = f"{'k':>4} {'side':7} {'s':>8} {'rows/s':>8} {'tok/s':>9} {'pos/s':>9} {'x plain':>8} " \
           f"{'tok/s after startup':>20} {'ids same':>9} {'max dlogp':>9}"
    print(f"\n{head}\n{'-' * len(head)}")
    for r in results:
        print(f"{r['k']:>4} {r['side']:7} {r['seconds']:8.2f} {r['rows_per_s']:8.2f} {r['tokens_per_s']:9.0f} "
              f"{r['positions_per_s']:9.0f} {r['vs_plain']:7.2f}x {fmt(r['tokens_per_s_after_startup']):>20} "
              f"{r['id_agreement']:9.4f} {r['max_logp_diff']:9.1e}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "command": " ".join([".venv/bin/python", "bench/distill_throughput.py", *sys.argv[1:]]),
        "when_unix": started, "elapsed_s": time.time() - started,
        "machine": machine_info(mm_before, matmul_flops()),
        "data": {"path": str(data), "dialogues": a.limit, "max_length": a.max_length, "rows": len(rows),
                 "tokens": tokens, "trained_positions": positions},
        "teacher": a.model, "temperature": TEMPERATURE, "actors_startup_s": startup,
        "pool": {k: getattr(pool, k) for k in ("num_actors", "num_cpus_per_actor", "threads_per_actor", "batch_size")},
        "torch_threads_plain": torch.get_num_threads(), "repeats": a.repeats, "results": results,
    }, indent=2) + "\n")
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()
