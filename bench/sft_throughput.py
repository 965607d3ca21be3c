"""dSFT training throughput: zephyr_ray (Ray Train + DeepSpeed) vs TRL's ``SFTTrainer``, same machine, same run.

Both sides train the SAME tiny random Mistral (one ``build_tiny`` directory), on the SAME dialogues (one JSONL
holding only ``messages``), with the same max length, packing (best-fit decreasing, one causal block per packed
sequence), assistant-only loss, fp32 on CPU, and the same global batch (packed rows per optimizer step). No eval,
no W&B / report_to, no intermediate checkpoints.

Data: the first ``--limit`` (256) dialogues of ../shared/data/alpaca_eval/sft_gpt4_teacher.jsonl (else the shipped
sample), max_length 1024. 256 is the tiny recipe's ``data.pack_window``, so ours packs the same single window that
TRL's whole-dataset BFD packs: both train on the same packed rows. BFD emits rows fullest first (long single
dialogues, then packed short ones), so by default the measured window is the rest of one full epoch after the
warmup steps: both sides see the same mix of rows (TRL in random order, ours in packing order).

Measured, per configuration, in a fresh subprocess (so memory and threads do not leak between them):

* steady-state tokens/s = non-padding input tokens of steps (warmup, warmup + steps] / wall time between the end
  of step ``warmup`` and the end of the last step. Step ends are wall-clock: for ours the arrival of each line of
  ``metrics.jsonl`` (tailed every 20 ms), for TRL ``TrainerCallback.on_step_end``. Ours also reports the loop's own
  per-step timer (``step_time_s``), which leaves out the gaps between steps.
* peak RSS: sum of the RSS of the side's process and all its descendants (Ray's GCS, raylet, train workers and
  Ray Data workers are descendants of the process that calls ``ray.init``), sampled every 1 s; PSS (shared pages
  split between processes) is sampled every 5 s as a cross-check, since summed RSS counts shared libraries once
  per process.
* machine fp32 matmul FLOP/s (2048x2048 ``torch.matmul``, torch's default thread count), and MFU-on-CPU =
  training FLOP/s / that, with training FLOPs/token = 6 * N_body + 6 * N_head * f + 6 * n_layers * d_model *
  sum(n_i^2) / sum(n_i) (N_body = parameters outside the input embedding and LM head; the head is only needed at
  the fraction f of tokens followed by a trained token; the last term is causal attention within each packed
  sequence of n_i tokens, forward + backward). The same FLOPs/token is used for both sides (useful work only).
* foreign CPU load: CPU used by processes outside this benchmark during each measured window (other users of the
  machine make 2-core numbers noisy; it is printed so a disturbed run can be recognised). Before each run the
  script waits (``--quiet-wait``) for the machine to go quiet; ``--repeats N`` interleaves N rounds and keeps each
  configuration's best run.

Configurations (``--ours``, ``--trl``; global batch = ``--global-batch`` packed rows per optimizer step):

* ours-2w: configs/tiny/sft.yaml as shipped (2 Ray Train workers x 0.5 CPU, ZeRO-2, micro-batch = batch / 2);
* ours-1w: 1 worker x 0.5 CPU (Ray then exports OMP_NUM_THREADS=1, so torch uses one core);
* ours-1w-omp2: 1 worker, OMP_NUM_THREADS=2 exported before ``ray.init`` (Ray keeps a value it finds);
* ours-2w-mb1: ours-2w with one packed row per forward and gradient accumulation to the same batch (families whose
  attention materialises its mask, Falcon and MPT, run faster on small micro-batches);
* trl-bs: per_device_train_batch_size = batch: TRL's bfd packing is padding-free and flattens the batch into one
  row of ~batch x max_length tokens (SDPA then computes a (batch x max_length)^2 masked attention);
* trl-bs1-gas: per_device_train_batch_size = 1, gradient_accumulation_steps = batch (one packed row per forward).

* trl-2p / trl-2p-bs1-gas: trl-bs / trl-bs1-gas as 2 DDP processes under torchrun (gloo, 1 thread each).

Defaults put TRL at its best: every layout above (padding-free is on: TRL 1.16's bfd packing implies it, and on CPU
SDPA reads the sequence boundaries from position_ids; a length-grouped sampler has nothing to group in packed rows
of ~max_length). The headline ratio is ours-2w against the fastest TRL configuration of the same run, printed only
when the trained non-pad tokens agree up to the packed rows each side left out of the last partial batch (token
parity, reported). Memory three ways as in dpo_throughput.py. ``--model smollm2-135m-instruct`` trains the real
model; ``--quick`` is a smoke run.

The code under test is a snapshot of zephyr_ray/ and configs/ taken at start (first on PYTHONPATH for every
process, Ray workers included), so edits to the checkout during a run do not mix versions.

    .venv/bin/python bench/sft_throughput.py [--steps N] [--warmup 3] [--limit 256] [--max-length 1024] [--repeats 1]
        [--out PATH]
"""

from __future__ import annotations

import argparse
import json
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

from zephyr_ray.models import TINY_FAMILY_NAMES, load_model

SHARED_DATA = SHARED_DATA_DIR / "sft_gpt4_teacher.jsonl"
SAMPLE_DATA = ROOT / "data" / "sample" / "sft.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results" / "sft_throughput.json"

# What each side is run as. "ours" entries are Ray Train worker layouts (global batch is kept the same: each worker
# takes global_batch / num_workers rows a step, in one micro-batch or, with "micro_batch", accumulated); "trl"
# entries are SFTTrainer batch layouts.
OURS_CONFIGS = {
    # configs/tiny/sft.yaml as shipped: 2 workers x 0.5 CPU (Ray gives each OMP_NUM_THREADS=1), ZeRO-2.
    "ours-2w": {"num_workers": 2, "cpus_per_worker": 0.5, "deepspeed": "zero2.json", "env": {}},
    # 1 worker x 0.5 CPU: Ray sets OMP_NUM_THREADS=floor(max(1, 0.5)) = 1, so torch uses 1 of the 2 cores.
    "ours-1w": {"num_workers": 1, "cpus_per_worker": 0.5, "deepspeed": "zero2.json", "env": {}},
    # 1 worker, OMP_NUM_THREADS=2 exported before ray.init (Ray keeps a value it finds), torch uses both cores.
    "ours-1w-omp2": {
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "deepspeed": "zero2.json",
        "env": {"OMP_NUM_THREADS": "2"},
    },
    # ours-2w with micro-batches of one packed row, accumulated to the same global batch.
    "ours-2w-mb1": {"num_workers": 2, "cpus_per_worker": 0.5, "deepspeed": "zero2.json", "env": {}, "micro_batch": 1},
}
TRL_CONFIGS = {
    # per_device_train_batch_size = global batch: TRL's bfd packing is padding-free, so the collator flattens the
    # whole batch into ONE row of ~global_batch * max_length tokens (block-diagonal mask from position_ids).
    "trl-bs": {"per_device": "global", "gas": 1},
    # One packed row per forward and gradient accumulation to the same global batch: attention footprint per
    # forward equal to ours (rows of max_length).
    "trl-bs1-gas": {"per_device": 1, "gas": "global"},
    # TRL data-parallel as ours is: 2 processes under torchrun (gloo, OMP_NUM_THREADS=1 each), batch / 2 per rank.
    "trl-2p": {"per_device": "rank", "gas": 1, "nproc": 2},
    "trl-2p-bs1-gas": {"per_device": 1, "gas": "rank", "nproc": 2},
}
# Peers at their best by default: every TRL layout that can be fastest, against ours as shipped.
DEFAULT_OURS = "ours-2w"
DEFAULT_TRL = "trl-bs,trl-bs1-gas,trl-2p,trl-2p-bs1-gas"
REAL_LIMIT = 64  # dialogues with --model (a 135M model: ~10x the tiny one's step time)


# --------------------------------------------------------------------------------------------------------------
# side: ours (run_sft on a local Ray cluster)


def side_ours(spec: dict) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from zephyr_ray.config import SFTRecipe, load_config
    from zephyr_ray.train.sft import run_sft

    out = Path(spec["output_dir"])
    overrides = [
        f"model.path={spec['model_path']}",
        f"data.path={spec['data_path']}",
        f"data.max_length={spec['max_length']}",
        "data.packing=true",
        f"train.micro_batch_size={spec['micro_batch_size']}",
        f"train.gradient_accumulation_steps={spec['gas']}",
        f"train.max_steps={spec['total_steps']}",
        f"train.epochs={spec['epochs']}",
        "train.precision=fp32",
        f"train.checkpoint_every={10**9}",  # only the final (forced) checkpoint, after the measured window
        f"scaling.num_workers={spec['num_workers']}",
        f"scaling.cpus_per_worker={spec['cpus_per_worker']}",
        "wandb.enabled=false",
        f"run.output_dir={out}",
        f"run.name={spec['name']}",
    ]
    src = Path(spec["src"])
    overrides.append(f"deepspeed.config={src / 'configs' / 'deepspeed' / spec['deepspeed']}")
    cfg = load_config(src / "configs" / "tiny" / "sft.yaml", overrides, SFTRecipe)
    run = run_ours(run_sft, cfg, src, out)
    metrics, ends = run["metrics"], run["ends"]
    tokens = deltas([m["tokens"] for m in metrics])  # "tokens" is cumulative, global (all workers)
    w = spec["warmup"]
    timer = metrics[w:]
    return {
        "side": "ours",
        "steps": len(metrics),
        "tokens_per_step_list": tokens,
        "step_end_unix_list": ends,
        "step_time_s_list": [m["step_time_s"] for m in metrics],
        "step_gap_s_list": [b - a for a, b in zip(ends, ends[1:])],
        "steady": steady_state(ends, {"tokens": tokens}, w),
        "loop_timer_tokens_per_s": sum(tokens[w:]) / sum(m["step_time_s"] for m in timer),
        "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
        "packed_rows": run["data_report"]["packed_rows"],
        "ray_init_s": run["ray_init_s"],
        "run_sft_s": run["t_fit"],
        "data_report": run["data_report"],
        "package_in_workers": run["package_in_workers"],
    }


# --------------------------------------------------------------------------------------------------------------
# side: TRL SFTTrainer


# The per-message line of a ChatML template (SmolLM2's, as its GGUF carries it) and the same text with TRL's
# {% generation %} markers around an assistant answer: SFTTrainer's assistant_only_loss needs them and cannot patch
# the template itself. The rendered text is unchanged, so both sides train the same tokens.
CHATML_LINE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
CHATML_MARKED = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                 "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + CHATML_LINE +
                 "{% endif %}")


def training_template(template: str) -> str:
    """``template`` itself when it marks the assistant's answers already, else its ChatML line marked."""
    if "{% generation %}" in template or "{%- generation %}" in template:
        return template
    if CHATML_LINE not in template:
        raise SystemExit("the model's chat template has no {% generation %} markers and is not the ChatML shape "
                         "this bench knows how to mark: TRL's assistant_only_loss cannot train on it")
    return template.replace(CHATML_LINE, CHATML_MARKED)


def side_trl(spec: dict) -> dict | None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from zephyr_ray.models import load_tokenizer

    check_snapshot(spec["src"])
    rows = read_jsonl(Path(spec["data_path"]))
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    tok = load_tokenizer(spec["model_path"])
    tok.chat_template = training_template(tok.chat_template)
    model = load_model(spec["model_path"])  # sdpa, as ours (eager for families without it: MPT)
    args = SFTConfig(
        output_dir=spec["output_dir"],
        max_length=spec["max_length"],
        packing=True,
        packing_strategy="bfd",  # best-fit decreasing, like ours; implies padding-free (position_ids, no mask)
        padding_free=True,
        assistant_only_loss=True,  # labels only on {% generation %} spans (assistant content + EOS)
        completion_only_loss=False,
        per_device_train_batch_size=spec["per_device"],
        gradient_accumulation_steps=spec["gas"],
        ddp_backend="gloo" if spec.get("nproc", 1) > 1 else None,
        max_steps=spec["total_steps"],
        learning_rate=2e-3,
        warmup_steps=0.1,
        **TRL_COMMON_ARGS,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    packed = trainer.train_dataset
    packed_tokens = sum(len(x) for x in packed["input_ids"])
    # SFTTrainer counts position_ids.size(1) per micro-batch: the flattened row has no padding (pad_to_multiple_of
    # is None on CPU), so its token count is every non-padding input token.
    clock = step_clock(trainer)
    t0 = time.time()
    out = trainer.train()
    t_train = time.time() - t0
    tokens = deltas(clock.cum_tokens)  # gathered over ranks by TRL: global
    w = spec["warmup"]
    if not trainer.is_world_process_zero():
        return None
    return {
        **trl_figures(trainer, clock, out, t_train),
        "tokens_per_step_list": tokens,
        "step_gap_s_list": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
        "steady": steady_state(clock.ends, {"tokens": tokens}, w),
        "packed_rows": len(packed),
        "packed_tokens": packed_tokens,
    }


# --------------------------------------------------------------------------------------------------------------
# driver


def prepare(work: Path, data_src: Path, max_length: int, limit: int, arch: str = "mistral",
            model: str | None = None) -> dict:
    """The shared model directory (a tiny random model of ``arch``, or ``model`` resolved to an HF folder), the
    shared data file (``messages`` only) and the FLOP model of both."""
    from zephyr_ray.data.packing import best_fit_decreasing
    from zephyr_ray.data.tokenize import tokenize_messages
    from zephyr_ray.gguf_import import resolve
    from zephyr_ray.models import build_tiny, load_tokenizer

    model_path = resolve(model) if model else build_tiny(work / "tiny-base", seed=0, arch=arch)
    rows = read_jsonl(data_src)
    rows = rows[:limit] if limit else rows
    data_path = work / "dialogues.jsonl"
    data_path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    tok = load_tokenizer(model_path)
    lengths, head_positions = [], 0
    for r in rows:
        enc = tokenize_messages(tok, r["messages"])
        labels = enc["labels"][:max_length]
        lengths.append(len(labels))
        head_positions += sum(1 for t in labels[1:] if t != -100)  # positions followed by a trained token
    flops = flop_model(model_path, lengths, head_positions)
    bins = best_fit_decreasing(lengths, max_length)  # what both sides' BFD makes of these dialogues
    return {
        "packed_rows": len(bins),
        "packed_rows_with_several_dialogues": sum(1 for b in bins if len(b) > 1),
        "model_path": model_path,
        "data_path": str(data_path),
        "data_source": str(data_src),
        "rows": len(rows),
        "tokens_after_truncation": sum(lengths),
        "truncated_rows": sum(1 for x in lengths if x == max_length),
        **flops,
        "family": arch,
        "model": model or f"tiny random {arch} (build_tiny, seed 0)",
    }


def build_specs(a: argparse.Namespace, src: Path, prep: dict, work: Path, total_steps: int, epochs: int
                ) -> list[tuple[dict, dict]]:
    """(spec, extra env) of every configuration asked for, ours first."""
    common = {"src": str(src), "model_path": prep["model_path"], "data_path": prep["data_path"],
              "max_length": a.max_length, "total_steps": total_steps, "warmup": a.warmup}
    specs = []
    for name in names_in(a.ours, OURS_CONFIGS):
        oc = OURS_CONFIGS[name]
        per_worker = split_batch(a.global_batch, oc["num_workers"], "workers")
        micro = oc.get("micro_batch", per_worker)
        if per_worker % micro:
            raise SystemExit(f"{name}: {per_worker} rows per worker do not split into micro-batches of {micro}")
        spec = {"side": "ours", "name": name, **common, "trainer_label": "ray::RayTrainWorker",
                "micro_batch_size": micro, "gas": per_worker // micro,
                "num_workers": oc["num_workers"], "cpus_per_worker": oc["cpus_per_worker"],
                "deepspeed": oc["deepspeed"], "epochs": epochs, "output_dir": str(work / name)}
        specs.append((spec, oc["env"]))
    for name in names_in(a.trl, TRL_CONFIGS):
        tc = TRL_CONFIGS[name]
        nproc = tc.get("nproc", 1)
        sizes = {"global": a.global_batch, "rank": split_batch(a.global_batch, nproc, "processes")}
        per, gas = sizes.get(tc["per_device"], tc["per_device"]), sizes.get(tc["gas"], tc["gas"])
        # one thread per process when data-parallel (as ours: Ray gives each worker OMP_NUM_THREADS=1)
        specs.append(({"side": "trl", "name": name, **common, "per_device": per, "gas": gas, "nproc": nproc,
                       "output_dir": str(work / name)}, {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}))
    return specs


def tokens_per_s(r: dict) -> float:
    return r["steady"]["tokens_per_s"]


def summarize(best: dict[str, dict], runs: list[dict], peak_flops: float, flops_per_token: float) -> dict[str, dict]:
    """The figures of each configuration's best run (by steady tokens/s), for the table and the JSON."""
    out = {}
    for name, r in best.items():
        out[name] = {
            "name": name,
            "side": r["side"],
            "tokens_per_s": tokens_per_s(r),
            "tokens_per_step": r["steady"]["tokens_per_step"],
            "step_time_s": r["steady"]["step_time_s"],
            "mfu_cpu": tokens_per_s(r) * flops_per_token / peak_flops,
            "tokens_trained": sum(r["tokens_per_step_list"]),
            "packed_rows": r["packed_rows"],
            "steps": r["steps"],
            **r["memory"],
            "process_wall_s": r["process_wall_s"],
            "foreign_cpu_cores_in_window": r["foreign_cpu_cores_in_window"],
            "round": r["round"],
            "all_runs_tokens_per_s": [tokens_per_s(x) for x in runs if x["name"] == name and x["ok"]],
        }
    return out


COLUMNS = [  # (key, header, format) of the table printed here and in docs/benchmarks.md
    ("name", "config", ""), ("tokens_per_s", "tokens/s", ".0f"), ("step_time_s", "s/step", ".3f"),
    ("mfu_cpu", "MFU (CPU)", ".3%"), ("tokens_trained", "tokens trained", ".0f"),
    ("train_processes", "train procs", ".0f"), ("largest_train_rss_mb", "largest proc RSS MB", ".0f"),
    ("train_sum_rss_mb", "train procs RSS MB", ".0f"), ("train_sum_pss_mb", "train procs PSS MB", ".0f"),
    ("tree_rss_mb", "tree RSS MB", ".0f"), ("tree_pss_mb", "tree PSS MB", ".0f"),
    ("foreign_cpu_cores_in_window", "other cores", ".2f"),
]


def parity_of(summary: dict[str, dict], trained_rows: int, max_length: int, epochs: int = 1) -> dict:
    """Token parity: every configuration must train the same non-pad tokens, up to the packed rows each side left
    out of the last (partial) batch (their order differs: TRL shuffles, ours keeps packing order), each at most
    ``max_length`` tokens."""
    names = list(summary)
    if not names:
        return token_parity({})
    left = {k: max(0, v["packed_rows"] * epochs - trained_rows) for k, v in summary.items()}
    allowed = {k: (left[k] + left[names[0]]) * max_length for k in names}
    return {**token_parity({k: v["tokens_trained"] for k, v in summary.items()}, allowed),
            "rows_left_out": left}


def headlines(summary: dict[str, dict], parity: dict) -> list[dict]:
    """ours-2w (as shipped) against the fastest TRL configuration of this run; memory as summed training processes
    against each TRL layout with as many processes, and against single-process TRL."""
    ours = summary.get("ours-2w") or fastest(summary, "ours", "tokens_per_s")
    out = [headline("dSFT tokens/s", ours, fastest(summary, "trl", "tokens_per_s"), "tokens_per_s", "tokens/s",
                    parity["ok"], goal=1.3)]
    if ours is not None:
        for g in memory_goal(summary, ours["name"], 0.7):
            out.append(headline(f"dSFT summed training-process RSS vs {g['peer_processes']}-process TRL", ours,
                                summary[g["peer"]], "train_sum_rss_mb", "MB", True, goal=0.7, lower_is_better=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_comparison_args(ap, OURS_CONFIGS, TRL_CONFIGS, DEFAULT_OURS, DEFAULT_TRL)
    ap.add_argument("--limit", type=int, default=None,
                    help="first N dialogues of the data (default 256 = the tiny recipe's data.pack_window, so both "
                    f"sides pack the same rows; {REAL_LIMIT} with --model; 0 = all)")
    ap.add_argument("--global-batch", type=int, default=4, help="packed rows per optimizer step (both sides)")
    ap.add_argument("--data", type=Path, default=None, help=f"default: {SHARED_DATA} if present, else {SAMPLE_DATA}")
    ap.add_argument("--arch", default="mistral", choices=TINY_FAMILY_NAMES,
                    help="family of the tiny model both sides train (same parameter budget for every family)")
    add_common_args(ap, DEFAULT_OUT)
    a = ap.parse_args()
    if a._side:
        side_main(a, {"ours": side_ours, "trl": side_trl})
        return
    if a.limit is None:
        a.limit = REAL_LIMIT if a.model else 256
    if a.max_length is None:
        a.max_length = 512 if a.model else 1024
    named = a.ours is not None or a.trl is not None  # naming either runs only what was named
    if a.quick:  # smallest settings
        a.limit, a.max_length, a.global_batch, a.warmup = 32, 256, 2, 1
        if not named:
            a.ours, a.trl = "ours-2w", "trl-bs,trl-2p"
    a.ours = a.ours if a.ours is not None else ("" if named else DEFAULT_OURS)
    real_trl = "trl-bs1-gas,trl-2p-bs1-gas"  # with --model: fewer configurations (a 135M model, minutes each)
    a.trl = a.trl if a.trl is not None else ("" if named else (real_trl if a.model else DEFAULT_TRL))

    data_src = a.data or (SHARED_DATA if SHARED_DATA.exists() else SAMPLE_DATA)
    bench = bench_name("sft_throughput", a.model)
    if a.out == DEFAULT_OUT:
        a.out = DEFAULT_OUT.with_name(f"{bench}.json")
    session = start_session(a.work_dir, "sft_bench_", f"data {data_src}", quick=a.quick,
                            bench=bench)
    prep = prepare(session.work, data_src, a.max_length, a.limit, a.arch, a.model)
    # Packed rows come out of best-fit decreasing fullest first (long single dialogues, then packed short ones),
    # so a window shorter than an epoch sees an unrepresentative mix; by default the window is the whole epoch.
    steps, total_steps, epochs = plan_steps(prep["packed_rows"], a.global_batch, a.steps, a.warmup, "packed rows")
    if epochs > 1:
        print(f"[bench] note: {total_steps} steps span {epochs} epochs; ours re-runs its Ray Data "
              "pipeline at each epoch start", flush=True)
    a.steps = steps
    mm_before = matmul_flops()
    print(f"[bench] fp32 matmul {mm_before['best_flops'] / 1e9:.1f} GFLOP/s (best; {mm_before['threads']} threads); "
          f"{a.warmup} warmup + {a.steps} measured steps per run", flush=True)
    specs = build_specs(a, session.src, prep, session.work, total_steps, epochs)
    runs = run_rounds(Path(__file__).resolve(), specs, session.work, a,
                      lambda r: f"{tokens_per_s(r):.0f} tokens/s, peak RSS {r['memory']['tree_rss_mb']:.0f} MB tree")
    mm_after = matmul_flops()
    peak = max(mm_before["best_flops"], mm_after["best_flops"])  # MFU against the matmul rate of this run
    best = best_per_config(runs, [s["name"] for s, _ in specs], tokens_per_s)
    summary = summarize(best, runs, peak, prep["flops_per_token"])
    parity = parity_of(summary, total_steps * a.global_batch, a.max_length, epochs)
    heads = headlines(summary, parity)
    print(f"\ndSFT throughput, {prep['model']} ({prep['params_total']:,} params), max_length {a.max_length}, "
          f"{a.global_batch} packed rows/step, fp32, assistant-only loss, data {Path(prep['data_source']).name} "
          f"({prep['rows']} dialogues, {prep['packed_rows']} packed rows); steady state = steps "
          f"{a.warmup + 1}..{total_steps}; matmul {peak / 1e9:.1f} GFLOP/s; FLOPs/token "
          f"{prep['flops_per_token'] / 1e6:.2f} M" + (f"; best of {a.repeats} runs" if a.repeats > 1 else ""))
    print_table(COLUMNS, summary, specs, session.work)
    print_headlines(heads, parity)
    print_noise_notes({k: v["foreign_cpu_cores_in_window"] for k, v in summary.items()}, a)
    print_failures(runs)
    finish_session(session, {
        "matmul": {"before": mm_before, "after": mm_after, "peak_flops": peak},
        "config": {
            "model": prep["model"], "steps": a.steps, "warmup": a.warmup, "limit": a.limit,
            "max_length": a.max_length, "global_batch_rows": a.global_batch, "repeats": a.repeats,
            "epochs_cap": epochs, "precision": "fp32",
            "packing": "best-fit decreasing, position_ids, no attention mask (both sides)",
            "loss": "assistant tokens only (both sides)",
        },
        **comparison_record(COLUMNS, summary, specs, OURS_CONFIGS, TRL_CONFIGS),
        "model_and_data": prep,
        "parity": parity,
        "headline": heads,
        "summary": summary,
        "runs": runs,
    }, a.out)


if __name__ == "__main__":
    main()
