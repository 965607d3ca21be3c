"""dDPO training throughput and memory: zephyr_ray (reference precomputed by Ray actors, then Ray Train + DeepSpeed)
vs TRL's ``DPOTrainer``, same machine, same run.

Both sides train the SAME tiny random Mistral (one ``build_tiny`` directory; it is both the policy's start and the
frozen reference) on the SAME preference pairs with the SAME token ids: the first ``--limit`` (512) pairs of
../shared/data/alpaca_eval/gpt4_preferences.jsonl (``chosen``/``rejected`` message lists sharing the prompt turn;
else the shipped data/sample/prefs.jsonl), tokenized by ``zephyr_ray.data.preference.preference_examples`` with
max_length 1024 / max_prompt_length 512 (the Zephyr dDPO recipe's lengths: with the tiny byte-level tokenizer the
median prompt is ~70 tokens, the median chosen answer ~830, rejected ~280; 244 of the first 512 pairs are cut,
leaving 1214 tokens per pair, prompt counted twice). Ours tokenizes the pairs itself inside its Ray Data pipeline;
TRL is handed the resulting ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (its ``_prepare_dataset`` is
overridden to pass them through), so both train on identical tokens and TRL's own tokenization (one extra "\\n"
token per answer, no prompt-length limit) is left out of its timings. Same global batch (``--global-batch`` pairs
per optimizer step), fp32 on CPU, sigmoid DPO loss with beta 0.1, AdamW lr 5e-4 cosine with 10% warmup, grad
clipping 1.0, no gradient checkpointing, no eval, no W&B / report_to, no intermediate checkpoints.

Configurations, each in a fresh subprocess (``--ours``, ``--trl``):

* ours-2w: configs/tiny/dpo.yaml as shipped through the real entry point ``run_dpo`` with overrides: ``dpo.ref.mode
  precompute`` (one ``ReferenceLogps`` Ray actor x 0.5 CPU streams the pairs once and writes ``ref_logps`` Parquet;
  the training workers never hold the reference), 2 Ray Train workers x 0.5 CPU (Ray exports OMP_NUM_THREADS=1 to
  each), ZeRO-2, micro-batch = batch / 2, ``data.packing`` true: padding-free, a micro-batch's chosen and rejected
  sequences concatenated in one row, each attending only to itself (``zephyr_ray.attention.sdpa_varlen``: one causal
  SDPA call per sequence, no mask);
* ours-2w-padded: ours-2w with chosen and rejected as two padded rows per pair (``data.packing=false``, TRL's layout);
* ours-1w: 1 worker x 0.5 CPU (one torch thread), micro-batch = batch;
* ours-1w-omp2: 1 worker, OMP_NUM_THREADS=2 exported before ``ray.init`` (Ray keeps it; the reference actor gets
  it too), so torch uses both cores;
* trl-ref: ``precompute_ref_log_probs=False``: TRL holds a second (reference) model and runs it every step;
* trl-precompute: ``precompute_ref_log_probs=True``: one reference pass over the data in ``DPOTrainer.__init__``
  (``precompute_ref_batch_size`` = ours' ``dpo.ref.batch_size``, ``--ref-batch``), then no reference model.
  TRL 1.16's DPO has no padding-free / packing mode (``padding_free=True`` warns and falls back to padding), so TRL
  pads each batch's 2 x batch sequences to the longest one; it does compute log-probs with a chunked (fused) LM head.

Measured per configuration:

* steady-state pairs/s (and non-padding tokens/s) = pairs of steps (warmup, last] / wall time between the end of step
  ``--warmup`` and the end of the last step. Step ends are wall-clock: for ours the arrival of each line of
  ``metrics.jsonl`` (tailed every 20 ms), for TRL ``TrainerCallback.on_step_end``. By default the run is exactly one
  epoch, so the window is the rest of the epoch after the warmup steps.
* precompute time: ours = the reference pass of ``precompute_reference`` (zephyr_ray/train/dpo.py), as its own timer
  writes it into ``ref_logps/_SUCCESS``: actor start and model load, the Ray Data read + shuffle + tokenization of
  every pair, the reference forward, the Parquet write (the same span seen from outside, ``data_report.json`` mtime ->
  ``_SUCCESS`` mtime, is reported as a cross-check). TRL-precompute = the wall time of
  ``DPOTrainer._precompute_ref_logps`` (forward + caching to an Arrow file). trl-ref has none (0).
* total pairs/s over an epoch-equivalent = pairs / (precompute time + pairs / steady pairs/s): one epoch over the
  data including the reference pass, excluding each side's fixed startup (Ray start, ours' planning pass,
  DeepSpeed/Trainer setup, model loading; see ``wall`` and the JSON for those).
* peak RSS of the whole process tree: the side's process and all its descendants (Ray's GCS, raylet, dashboard,
  train workers, Ray Data workers and the reference actor are descendants of the process that calls ``ray.init``),
  summed, sampled every 1 s; PSS (shared pages split between processes) every 5 s as a cross-check, since summed
  RSS counts shared libraries once per process. Also the tree's peak within each phase (ours: precompute / train).
* peak RSS of the single training process, the figure comparable to TRL's one process: for ours the largest own
  peak RSS of any ``RayTrainWorker`` process (each holds the whole model and its share of the optimizer state); for
  TRL its only process. The reference actor's own peak is reported too.
* MFU-on-CPU = steady tokens/s x training FLOPs per token / the best fp32 matmul rate measured in this run (before
  and after the configurations), with the FLOP model of ``sft_throughput.py`` (common.flop_model) over both
  sequences of every pair; the reference pass is not counted (useful training work only).
* foreign CPU load and host matmul speed before each run, as in ``sft_throughput.py`` (a shared 2-core machine is
  noisy; ``--repeats N`` interleaves N rounds and keeps each configuration's best steady-state run).

Defaults put TRL at its best: precomputed reference and length-grouped sampler, whole or one-pair micro-batches
(with accumulation), in one process (2 threads) or as 2 DDP processes under torchrun (gloo, 1 thread each, as our
2 workers). The headline ratio is ours-2w against the fastest TRL configuration of the same run, printed only when
every configuration trained the same non-pad tokens (token parity). Memory three ways (common.TreeSampler): the
largest training process, all training processes summed (simultaneous peak), the whole process tree (RSS and
PSS); the <= 0.7x goal is on the summed figure against TRL in the same layout and against single-process TRL.
``--model smollm2-135m-instruct`` trains the real model (max length 512, 2 pairs per micro-batch by default);
``--quick`` is a smoke run. Results: bench/results/dpo_throughput.json (bench/report.py publishes them).

    .venv/bin/python bench/dpo_throughput.py [--limit 512] [--global-batch 16] [--warmup 3] [--steps N]
        [--max-length 1024] [--max-prompt-length 512] [--repeats 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from common import (
    ROOT,
    SHARED_DATA_DIR,
    TRL_COMMON_ARGS,
    add_common_args,
    add_comparison_args,
    bench_name,
    best_per_config,
    check_snapshot,
    comparison_record,
    deltas,
    fastest,
    finish_session,
    flop_model,
    fmt,
    headline,
    matmul_flops,
    memory_goal,
    names_in,
    plan_steps,
    print_failures,
    print_headlines,
    print_noise_notes,
    print_table,
    read_jsonl,
    run_ours,
    run_rounds,
    side_main,
    split_batch,
    start_session,
    steady_state,
    step_clock,
    token_parity,
    trl_figures,
)

SHARED_DATA = SHARED_DATA_DIR / "gpt4_preferences.jsonl"
SAMPLE_DATA = ROOT / "data" / "sample" / "prefs.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results" / "dpo_throughput.json"
BETA, LR, WARMUP_RATIO = 0.1, 5e-4, 0.1
REAL_LIMIT = 24  # pairs with --model (a 135M model: a step of 4 pairs x 512 tokens takes ~30-60 s on 2 cores)
REAL_OURS, REAL_TRL = "ours-2w", "trl-precompute-grouped,trl-2p-precompute-grouped"  # fewer: ~6 min each  # configs/tiny/dpo.yaml's, given to both sides explicitly

OURS_CONFIGS = {
    # configs/tiny/dpo.yaml as shipped: 2 workers x 0.5 CPU (Ray gives each OMP_NUM_THREADS=1), ZeRO-2.
    "ours-2w": {"num_workers": 2, "cpus_per_worker": 0.5, "env": {}},
    # 1 worker x 0.5 CPU: Ray sets OMP_NUM_THREADS=1, so torch uses 1 of the 2 cores.
    "ours-1w": {"num_workers": 1, "cpus_per_worker": 0.5, "env": {}},
    # 1 worker, OMP_NUM_THREADS=2 exported before ray.init (Ray keeps a value it finds): torch uses both cores.
    "ours-1w-omp2": {"num_workers": 1, "cpus_per_worker": 0.5, "env": {"OMP_NUM_THREADS": "2"}},
    # ours-2w with chosen and rejected as two padded rows per pair (TRL's layout) instead of the shipped
    # padding-free row (data.packing=true: a micro-batch's sequences in one row, attention.sdpa_varlen).
    "ours-2w-padded": {"num_workers": 2, "cpus_per_worker": 0.5, "env": {}, "overrides": ["data.packing=false"]},
    # ours-2w grouping by length over the whole 512-pair set, as trl-precompute-grouped's LengthGroupedSampler
    # does (its mega-batch is 50 x 16 pairs); the shipped config groups within windows of 64 pairs.
    "ours-2w-window512": {"num_workers": 2, "cpus_per_worker": 0.5, "env": {}, "overrides": ["data.pack_window=512"]},
    # ours-2w with each window's pairs in their shuffled order (no longest-first grouping): what grouping buys.
    "ours-2w-ungrouped": {"num_workers": 2, "cpus_per_worker": 0.5, "env": {},
                          "overrides": ["data.group_by_length=false"]},
}
TRL_CONFIGS = {
    "trl-ref": {"precompute_ref_log_probs": False},  # a frozen reference model next to the policy, run every step
    "trl-precompute": {"precompute_ref_log_probs": True},  # one reference pass in __init__, no reference model after
    # trl-precompute with transformers' train_sampling_strategy=group_by_length (LengthGroupedSampler over a
    # `length` column = the longer side of each pair): the Trainer's answer to padding, off by default.
    "trl-precompute-grouped": {"precompute_ref_log_probs": True, "group_by_length": True},
    # ... with one pair per forward and gradient accumulation to the same batch: no padding at all (each micro-batch
    # pads only chosen against rejected), TRL's nearest to padding-free.
    "trl-precompute-grouped-mb1": {"precompute_ref_log_probs": True, "group_by_length": True, "micro_batch": 1},
    # TRL data-parallel as ours is: 2 processes under torchrun (gloo, OMP_NUM_THREADS=1 each), batch / 2 per rank.
    "trl-2p-precompute-grouped": {"precompute_ref_log_probs": True, "group_by_length": True, "nproc": 2},
    "trl-2p-precompute-grouped-mb1": {"precompute_ref_log_probs": True, "group_by_length": True, "nproc": 2,
                                      "micro_batch": 1},
}
# Peers at their best by default: every TRL setting that can be fastest; ours as shipped and in TRL's layout.
DEFAULT_OURS = "ours-2w,ours-2w-padded"
DEFAULT_TRL = "trl-precompute-grouped,trl-precompute-grouped-mb1,trl-2p-precompute-grouped,trl-2p-precompute-grouped-mb1"


# --------------------------------------------------------------------------------------------------------------
# side: ours (run_dpo on a local Ray cluster)


def ours_overrides(spec: dict) -> list[str]:
    src = Path(spec["src"])
    return [
        f"model.path={spec['model_path']}",
        f"data.path={spec['data_path']}",
        f"data.max_length={spec['max_length']}",
        f"dpo.max_prompt_length={spec['max_prompt_length']}",
        f"dpo.beta={BETA}",
        "dpo.loss_type=sigmoid",
        "dpo.ref.mode=precompute",
        f"dpo.ref.batch_size={spec['ref_batch']}",
        f"train.lr={LR}",
        f"train.warmup_ratio={WARMUP_RATIO}",
        f"train.micro_batch_size={spec['micro_batch_size']}",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={spec['total_steps']}",
        f"train.epochs={spec['epochs']}",
        "train.precision=fp32",
        f"train.checkpoint_every={10**9}",  # only the final (forced) checkpoint, after the measured window
        f"scaling.num_workers={spec['num_workers']}",
        f"scaling.cpus_per_worker={spec['cpus_per_worker']}",
        f"deepspeed.config={src / 'configs' / 'deepspeed' / 'zero2.json'}",
        "wandb.enabled=false",
        f"run.output_dir={spec['output_dir']}",
        f"run.name={spec['name']}",
        *spec.get("overrides", []),
    ]


def side_ours(spec: dict) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from zephyr_ray.config import DPORecipe, load_config
    from zephyr_ray.train.dpo import run_dpo

    src, out = Path(spec["src"]), Path(spec["output_dir"])
    cfg = load_config(src / "configs" / "tiny" / "dpo.yaml", ours_overrides(spec), DPORecipe)
    run = run_ours(run_dpo, cfg, src, out)
    metrics, ends, t1, t_fit = run["metrics"], run["ends"], run["t_start"], run["t_fit"]
    pairs = deltas([m["samples"] for m in metrics])  # cumulative, global: one sample id per pair
    tokens = deltas([m["tokens"] for m in metrics])  # non-padding tokens of both sequences of every pair
    w = spec["warmup"]
    steady = steady_state(ends, {"pairs": pairs, "tokens": tokens}, w)
    # run_stage writes data_report.json after its planning pass, right before the reference pass starts;
    # precompute_reference writes ref_logps/_SUCCESS (holding its own timer) right after it ends.
    plan_end = (out / "data_report.json").stat().st_mtime
    success = out / "ref_logps" / "_SUCCESS"
    precompute_s, ref_end = json.loads(success.read_text())["seconds"], success.stat().st_mtime
    return {
        "side": "ours",
        "steps": len(metrics),
        "pairs_per_step_list": pairs,
        "tokens_per_step_list": tokens,
        "step_end_unix_list": ends,
        "step_time_s_list": [m["step_time_s"] for m in metrics],
        "steady": steady,
        "loop_timer_pairs_per_s": sum(pairs[w:]) / sum(m["step_time_s"] for m in metrics[w:]),
        "precompute_s": precompute_s,
        "precompute_outside_s": ref_end - plan_end,
        "phases": {"plan": [t1, plan_end], "precompute": [plan_end, ref_end], "train": [ref_end, ends[-1]]},
        "plan_s": plan_end - t1,
        "precompute_end_to_first_step_s": ends[0] - ref_end,
        "after_last_step_s": t1 + t_fit - ends[-1],
        "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
        "ray_init_s": run["ray_init_s"],
        "run_dpo_s": t_fit,
        "data_report": run["data_report"],
        "package_in_workers": run["package_in_workers"],
    }


# --------------------------------------------------------------------------------------------------------------
# side: TRL DPOTrainer


def trl_trainer_class():
    """``DPOTrainer`` taking already tokenized pairs (ours) and timing its reference precompute."""
    from trl import DPOTrainer

    class BenchDPOTrainer(DPOTrainer):
        precompute_window: list[float] | None = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids from preference_examples, already cut to length

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "length"]  # kept for LengthGroupedSampler

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.time()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.precompute_window = [t0, time.time()]
            return out

    return BenchDPOTrainer


def run_dataset(spec: dict, grouped: bool):
    """This run's own file-backed copy of the pairs (with a ``length`` column when ``grouped``: LengthGroupedSampler
    reads lengths from it). File-backed, so TRL's precompute cache lands next to it where every rank finds it (an
    in-memory dataset caches under a per-process temp folder); a copy per run, so no run reuses another's cache."""
    from datasets import load_from_disk

    src = Path(spec["ids_path"]).with_suffix(".grouped" if grouped else ".plain")
    dst = Path(spec["output_dir"]) / "dataset"
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = dst.with_name("dataset.tmp")
        shutil.copytree(src, tmp)
        tmp.rename(dst)  # whole, at once: the other ranks wait for it
    while not dst.exists():
        time.sleep(0.1)
    return load_from_disk(str(dst))


def side_trl(spec: dict) -> dict | None:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from zephyr_ray.models import load_tokenizer

    check_snapshot(spec["src"])
    grouped = spec.get("group_by_length", False)
    dataset = run_dataset(spec, grouped)
    tok = load_tokenizer(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=spec["output_dir"],
        max_length=spec["max_length"],  # a no-op: the pairs already fit
        padding_free=False,  # TRL 1.16: unavailable for DPO (True warns and falls back to padding)
        precompute_ref_log_probs=spec["precompute_ref_log_probs"],
        precompute_ref_batch_size=spec["ref_batch"],
        train_sampling_strategy="group_by_length" if grouped else "random",
        beta=BETA,
        loss_type=["sigmoid"],
        per_device_train_batch_size=spec["per_device"],
        gradient_accumulation_steps=spec["gas"],
        ddp_backend="gloo" if spec.get("nproc", 1) > 1 else None,
        max_steps=spec["total_steps"],
        learning_rate=LR,
        warmup_steps=WARMUP_RATIO,  # < 1: a ratio of max_steps
        **TRL_COMMON_ARGS,  # DPOConfig defaults to bf16 and gradient checkpointing: both turned off there
    )
    t0 = time.time()
    trainer = trl_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tok)
    t_init = time.time() - t0
    clock = step_clock(trainer)  # DPOTrainer counts attention_mask.sum(): non-padding tokens of both sequences
    t1 = time.time()
    out = trainer.train()
    t_train = time.time() - t1
    pairs = [spec["global_batch"]] * len(clock.ends)  # the pair count divides into full batches (checked in main)
    tokens = deltas(clock.cum_tokens)  # gathered over ranks by TRL: global
    window = trainer.precompute_window
    if not trainer.is_world_process_zero():
        return None
    return {
        **trl_figures(trainer, clock, out, t_train),
        "pairs_per_step_list": pairs,
        "tokens_per_step_list": tokens,
        "steady": steady_state(clock.ends, {"pairs": pairs, "tokens": tokens}, spec["warmup"]),
        "precompute_s": window[1] - window[0] if window else 0.0,
        "phases": {**({"precompute": window} if window else {}), "train": [t1, clock.ends[-1]]},
        "init_s": t_init,
        "holds_ref_model": trainer.ref_model is not None,
    }


# --------------------------------------------------------------------------------------------------------------
# driver


def prepare(work: Path, data_src: Path, limit: int, max_length: int, max_prompt_length: int,
            model: str | None = None) -> dict:
    """The shared model directory (the tiny random Mistral, or ``model`` resolved to an HF folder), the shared pairs
    (JSONL for ours) and their token ids (for TRL)."""
    from datasets import Dataset

    from zephyr_ray.config import DataConfig
    from zephyr_ray.data.preference import preference_examples
    from zephyr_ray.gguf_import import resolve
    from zephyr_ray.models import build_tiny, load_tokenizer

    model_path = resolve(model) if model else build_tiny(work / "tiny-base", seed=0)
    rows = read_jsonl(data_src)
    rows = rows[:limit] if limit else rows
    keep = ("prompt", "chosen", "rejected")
    data_path = work / "pairs.jsonl"
    data_path.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in rows))
    examples, report = preference_examples(rows, load_tokenizer(model_path), DataConfig(max_length=max_length),
                                           max_prompt_length)
    ids_path = work / "pair_ids.jsonl"
    fields = ("prompt_ids", "chosen_ids", "rejected_ids")
    ids_path.write_text("".join(json.dumps({k: e[k] for k in fields}) + "\n" for e in examples))
    ids = [{k: e[k] for k in fields} for e in examples]
    Dataset.from_list(ids).save_to_disk(str(ids_path.with_suffix(".plain")))
    Dataset.from_list([{**r, "length": len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))}
                       for r in ids]).save_to_disk(str(ids_path.with_suffix(".grouped")))
    longest = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    # both sequences of every pair; the LM head is needed where a completion token follows
    flops = flop_model(model_path, [len(e["prompt_ids"]) + len(e[k]) for e in examples for k in ("chosen_ids",
                                                                                                 "rejected_ids")],
                       sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples))
    return {
        "model": model or "tiny random Mistral (build_tiny, seed 0)",
        "model_path": model_path,
        "data_source": str(data_src),
        "data_path": str(data_path),
        "ids_path": str(ids_path),
        "rows": len(rows),
        "pairs": report.used,
        "truncated_pairs": report.truncated,
        "skipped": dict(report.skipped),
        "tokens": report.tokens,  # non-padding, both sequences of every pair (the prompt counted twice)
        "label_tokens": report.label_tokens,
        "tokens_per_pair": report.tokens / max(report.used, 1),
        "longest_sequence_median": statistics.median(longest) if longest else 0,
        **flops,
    }


def build_specs(a: argparse.Namespace, src: Path, prep: dict, work: Path, total_steps: int, epochs: int
                ) -> list[tuple[dict, dict]]:
    """(spec, extra env) of every configuration asked for, ours first."""
    shared = {"src": str(src), "model_path": prep["model_path"], "max_length": a.max_length,
              "max_prompt_length": a.max_prompt_length, "ref_batch": a.ref_batch, "global_batch": a.global_batch,
              "total_steps": total_steps, "warmup": a.warmup}
    specs = []
    for name in names_in(a.ours, OURS_CONFIGS):
        oc = OURS_CONFIGS[name]
        per_worker = split_batch(a.global_batch, oc["num_workers"], "workers")
        spec = {"side": "ours", "name": name, **shared, "data_path": prep["data_path"],
                "trainer_label": "ray::RayTrainWorker",
                "micro_batch_size": per_worker, "num_workers": oc["num_workers"],
                "cpus_per_worker": oc["cpus_per_worker"], "epochs": epochs, "output_dir": str(work / name),
                "overrides": oc.get("overrides", [])}
        specs.append((spec, oc["env"]))
    for name in names_in(a.trl, TRL_CONFIGS):
        tc = TRL_CONFIGS[name]
        nproc = tc.get("nproc", 1)
        per_rank = split_batch(a.global_batch, nproc, "processes")
        micro = tc.get("micro_batch", per_rank)
        spec = {"side": "trl", "name": name, **shared, **tc, "ids_path": prep["ids_path"],
                "per_device": micro, "gas": per_rank // micro, "output_dir": str(work / name)}
        # one thread per process when data-parallel (as ours: Ray gives each worker OMP_NUM_THREADS=1)
        specs.append((spec, {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}))
    return specs


# --------------------------------------------------------------------------------------------------------------
# figures derived from a finished run


def steady_pairs_per_s(r: dict) -> float:
    return r["steady"]["pairs_per_s"]


def epoch_figures(r: dict, pairs: int) -> dict:
    """One epoch over ``pairs`` at the steady rate, with and without the reference pass before it."""
    train_s = pairs / steady_pairs_per_s(r)
    return {"epoch_train_s": train_s, "epoch_total_s": r["precompute_s"] + train_s,
            "total_pairs_per_s": pairs / (r["precompute_s"] + train_s),
            "precompute_share_of_total": r["precompute_s"] / (r["precompute_s"] + train_s)}


def describe(r: dict, pairs: int) -> str:
    e, m = epoch_figures(r, pairs), r["memory"]
    return (f"{steady_pairs_per_s(r):.2f} pairs/s steady, precompute {r['precompute_s']:.1f} s, "
            f"{e['total_pairs_per_s']:.2f} pairs/s with it; peak RSS {m['tree_rss_mb']:.0f} MB tree, "
            f"{fmt(m['train_sum_rss_mb'])} MB training processes ({m['train_processes']})")


def summarize(best: dict[str, dict], runs: list[dict], pairs: int, peak_flops: float, flops_per_token: float
              ) -> dict[str, dict]:
    """The figures of each configuration's best run (by steady pairs/s), for the table and the JSON."""
    out = {}
    for name, r in best.items():
        out[name] = {
            "name": name,
            "side": r["side"],
            "steady_pairs_per_s": steady_pairs_per_s(r),
            "steady_tokens_per_s": r["steady"]["tokens_per_s"],
            "mfu_cpu": r["steady"]["tokens_per_s"] * flops_per_token / peak_flops,
            "step_time_s": r["steady"]["step_time_s"],
            "precompute_s": r["precompute_s"],
            **epoch_figures(r, pairs),
            "tokens_trained": sum(r["tokens_per_step_list"]),
            "steps": r["steps"],
            **r["memory"],
            "peak_rss_mb_by_phase": r["peak_rss_mb_by_phase"],
            "process_wall_s": r["process_wall_s"],
            "foreign_cpu_cores_in_window": r["foreign_cpu_cores_in_window"],
            "round": r["round"],
            "all_runs_steady_pairs_per_s": [steady_pairs_per_s(x) for x in runs if x["name"] == name and x["ok"]],
        }
    return out


COLUMNS = [  # (key, header, format) of the table printed here and in docs/benchmarks.md
    ("name", "config", ""), ("steady_pairs_per_s", "pairs/s", ".2f"), ("steady_tokens_per_s", "tok/s", ".0f"),
    ("mfu_cpu", "MFU (CPU)", ".3%"),
    ("precompute_s", "ref pass s", ".1f"), ("total_pairs_per_s", "pairs/s incl. ref", ".2f"),
    ("tokens_trained", "tokens trained", ".0f"), ("train_processes", "train procs", ".0f"),
    ("largest_train_rss_mb", "largest proc RSS MB", ".0f"), ("train_sum_rss_mb", "train procs RSS MB", ".0f"),
    ("train_sum_pss_mb", "train procs PSS MB", ".0f"), ("tree_rss_mb", "tree RSS MB", ".0f"),
    ("tree_pss_mb", "tree PSS MB", ".0f"), ("foreign_cpu_cores_in_window", "other cores", ".2f"),
]


def headlines(summary: dict[str, dict], parity: dict) -> list[dict]:
    """ours-2w (as shipped) against the fastest TRL configuration of this run; memory as summed training processes
    against each TRL layout with as many processes, and against single-process TRL."""
    ours = summary.get("ours-2w") or fastest(summary, "ours", "steady_pairs_per_s")
    out = [
        headline("dDPO steady pairs/s", ours, fastest(summary, "trl", "steady_pairs_per_s"), "steady_pairs_per_s",
                 "pairs/s", parity["ok"], goal=1.5),
        headline("dDPO pairs/s incl. reference pass", ours, fastest(summary, "trl", "total_pairs_per_s"),
                 "total_pairs_per_s", "pairs/s", parity["ok"], goal=1.5),
    ]
    if ours is not None:
        for g in memory_goal(summary, ours["name"], 0.7):
            out.append(headline(f"dDPO summed training-process RSS vs {g['peer_processes']}-process TRL", ours,
                                summary[g["peer"]], "train_sum_rss_mb", "MB", True, goal=0.7, lower_is_better=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_comparison_args(ap, OURS_CONFIGS, TRL_CONFIGS, DEFAULT_OURS, DEFAULT_TRL)
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of the data (0 = all; default 512, "
                    f"{REAL_LIMIT} with --model)")
    ap.add_argument("--max-prompt-length", type=int, default=None, help="default 512 (256 with --model)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="pairs per optimizer step (both sides); default 16 (4 with --model: 2 per micro-batch)")
    ap.add_argument("--ref-batch", type=int, default=32,
                    help="pairs per reference forward in the precompute pass (ours' dpo.ref.batch_size, TRL's "
                    "precompute_ref_batch_size; 32 = configs/tiny/dpo.yaml)")
    ap.add_argument("--data", type=Path, default=None, help=f"default: {SHARED_DATA} if present, else {SAMPLE_DATA}")
    add_common_args(ap, DEFAULT_OUT)
    a = ap.parse_args()
    if a._side:
        side_main(a, {"ours": side_ours, "trl": side_trl})
        return
    real = a.model is not None
    a.ours_trl_named = a.ours is not None or a.trl is not None
    quick = {"limit": 16, "warmup": 1, "max_length": 256, "max_prompt_length": 128, "global_batch": 4,
             "ours": "ours-2w", "trl": "trl-precompute-grouped,trl-2p-precompute-grouped"} if a.quick else {}
    defaults = {"limit": REAL_LIMIT if real else 512, "max_length": 512 if real else 1024,
                "max_prompt_length": 256 if real else 512, "global_batch": 4 if real else 16,
                "ours": REAL_OURS if real else DEFAULT_OURS, "trl": REAL_TRL if real else DEFAULT_TRL}
    for k, v in quick.items():  # --quick: smallest settings (the configurations only where none were named)
        if k not in ("ours", "trl") or not a.ours_trl_named:
            setattr(a, k, v)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, "" if k in ("ours", "trl") and a.ours_trl_named else v)

    data_src = a.data or (SHARED_DATA if SHARED_DATA.exists() else SAMPLE_DATA)
    bench = bench_name("dpo_throughput", a.model)
    if a.out == DEFAULT_OUT:
        a.out = DEFAULT_OUT.with_name(f"{bench}.json")
    session = start_session(a.work_dir, "dpo_bench_", f"data {data_src}", quick=a.quick,
                            bench=bench)
    prep = prepare(session.work, data_src, a.limit, a.max_length, a.max_prompt_length, a.model)
    pairs = prep["pairs"]
    if pairs % a.global_batch:
        raise SystemExit(f"{pairs} pairs do not make full batches of {a.global_batch}; change --limit")
    epoch_steps = pairs // a.global_batch
    steps, total_steps, epochs = plan_steps(pairs, a.global_batch, a.steps, a.warmup, "pairs")
    a.steps = steps
    mm_before = matmul_flops()
    print(f"[bench] {pairs} pairs ({prep['truncated_pairs']} truncated), {prep['tokens_per_pair']:.0f} tokens/pair; "
          f"{a.warmup} warmup + {steps} measured steps per run ({epochs} epoch(s) of {epoch_steps}); fp32 matmul "
          f"{mm_before['best_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    specs = build_specs(a, session.src, prep, session.work, total_steps, epochs)
    runs = run_rounds(Path(__file__).resolve(), specs, session.work, a, lambda r: describe(r, pairs))
    mm_after = matmul_flops()
    best = best_per_config(runs, [s["name"] for s, _ in specs], steady_pairs_per_s)
    peak = max(mm_before["best_flops"], mm_after["best_flops"])  # MFU against the matmul rate of this run
    summary = summarize(best, runs, pairs, peak, prep["flops_per_token"])
    # Every configuration trains every pair once per epoch, both sequences unpadded-counted: no difference allowed.
    parity = token_parity({k: v["tokens_trained"] for k, v in summary.items()})
    heads = headlines(summary, parity)
    print(f"\ndDPO throughput, {prep['model']}, data {Path(prep['data_source']).name} ({pairs} pairs, "
          f"{prep['truncated_pairs']} truncated, {prep['tokens_per_pair']:.0f} tokens/pair), max_length "
          f"{a.max_length} / max_prompt_length {a.max_prompt_length}, {a.global_batch} pairs/step, fp32; steady "
          f"state = steps {a.warmup + 1}..{total_steps}" + (f"; best of {a.repeats} runs" if a.repeats > 1 else ""))
    print_table(COLUMNS, summary, specs, session.work)
    print_headlines(heads, parity)
    print_noise_notes({k: v["foreign_cpu_cores_in_window"] for k, v in summary.items()}, a)
    print_failures(runs)
    finish_session(session, {
        "matmul": {"before": mm_before, "after": mm_after, "peak_flops": peak},
        "config": {
            "model": prep["model"], "steps": steps, "warmup": a.warmup, "epochs": epochs, "limit": a.limit,
            "max_length": a.max_length, "max_prompt_length": a.max_prompt_length, "global_batch_pairs": a.global_batch,
            "ref_batch_pairs": a.ref_batch, "repeats": a.repeats, "precision": "fp32", "beta": BETA, "lr": LR,
            "loss": "sigmoid", "tokens": "identical on both sides (zephyr_ray.data.preference.preference_examples)",
        },
        **comparison_record(COLUMNS, summary, specs, OURS_CONFIGS, TRL_CONFIGS),
        "data": prep,
        "parity": parity,
        "headline": heads,
        "summary": summary,
        "runs": runs,
    }, a.out)


if __name__ == "__main__":
    main()
