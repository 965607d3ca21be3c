"""GPU timing of the dSFT (and a DPO-style) train step core on a ~1B Mistral-shaped random model, bf16 + SDPA.

Needs only torch, transformers and numpy: no Ray, no DeepSpeed. From our package it uses the pure pieces the
real step uses: ``zephyr_ray.data.packing`` (best-fit-decreasing packing, ``collate`` with restarting
``position_ids``) and ``zephyr_ray.train.losses`` (``label_logits`` + ``token_nll_sum`` for SFT, ``sequence_logps``
+ ``preference_loss`` for DPO), and ``zephyr_ray.train.objectives.collate_pairs`` when it imports (it needs omegaconf;
a copy is used otherwise). The script checks that none of this pulled in ray or deepspeed.

The SFT step is what ``SFTObjective.loss`` + the loop do per optimizer step with one micro-batch: forward on
packed rows with ``position_ids`` and NO attention mask (transformers turns the position restarts into a
block-diagonal causal mask), LM head only where a trained token follows (boolean ``logits_to_keep``), summed
token NLL, backward of the mean, grad clipping, AdamW. The DPO step puts chosen and rejected through the policy in
one forward (2B rows, or with ``dpo-packed`` one row per pair), sums each sequence's response log-probs and takes
the sigmoid DPO loss against reference log-probs precomputed (untimed) with the starting weights, so the first
loss is log 2 = 0.693.

Reported per shape: tokens/s (non-padding input tokens), step time, peak memory, and MFU = model FLOP/s over
the card's measured dense bf16 matmul FLOP/s (8192^3 torch.matmul, best of 3 trials), with model FLOPs/token =
6 * N_body + 6 * N_head * f + 6 * n_layers * d_model * sum(n_i^2) / sum(n_i), where N_body = parameters outside
the input embedding and the LM head, N_head = LM head parameters, f = fraction of tokens at which the head is
needed (a trained token follows), n_i = tokens of each sequence (causal attention within it, forward + backward).

    python bench/gpu_train_step.py            # on a GPU (about a minute on an H100)
    python bench/gpu_train_step.py --smoke    # tiny shapes on CPU, checks the script end to end
Writes $OUT/gpu_train_step.json when OUT is set, else bench/results/gpu_train_step.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import envelope, write_result  # noqa: E402

from zephyr_ray.data.packing import collate, pack_sequences  # noqa: E402
from zephyr_ray.data.tokenize import IGNORE_INDEX  # noqa: E402
from zephyr_ray.train import losses  # noqa: E402
from zephyr_ray.train.objectives import collate_pairs  # noqa: E402  (imports neither Ray, DeepSpeed nor omegaconf)

PAIRS_FROM = "zephyr_ray.train.objectives.collate_pairs"

HEAVY = sorted(m for m in ("ray", "deepspeed") if sys.modules.get(m) is not None)

FULL_ARCH = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 8192,
}
SMOKE_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}
# (kind, rows, length). sft: packed rows of `length`; dpo: pairs whose sequences are <= `length` (2 rows per pair);
# dpo-packed: pairs packed one per row (rows <= 2 * length).
FULL_SHAPES = [
    ("sft", 1, 2048),
    ("sft", 4, 2048),
    ("sft", 8, 2048),
    ("sft", 2, 4096),
    ("sft", 4, 4096),
    ("sft", 1, 8192),
    ("dpo", 4, 1024),
    ("dpo", 8, 1024),
    ("dpo-packed", 8, 1024),
    ("dpo", 4, 2048),
]
SMOKE_SHAPES = [("sft", 2, 128), ("sft", 1, 256), ("dpo", 2, 128), ("dpo-packed", 2, 128)]


# --------------------------------------------------------------------------------------------------------------
# data: synthetic chat-like sequences (a prompt without labels, then a labelled response)


def synthetic_sequences(rng: np.random.Generator, n: int, max_len: int, vocab: int) -> list[dict]:
    """Lengths roughly like chat SFT data (lognormal, median ~ max_len/4), 30% prompt."""
    out = []
    for i in range(n):
        length = int(np.clip(rng.lognormal(math.log(max_len / 4), 0.8), 16, max_len))
        prompt = max(1, int(0.3 * length))
        ids = rng.integers(3, vocab, size=length).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "sample_id": str(i)})
    return out


def packed_batches(
    rng: np.random.Generator, rows: int, max_len: int, vocab: int, count: int
) -> list[list[dict]]:
    """``count`` batches of ``rows`` packed rows each (the fullest rows BFD makes from a pool of sequences)."""
    need = rows * count
    pool = synthetic_sequences(rng, max(64, 24 * need), max_len, vocab)
    packed = pack_sequences(pool, max_len)
    packed.sort(key=lambda r: -len(r["input_ids"]))  # full rows first, as in a long run's steady state
    packed = packed[:need]
    rng.shuffle(packed)
    return [packed[i * rows : (i + 1) * rows] for i in range(count)]


def _sum_n2(position_ids) -> int:
    """Sum of n^2 over the sequences of a row (each starts where position_ids is 0)."""
    pos = np.asarray(position_ids)
    lengths = np.diff(np.r_[np.flatnonzero(pos == 0), len(pos)]).astype(np.int64)
    return int((lengths**2).sum())


def _head_positions(labels, position_ids) -> int:
    """Positions whose next token is trained (where the LM head is needed)."""
    lab, pos = np.asarray(labels), np.asarray(position_ids)
    return int(((lab[1:] != IGNORE_INDEX) & (pos[1:] != 0)).sum())


def sft_batch(rows: list[dict], pad_id: int, device: torch.device) -> dict:
    b = collate(
        {k: [np.asarray(r[k]) for r in rows] for k in ("input_ids", "labels", "position_ids")}
        | {"sample_ids": [r["sample_ids"] for r in rows]},
        pad_id,
    )
    b["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
    b["sum_n2"] = sum(_sum_n2(r["position_ids"]) for r in rows)
    b["head_positions"] = sum(_head_positions(r["labels"], r["position_ids"]) for r in rows)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def dpo_batch(
    rng: np.random.Generator,
    pairs: int,
    max_len: int,
    vocab: int,
    pad_id: int,
    packing: bool,
    device: torch.device,
) -> dict:
    """``pairs`` pairs: a shared prompt, a chosen and a rejected response, each sequence <= ``max_len``."""
    raw: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "sample_ids": []}
    for i in range(pairs):
        prompt = int(rng.integers(max_len // 8, max_len // 3))
        raw["prompt_ids"].append(rng.integers(3, vocab, size=prompt).tolist())
        for side in ("chosen_ids", "rejected_ids"):
            raw[side].append(
                rng.integers(3, vocab, size=int(rng.integers(max_len // 8, max_len - prompt + 1))).tolist()
            )
        raw["sample_ids"].append([str(i)])
    b = collate_pairs(raw, pad_id, packing)
    lengths = [len(p) + len(c) for p, c in zip(raw["prompt_ids"], raw["chosen_ids"])]
    lengths += [len(p) + len(r) for p, r in zip(raw["prompt_ids"], raw["rejected_ids"])]
    b["sum_n2"] = sum(x * x for x in lengths)
    b["head_positions"] = sum(len(c) + len(r) for c, r in zip(raw["chosen_ids"], raw["rejected_ids"]))
    b["num_tokens"] = sum(lengths)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


# --------------------------------------------------------------------------------------------------------------
# steps


def _finish(model, opt, loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


LOSS_PATH = {"name": "label_logits (LM head on trained positions)"}


def sft_step(model, opt, batch: dict) -> torch.Tensor:
    """SFTObjective.loss: LM head on the trained positions only, mean NLL per trained token."""
    logits, targets, _ = losses.label_logits(model, batch)
    return _finish(model, opt, losses.token_nll_sum(logits, targets) / max(targets.numel(), 1))


def dpo_step(model, opt, batch: dict, beta: float = 0.1) -> torch.Tensor:
    n = batch["num_pairs"]
    logits, targets, keep = losses.label_logits(model, batch)
    logps, _, _ = losses.sequence_logps(logits, targets, batch["seq_index"][keep], 2 * n)
    ref = batch["ref_logps"]
    per_pair, _, _ = losses.preference_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta)
    return _finish(model, opt, per_pair.sum() / n)


# --------------------------------------------------------------------------------------------------------------
# measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, trials: int = 3, reps: int = 20) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    sync(device)
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync(device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
    del a, b
    return {
        "n": n,
        "dtype": str(dtype),
        "best_flops": max(rates),
        "median_flops": sorted(rates)[len(rates) // 2],
    }


def build_model(arch: dict, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        **arch, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does: RoPE's inv_freq stays fp32
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    model.config.use_cache = False
    model.train()
    return model


def time_shape(
    kind: str, rows: int, length: int, model, arch: dict, device, warmup: int, steps: int, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    count = warmup + steps
    pad_id = 2
    if kind == "sft":
        batches = [
            sft_batch(r, pad_id, device) for r in packed_batches(rng, rows, length, arch["vocab_size"], count)
        ]
    else:
        batches = [
            dpo_batch(rng, rows, length, arch["vocab_size"], pad_id, kind == "dpo-packed", device)
            for _ in range(count)
        ]
        with (
            torch.no_grad()
        ):  # reference log-probs = the starting policy's (precomputed, as dDPO does by default)
            for b in batches:
                logits, targets, keep = losses.label_logits(model, b)
                b["ref_logps"] = losses.sequence_logps(logits, targets, b["seq_index"][keep], 2 * rows)[0]
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        fused=device.type == "cuda",
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, loss_values = [], []
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        loss = sft_step(model, opt, batch) if kind == "sft" else dpo_step(model, opt, batch)
        sync(device)
        times.append(time.perf_counter() - t0)
        loss_values.append(float(loss))
    if not all(math.isfinite(x) for x in loss_values):
        raise RuntimeError(f"non-finite loss: {loss_values}")
    measured, tail = times[warmup:], batches[warmup:]
    tokens = sum(b["num_tokens"] for b in tail)
    out = {
        "kind": kind,
        "rows": int(batches[0]["input_ids"].shape[0]),
        "pairs": rows if kind != "sft" else None,
        "length": length,
        "padded_shape": list(batches[0]["input_ids"].shape),
        "steps": steps,
        "warmup": warmup,
        "tokens_per_step": tokens / len(tail),
        "step_time_s": sum(measured) / len(measured),
        "step_time_min_s": min(measured),
        "tokens_per_s": tokens / sum(measured),
        "attn_len_eff": sum(b["sum_n2"] for b in tail) / tokens,
        "head_fraction": sum(b["head_positions"] for b in tail) / tokens,
        "loss_first_last": [loss_values[0], loss_values[-1]],
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del opt, batches
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script end to end)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per shape (default 10; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per shape (default 3; smoke 1)")
    ap.add_argument(
        "--shapes", default=None, help="e.g. 'sft:4x2048,dpo:8x1024,dpo-packed:8x1024' (kind:N x length)"
    )
    ap.add_argument("--no-dpo", action="store_true")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    env = envelope("gpu_train_step", a.smoke)

    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        print(
            "WARNING: this transformers does not derive packed-sequence masks from position_ids; packed rows "
            "would attend across sequences (and time differently)",
            file=sys.stderr,
        )
    if HEAVY:
        print(
            f"WARNING: importing zephyr_ray.data.packing / zephyr_ray.train.losses pulled in {HEAVY}; "
            "this script must run where they are not installed",
            file=sys.stderr,
        )
    device = torch.device(a.device or ("cpu" if a.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --smoke to run the tiny CPU check")
    arch = SMOKE_ARCH if a.smoke else FULL_ARCH
    shapes = SMOKE_SHAPES if a.smoke else FULL_SHAPES
    if a.shapes:
        shapes = []
        for item in a.shapes.split(","):
            kind, dims = item.split(":")
            r, length = dims.lower().split("x")
            shapes.append((kind, int(r), int(length)))
    if a.no_dpo:
        shapes = [s for s in shapes if s[0] == "sft"]
    steps = a.steps if a.steps is not None else (3 if a.smoke else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    dtype = torch.bfloat16
    t_start = time.time()

    peak = matmul_peak(device, dtype, 512 if a.smoke else 8192, reps=5 if a.smoke else 20)
    t0 = time.time()
    model = build_model(arch, dtype, device, a.seed)
    build_s = time.time() - t0
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    body = total - model.get_input_embeddings().weight.numel() - head
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {dev_name}; bf16 matmul {peak['n']}^3: {peak['best_flops'] / 1e12:.2f} TFLOP/s (best); model "
        f"{_count(total)} params (body {_count(body)}, LM head {_count(head)}), built in {build_s:.1f}s; loss path: "
        f"{LOSS_PATH['name']}; pairs: {PAIRS_FROM}",
        flush=True,
    )

    results = []
    for kind, rows, length in shapes:
        seq_len = 2 * length if kind == "dpo-packed" else length
        if seq_len > arch["max_position_embeddings"]:
            results.append(
                {"kind": kind, "rows": rows, "length": length, "error": "longer than max positions"}
            )
            continue
        try:
            r = time_shape(kind, rows, length, model, arch, device, warmup, steps, a.seed)
        except torch.cuda.OutOfMemoryError as exc:
            r = {"kind": kind, "rows": rows, "length": length, "error": f"OOM: {str(exc).splitlines()[0]}"}
        except Exception as exc:  # keep the other shapes' numbers
            r = {"kind": kind, "rows": rows, "length": length, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "error" not in r:
            r["flops_per_token"] = (
                6 * body
                + 6 * head * r["head_fraction"]
                + 6 * arch["num_hidden_layers"] * arch["hidden_size"] * r["attn_len_eff"]
            )
            r["model_flops"] = r["flops_per_token"] * r["tokens_per_s"]
            r["mfu"] = r["model_flops"] / peak["best_flops"]
            print(
                f"  {kind} {rows}x{length}: {r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%",
                flush=True,
            )
        else:
            print(f"  {kind} {rows}x{length}: {r['error']}", flush=True)
        results.append(r)

    print()
    print(
        f"train step core, Mistral-shaped random init {_count(total)} params, bf16, SDPA, AdamW"
        f"{' (fused)' if device.type == 'cuda' else ''}, {warmup} warmup + {steps} timed steps per shape; "
        f"device {dev_name}; peak = measured bf16 matmul {peak['best_flops'] / 1e12:.2f} TFLOP/s"
    )
    hdr = (
        f"{'step':<11}{'shape':>10}{'rows x T':>11}{'tok/step':>10}{'step ms':>9}{'tokens/s':>11}{'TFLOP/s':>9}"
        f"{'MFU':>7}{'peak GiB':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        label = (
            f"{r['rows']}x{r['length']}"
            if r["kind"] == "sft"
            else f"{r.get('pairs') or r['rows']}p x{r['length']}"
        )
        if "error" in r:
            print(f"{r['kind']:<11}{label:>10}  {r['error']}")
            continue
        shape = "x".join(str(x) for x in r["padded_shape"])
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(
            f"{r['kind']:<11}{label:>10}{shape:>11}{r['tokens_per_step']:>10.0f}{1000 * r['step_time_s']:>9.1f}"
            f"{r['tokens_per_s']:>11.0f}{r['model_flops'] / 1e12:>9.2f}{100 * r['mfu']:>6.1f}%{mem:>10}"
        )
    print(
        "sft: N packed rows of T tokens (position_ids, no attention mask); dpo: N pairs of sequences <= T, 2N rows "
        "in one forward; dpo-packed: one row per pair. FLOPs/token = 6*N_body + 6*N_head*f + "
        "6*n_layers*d_model*sum(n_i^2)/sum(n_i)"
    )
    print(f"loss path: {LOSS_PATH['name']}; pair collation: {PAIRS_FROM}")

    payload = {
        "smoke": a.smoke,
        "device": dev_name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "heavy_modules_imported": HEAVY,
        "loss_path": LOSS_PATH["name"],
        "pair_collation": PAIRS_FROM,
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "arch": arch,
        "params_total": total,
        "params_body": body,
        "params_head": head,
        "matmul_peak": peak,
        "model_build_s": build_s,
        "elapsed_s": time.time() - t_start,
        "flops_formula": "6*N_body + 6*N_head*f + 6*n_layers*d_model*sum(n_i^2)/sum(n_i); f = fraction of tokens "
        "followed by a trained token",
        "results": results,
    }
    out = a.out or (
        Path(os.environ["OUT"]) / "gpu_train_step.json"
        if os.environ.get("OUT")
        else ROOT / "bench" / "results" / "gpu_train_step.json"
    )
    write_result(out, env, payload)


if __name__ == "__main__":
    main()
