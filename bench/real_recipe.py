"""Learning measured on real data: the recipe's stages on SmolLM2-135M-Instruct and AlpacaEval's ../shared files.

The three files of ``../shared/data/alpaca_eval`` hold the same 805 instructions: GPT-4's answers as dSFT
dialogues, GPT-4's pairwise judgements of zephyr-7b-beta vs text_davinci_003 as preference pairs, and every model's
answers. They are split once by prompt text (``zephyr_ray.data.split.held_out``, the stages' own held-out rule), so
(a), (b) and (c) are measured on the same held-out prompts and no prompt is on both sides:

(a) dSFT on GPT-4-teacher dialogues: held-out per-token NLL of GPT-4's answers, before and after;
(b) dDPO from (a)'s model on GPT-4-judged pairs: held-out preference accuracy of the implicit reward (Wilson 95%
    interval), next to the reference's own log-prob preference (summed and per token), overall and on the pairs
    where GPT-4 preferred text_davinci_003;
(c) AlpacaEval-style win rate of dDPO over dSFT (the reference) on the held-out instructions, judged by
    SmolLM2-135M-Instruct in ``expected`` mode, with its standard error.

Training runs through the project's stages (run_sft, run_dpo) on a local Ray cluster started here; (a) and (b)
are scored in this process with the project's tokenization, collation and log-prob functions, so every prompt and
pair has its own value. Run on its own (``make bench-real``); ``--quick`` is a few-minute smoke run. Nothing from
../shared is written into the repository: the split files live in the (temporary) work folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    SHARED_DATA_DIR,
    TreeSampler,
    cpu_model,
    finish_session,
    read_jsonl,
    start_local_ray,
    start_session,
)

FILES = {"sft": "sft_gpt4_teacher.jsonl", "pairs": "gpt4_preferences.jsonl", "instructions": "completions.jsonl"}
MODEL = "smollm2-135m-instruct"
DAVINCI = "text_davinci_003"
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Sizes:
    """Everything the figures depend on, recorded with them."""

    split_seed: int = 0
    # share of prompts held out: 0.26 with seed 0 holds out 207 of the 805 prompts (206 of the 802 pairs)
    held_out_fraction: float = 0.26
    min_held_out: int = 200
    # None: every held-out prompt (the full run); a number: the first ones (--quick)
    eval_limit: int | None = None
    sft_train: int = 96  # dialogues (training side, seeded sample)
    # pairs (training side, seeded sample): 32 steps of 16, fits 40 minutes on 2 cores (31 min quiet). Held-out
    # accuracy stays at 0.85-0.88 from 96 to 512 pairs, at 160 or 320 tokens, lr 1e-5 to 1e-4, beta 0.1 or 0.5,
    # with or without rpo_alpha, apo_zero, LoRA, length-normalised (0.893 by its own per-token reward) (docs/learning.md):
    # the misses are mostly davinci-preferred and length-mismatched pairs, the same ones in every setting
    dpo_train: int = 512
    max_length: int = 160  # tokens of a dialogue, in dSFT training and in (a)
    dpo_max_length: int = 160  # tokens of prompt + answer, in dDPO training and in (b)
    max_prompt_length: int = 64  # pairs: prompt tokens kept (from the left)
    sft_lora: bool = True
    sft_lr: float = 2e-4
    sft_micro_batch: int = 2
    # LoRA r=16 at lr 2e-4: 181/206 held out after 256 pairs, 178 after 512; full fine-tuning at 3e-5: 179 after 256 or
    # 512 in 5 minutes more (its log-probs of held-out answers drift down more); LoRA at lr 5e-4: 180 after 256
    dpo_lora: bool = True
    dpo_lr: float = 2e-4
    dpo_micro_batch: int = 4
    dpo_accumulation: int = 2
    beta: float = 0.1
    rpo_alpha: float = 0.0  # weight of the chosen answer's per-token NLL beside the DPO loss (dpo.rpo_alpha)
    length_normalize: bool = False  # dpo.length_normalize: the reward is β × the log-ratio per answer token
    answer_tokens: int = 48  # (c): max_new_tokens of the dSFT and dDPO answers
    score_tokens: int = 2048  # tokens per forward pass of the in-process scorers
    # The stages also evaluate the held-out rows at their last step (data.eval_path): eval_loss and
    # eval_rewards/* must match the in-process figures. Off at full size: a second pass over every held-out
    # dialogue and pair (and a second reference pass) on 2 cores.
    stage_eval: bool = False


FULL = Sizes()
QUICK = dataclasses.replace(FULL, eval_limit=12, sft_train=8, dpo_train=16, dpo_micro_batch=2, answer_tokens=16,
                            stage_eval=True)


# --------------------------------------------------------------------------------------------------------------
# pure parts: the split and the statistics


@dataclass
class Split:
    """The three files' rows on each side of one split by prompt text."""

    held_out_prompts: list[str]  # normalised prompt texts, in completions.jsonl order
    train: dict[str, list[dict]]
    held_out: dict[str, list[dict]]


def split_shared(rows: dict[str, list[dict]], seed: int, fraction: float) -> Split:
    """Every file's rows by ``held_out(prompt_text(row))``; the files must name the same prompts (pairs may miss a
    few), so the held-out prompts are the same in all three."""
    from zephyr_ray.data.split import held_out, normalize, prompt_text

    train: dict[str, list[dict]] = {}
    held: dict[str, list[dict]] = {}
    prompts: dict[str, list[str]] = {}
    for name, file_rows in rows.items():
        train[name], held[name], prompts[name] = [], [], []
        for row in file_rows:
            text = prompt_text(row)
            if text is None:
                raise ValueError(f"{FILES[name]}: a row without a prompt: {str(row)[:80]}")
            side = held_out(text, seed, fraction)
            (held if side else train)[name].append(row)
            if side:
                prompts[name].append(normalize(text))
    base = prompts["instructions"]
    if set(prompts["sft"]) != set(base) or not set(prompts["pairs"]) <= set(base):
        raise ValueError("the ../shared files hold different held-out prompts")
    return Split(base, train, held)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n: stays inside [0, 1] and keeps its coverage near 0 or 1 and at
    small n, where the normal interval does not (it would claim ±0 at 64/64)."""
    if n <= 0:
        raise ValueError("no trials")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


def proportion(hits: Sequence[bool]) -> dict[str, Any]:
    """Share of true values with its Wilson 95% interval."""
    n, k = len(hits), sum(bool(h) for h in hits)
    if n == 0:
        return {"n": 0, "k": 0, "rate": None, "ci95": None}
    lo, hi = wilson_interval(k, n)
    return {"n": n, "k": k, "rate": k / n, "ci95": [lo, hi]}


def mean_se(values: Sequence[float]) -> dict[str, float | None]:
    from zephyr_ray.eval.pairwise import standard_error

    return {"n": len(values), "mean": sum(values) / len(values) if values else None,
            "standard_error": standard_error(values)}


def preference_figures(c: dict[str, list[float]], chosen_models: Sequence[str], beta: float,
                       length_normalize: bool = False) -> dict[str, Any]:
    """Per-pair summed log-probs and lengths of policy (``policy_*``) and reference (``ref_*``) → the implicit
    reward's accuracy (summed as DPO and TRL define it, and per answer token) and the reference's own log-prob
    preference (summed, per token), overall, by who won and by which answer is longer. ``length_normalize``: the
    policy was trained on the per-token reward (``dpo.length_normalize``), so that is its implicit reward: the
    reward margin is β × the per-token one and ``trained_reward`` names the per-token measure."""
    n = len(chosen_models)
    # each model's log-prob per answer token, each side (every answer has a token at least: its EOS)
    per_token = {f"{who}_{side}": [c[f"{who}_{side}"][i] / c[f"{side}_tokens"][i] for i in range(n)]
                 for who in ("policy", "ref") for side in ("chosen", "rejected")}
    # policy minus reference log-prob per answer token, each side: the drift the summed reward adds up
    drift = {side: [per_token[f"policy_{side}"][i] - per_token[f"ref_{side}"][i] for i in range(n)]
             for side in ("chosen", "rejected")}
    summed = [(c["policy_chosen"][i] - c["ref_chosen"][i]) - (c["policy_rejected"][i] - c["ref_rejected"][i])
              for i in range(n)]
    margin = [beta * (drift["chosen"][i] - drift["rejected"][i] if length_normalize else summed[i]) for i in range(n)]

    def prefers_chosen(chosen: Sequence[float], rejected: Sequence[float]) -> list[bool]:
        return [x > y for x, y in zip(chosen, rejected)]

    measures = {
        "implicit_reward": [m > 0 for m in summed],
        "implicit_reward_per_token": prefers_chosen(drift["chosen"], drift["rejected"]),
        "reference_logp_summed": prefers_chosen(c["ref_chosen"], c["ref_rejected"]),
        "reference_logp_per_token": prefers_chosen(per_token["ref_chosen"], per_token["ref_rejected"]),
        "policy_logp_per_token": prefers_chosen(per_token["policy_chosen"], per_token["policy_rejected"]),
    }
    longer = [c["chosen_tokens"][i] - c["rejected_tokens"][i] for i in range(n)]
    subsets = {"all": range(n), f"{DAVINCI}_preferred": [i for i in range(n) if chosen_models[i] == DAVINCI],
               "zephyr-7b-beta_preferred": [i for i in range(n) if chosen_models[i] != DAVINCI],
               # by scored length: the implicit reward is a sum over tokens, so a policy that lowers every answer's
               # log-probs (DPO's usual drift) counts against the longer answer
               "chosen_longer": [i for i in range(n) if longer[i] > 0],
               "same_length": [i for i in range(n) if longer[i] == 0],
               "chosen_shorter": [i for i in range(n) if longer[i] < 0]}
    out: dict[str, Any] = {"trained_reward": "implicit_reward_per_token" if length_normalize else "implicit_reward"}
    for subset, idx in subsets.items():
        out[subset] = {name: proportion([hits[i] for i in idx]) for name, hits in measures.items()}
        out[subset]["reward_margin"] = mean_se([margin[i] for i in idx])
        out[subset]["logp_change_per_token"] = {side: mean_se([d[i] for i in idx]) for side, d in drift.items()}
    return out


# --------------------------------------------------------------------------------------------------------------
# in-process scorers (the project's tokenization, collation and log-prob functions)


def _token_batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices grouped so each group's total length stays within ``budget`` (one item at least)."""
    group, total = [], 0
    for i, n in enumerate(lengths):
        if group and total + n > budget:
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


def dialogue_nll(model: Any, tokenizer: Any, dialogues: Sequence[dict], max_length: int, budget: int
                 ) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of the assistant tokens of each dialogue, cut to ``max_length`` as dSFT cuts them;
    several dialogues per forward pass, packed in one row (restarting ``position_ids`` keep them apart)."""
    import torch

    from zephyr_ray.data.packing import collate
    from zephyr_ray.data.tokenize import tokenize_messages
    from zephyr_ray.train.losses import label_logits, sequence_logps

    toks = [tokenize_messages(tokenizer, d["messages"], max_length) for d in dialogues]
    out: list[tuple[float, int]] = []
    for group in _token_batches([len(t["input_ids"]) for t in toks], budget):
        row: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq": []}
        for j, i in enumerate(group):
            ids = toks[i]["input_ids"]
            row["input_ids"] += ids
            row["labels"] += toks[i]["labels"]
            row["position_ids"] += range(len(ids))
            row["seq"] += [j] * len(ids)
        batch = collate({"input_ids": [row["input_ids"]], "labels": [row["labels"]],
                         "position_ids": [row["position_ids"]], "sample_ids": [[]]}, tokenizer.pad_token_id)
        with torch.no_grad():
            logits, targets, keep = label_logits(model, batch)
            seq = torch.full_like(batch["input_ids"], -1)  # collate may pad the row
            seq[0, : len(row["seq"])] = torch.tensor(row["seq"])
            seq = seq[keep]
            logps, counts, _ = sequence_logps(logits, targets, seq, len(group))
        out += [(-float(lp), int(c)) for lp, c in zip(logps, counts)]
    return out


def pair_logps(model: Any, tokenizer: Any, pairs: Sequence[dict], max_length: int, max_prompt_length: int,
               budget: int) -> dict[str, list[float]]:
    """Summed log-probs of each pair's chosen and rejected answer and their lengths, tokenized and cut as dDPO
    does (``data.preference``) and scored by dDPO's own ``collate_pairs`` + ``forward_logps``."""
    import torch

    from zephyr_ray.attention import trains_one_row
    from zephyr_ray.data.preference import tokenize_pair, truncate_pair, validate_pair
    from zephyr_ray.train.objectives import collate_pairs, forward_logps

    ids = [truncate_pair(tokenize_pair(tokenizer, validate_pair(p)), max_length, max_prompt_length)[0] for p in pairs]
    one_row = trains_one_row(model, True)
    out: dict[str, list[float]] = {k: [] for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    sizes = [2 * len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in ids]
    for group in _token_batches(sizes, budget):
        cols = {k: [ids[i][k] for i in group] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        batch = collate_pairs({**cols, "sample_ids": [[] for _ in group]}, tokenizer.pad_token_id, True, one_row)
        with torch.no_grad():
            logps, counts, _ = forward_logps(model, batch)
        n = len(group)
        out["chosen"] += logps[:n].tolist()
        out["rejected"] += logps[n:].tolist()
        out["chosen_tokens"] += counts[:n].tolist()
        out["rejected_tokens"] += counts[n:].tolist()
    return out


def nll_figures(before: Sequence[tuple[float, int]], after: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Token-weighted held-out NLL before and after, and the per-prompt change (each prompt's per-token NLL; a
    prompt that fills max_length by itself has no answer token to score)."""
    def per_token(values: Sequence[tuple[float, int]]) -> float:
        return sum(s for s, _ in values) / sum(n for _, n in values)

    drops = [b[0] / b[1] - a[0] / a[1] for b, a in zip(before, after) if b[1]]
    return {"prompts": len(before), "prompts_without_answer_tokens": sum(not n for _, n in before),
            "tokens": sum(n for _, n in before), "nll_before": per_token(before),
            "nll_after": per_token(after), "perplexity_before": math.exp(per_token(before)),
            "perplexity_after": math.exp(per_token(after)), "per_prompt_drop": mean_se(drops),
            "prompts_lower_after": proportion([d > 0 for d in drops])}


# --------------------------------------------------------------------------------------------------------------
# configs: the smollm2 recipes plus the bench's overrides (every value the figures depend on is set here)


def recipe(name: str, overlay: dict[str, Any], schema: type, work: Path) -> Any:
    """``configs/smollm2/<name>.yaml`` merged with ``overlay`` (lists replaced), written to the work folder and
    loaded (validated) by the project's ``load_config``."""
    from omegaconf import OmegaConf

    from zephyr_ray.config import load_config

    merged = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "smollm2" / f"{name}.yaml"), overlay)
    path = work / f"{name}.yaml"
    OmegaConf.save(merged, path)
    return load_config(path, schema=schema)


def lora(enabled: bool, dropout: float) -> dict[str, Any]:
    return {"enabled": enabled, "r": 16, "alpha": 32, "dropout": dropout}


def held_out_eval(eval_path: Path | None) -> dict[str, Any]:
    """The stage's own held-out evaluation at its last step only, or none."""
    return {"eval_path": str(eval_path) if eval_path else None, "eval_fraction": 0.0}


def sft_overlay(s: Sizes, data: Path, out: Path, eval_path: Path | None) -> dict[str, Any]:
    return {"model": {"path": MODEL, "lora": lora(s.sft_lora, 0.05)},
            "data": {"path": str(data), "limit": None, "max_length": s.max_length, "packing": True,
                     "pack_window": 128, "shuffle": True, "seed": 0, "overlong": "truncate",
                     **held_out_eval(eval_path)},
            "train": {"epochs": 1, "micro_batch_size": s.sft_micro_batch, "gradient_accumulation_steps": 1,
                      "lr": s.sft_lr, "warmup_ratio": 0.1, "precision": "fp32", "checkpoint_every": 10_000,
                      "eval_every": 10_000},
            "run": {"name": "real-sft", "output_dir": str(out)}, "wandb": {"enabled": False}}


def dpo_overlay(s: Sizes, model: Path, data: Path, out: Path, eval_path: Path | None) -> dict[str, Any]:
    return {"model": {"path": str(model), "lora": lora(s.dpo_lora, 0.0)},
            "data": {"path": str(data), "limit": None, "max_length": s.dpo_max_length, "packing": True,
                     "pack_window": 64, "shuffle": True, "seed": 0, "overlong": "truncate",
                     **held_out_eval(eval_path)},
            "train": {"epochs": 1, "micro_batch_size": s.dpo_micro_batch,
                      # No warmup: with 8 steps, a 10% warmup spends the first step at lr 0.
                      "gradient_accumulation_steps": s.dpo_accumulation, "lr": s.dpo_lr, "warmup_ratio": 0.0,
                      "precision": "fp32", "checkpoint_every": 10_000, "eval_every": 10_000},
            "dpo": {"beta": s.beta, "loss_type": "sigmoid", "rpo_alpha": s.rpo_alpha, "length_normalize": s.length_normalize,
                    "max_prompt_length": s.max_prompt_length,
                    "ref": {"mode": "precompute", "path": None}},
            "run": {"name": "real-dpo", "output_dir": str(out)}, "wandb": {"enabled": False}}


def engine(name: str, path: Path | str, batch_size: int = 16) -> dict[str, Any]:
    return {"name": name, "backend": "transformers", "path": str(path), "batch_size": batch_size,
            "rows_per_task": 64, "max_prompt_length": 1024, "num_cpus_per_actor": 1, "threads_per_actor": 2}


def eval_overlay(s: Sizes, dpo_model: Path, sft_model: Path, instructions: Path, out: Path) -> dict[str, Any]:
    return {"models": [engine("ddpo", dpo_model, 32)],
            "judge": {"engine": {**engine("smollm2-judge", MODEL), "max_prompt_length": 2048},
                      "prompts": str(ROOT / "data" / "sample" / "mt_bench" / "judge_prompts.jsonl"), "mode": "expected"},
            "mt_bench": {"enabled": False},
            "alpaca_eval": {"instructions": str(instructions), "limit": None, "generate": True,
                            "reference": engine("dsft", sft_model, 32), "reference_model": None,
                            "sampling": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": s.answer_tokens,
                                         "seed": 0},
                            "agreement": None},
            "run": {"name": "real-eval", "output_dir": str(out)}, "wandb": {"enabled": False}}


# --------------------------------------------------------------------------------------------------------------
# the run


class Phases:
    """Wall time of each phase, the CPU time this process and everything it started (the Ray cluster) spent in
    it, and the cores the rest of the machine used meanwhile: on a shared machine, wall time alone says little."""

    def __init__(self) -> None:
        self.times: dict[str, dict[str, Any]] = {}
        self.sampler = TreeSampler(os.getpid(), period=2.0, pss_period=1e12)  # CPU of the tree, every 2 s
        self.sampler.start()

    def _now(self) -> tuple[float, float, float]:
        """(unix time, machine busy CPU-s, tree CPU-s) of the latest sample."""
        while not self.sampler.series:
            time.sleep(0.1)
        t, busy, tree, _ = self.sampler.series[-1]
        return t, busy, tree

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"[real] {name} ...", flush=True)
        t0, (s0, busy0, tree0) = time.time(), self._now()
        yield
        time.sleep(2.5)  # one more sample inside the phase's end
        wall, (s1, busy1, tree1) = time.time() - t0, self._now()
        own, span = tree1 - tree0, max(s1 - s0, 1e-9)
        self.times[name] = {"wall_s": round(wall, 1), "cpu_s": round(own, 1), "own_cores": round(own / span, 2),
                            "others_cores": round(max(0.0, (busy1 - busy0) - own) / span, 2),
                            "loadavg_1m_end": round(os.getloadavg()[0], 2)}
        t = self.times[name]
        print(f"[real] {name}: {wall:.0f}s, {own:.0f} CPU-s ({t['own_cores']:.2f} cores; others used "
              f"{t['others_cores']:.2f}; load average {os.getloadavg()[0]:.1f})", flush=True)

    def totals(self) -> dict[str, float]:
        cpu = sum(t["cpu_s"] for t in self.times.values())
        wall = sum(t["wall_s"] for t in self.times.values())
        others = sum(t["others_cores"] * t["wall_s"] for t in self.times.values()) / max(wall, 1e-9)
        return {"cpu_s": round(cpu, 1), "others_cores_mean": round(others, 2)}


def sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    import random

    return random.Random(seed).sample(rows, min(n, len(rows)))


def load_scorer(path: str) -> tuple[Any, Any]:
    import torch

    from zephyr_ray.models import load_model, load_tokenizer

    torch.set_num_threads(2)
    return load_model(path).eval(), load_tokenizer(path)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "deepspeed", "peft", "omegaconf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def stage_data(out: Path) -> dict[str, Any]:
    """What the stage trained on (its data_report.json): rows read, used, skipped, truncated, tokens."""
    report = json.loads((out / "data_report.json").read_text())
    return {k: report.get(k) for k in ("rows", "used", "skipped", "truncated", "tokens", "label_tokens",
                                       "dropped_by_equal_split", "total_steps")}


def check_close(what: str, ours: float, stage: float, tol: float = 2e-3) -> None:
    """The in-process figure against the stage's own held-out evaluation of the same rows and model."""
    if abs(ours - stage) > tol:
        raise RuntimeError(f"{what}: in-process {ours:.6f} but the stage's held-out evaluation gave {stage:.6f}")
    print(f"[real] {what}: in-process {ours:.6f} = stage eval {stage:.6f}", flush=True)


def overridden(s: Sizes, assignments: Sequence[str]) -> Sizes:
    """``s`` with ``name=value`` assignments (``--set``), read and checked as a recipe's overrides are."""
    from zephyr_ray.config import ConfigError, load_config

    try:
        return load_config(None, list(assignments), s)
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None


def run(a: argparse.Namespace) -> None:
    s = overridden(QUICK if a.quick else FULL, a.set)
    session = start_session(a.work_dir, "real_recipe_", "quick" if a.quick else "full size", quick=a.quick)
    work, phases = session.work, Phases()
    # Ray's processes (started below) import the snapshot too.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(session.src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["WANDB_MODE"] = "disabled"
    os.chdir(work)  # Ray puts the driver's working directory first on its workers' path: not the checkout
    load_start = os.getloadavg()

    from zephyr_ray.config import DPORecipe, EvalRecipe, SFTRecipe
    from zephyr_ray.data.io import write_jsonl
    from zephyr_ray.eval.run import run_eval
    from zephyr_ray.gguf_import import resolve
    from zephyr_ray.train.dpo import run_dpo
    from zephyr_ray.train.sft import run_sft

    figures: dict[str, Any] = {}
    with phases("data"):
        rows = {k: read_jsonl(a.shared / f) for k, f in FILES.items()}
        split = split_shared(rows, s.split_seed, s.held_out_fraction)
        if len(split.held_out_prompts) < s.min_held_out or len(split.held_out["pairs"]) < s.min_held_out:
            raise SystemExit(f"only {len(split.held_out_prompts)} prompts / {len(split.held_out['pairs'])} pairs "
                             f"held out; need {s.min_held_out}")
        # The same held-out prompts for (a), (b), (c): the first eval_limit of completions.jsonl's order.
        keep = set(split.held_out_prompts[: s.eval_limit] if s.eval_limit else split.held_out_prompts)
        from zephyr_ray.data.split import normalize, prompt_text

        def kept(name: str) -> list[dict]:
            return [r for r in split.held_out[name] if normalize(prompt_text(r)) in keep]

        held = {name: kept(name) for name in FILES}
        sft_train = write_jsonl(sample(split.train["sft"], s.sft_train, 1), work / "data" / "sft_train.jsonl")
        pairs_train = write_jsonl(sample(split.train["pairs"], s.dpo_train, 2), work / "data" / "pairs_train.jsonl")
        held_sft = write_jsonl(held["sft"], work / "data" / "sft_held_out.jsonl") if s.stage_eval else None
        held_pairs = write_jsonl(held["pairs"], work / "data" / "pairs_held_out.jsonl") if s.stage_eval else None
        instructions = write_jsonl([{"prompt_id": r["prompt_id"], "prompt": r["prompt"]} for r in held["instructions"]],
                                   work / "data" / "instructions_held_out.jsonl")
        figures["split"] = {
            "seed": s.split_seed, "fraction": s.held_out_fraction, "prompts": len(split.held_out_prompts) +
            len(split.train["instructions"]), "held_out_prompts": len(split.held_out_prompts),
            "held_out_pairs": len(split.held_out["pairs"]),
            "held_out_pairs_davinci_preferred": sum(r["chosen_model"] == DAVINCI for r in split.held_out["pairs"]),
            "evaluated_prompts": len(held["instructions"]), "evaluated_dialogues": len(held["sft"]),
            "evaluated_pairs": len(held["pairs"]),
            "evaluated_pairs_davinci_preferred": sum(r["chosen_model"] == DAVINCI for r in held["pairs"]),
            "train_side": {k: len(v) for k, v in split.train.items()},
            "trained_dialogues": s.sft_train, "trained_pairs": s.dpo_train,
            "trained_pairs_davinci_preferred": sum(r["chosen_model"] == DAVINCI for r in read_jsonl(pairs_train))}
        print(f"[real] split: {json.dumps(figures['split'])}", flush=True)

    with phases("(a) held-out NLL before dSFT"):
        base = resolve(MODEL)
        model, tok = load_scorer(base)
        nll_before = dialogue_nll(model, tok, held["sft"], s.max_length, s.score_tokens)
        del model
        gc.collect()

    with phases("ray start"):
        start_local_ray(session.src)

    with phases("dSFT (run_sft)"):
        sft_cfg = recipe("sft", sft_overlay(s, sft_train, work / "sft", held_sft), SFTRecipe, work)
        sft = run_sft(sft_cfg)
    with phases("(a) NLL after dSFT + (b) reference log-probs"):
        model, tok = load_scorer(str(sft.model_dir))
        nll_after = dialogue_nll(model, tok, held["sft"], s.max_length, s.score_tokens)
        ref = pair_logps(model, tok, held["pairs"], s.dpo_max_length, s.max_prompt_length, s.score_tokens)
        del model
        gc.collect()
    figures["a_sft"] = {**nll_figures(nll_before, nll_after), "train_steps": sft.steps,
                        "train_loss_last": sft.final_metrics.get("loss"), "train_data": stage_data(sft.output_dir)}
    if s.stage_eval:
        figures["a_sft"]["stage_eval_loss"] = sft.final_metrics["eval_loss"]
        check_close("(a) NLL after", figures["a_sft"]["nll_after"], sft.final_metrics["eval_loss"])

    with phases("dDPO (run_dpo)"):
        dpo_cfg = recipe("dpo", dpo_overlay(s, sft.model_dir, pairs_train, work / "dpo", held_pairs), DPORecipe, work)
        dpo = run_dpo(dpo_cfg)
    with phases("(b) policy log-probs"):
        model, tok = load_scorer(str(dpo.model_dir))
        pol = pair_logps(model, tok, held["pairs"], s.dpo_max_length, s.max_prompt_length, s.score_tokens)
        del model
        gc.collect()
    per_pair = {"ref_chosen": ref["chosen"], "ref_rejected": ref["rejected"], "policy_chosen": pol["chosen"],
                "policy_rejected": pol["rejected"], "chosen_tokens": ref["chosen_tokens"],
                "rejected_tokens": ref["rejected_tokens"]}
    figures["b_dpo"] = {**preference_figures(per_pair, [r["chosen_model"] for r in held["pairs"]], s.beta,
                                             s.length_normalize),
                        "train_steps": dpo.steps, "train_data": stage_data(dpo.output_dir),
                        "train_last": {k: v for k, v in dpo.final_metrics.items()
                                       if k.startswith(("loss", "rewards/"))}}
    if s.stage_eval:
        stage = {k: dpo.final_metrics[f"eval_rewards/{k}"] for k in ("accuracies", "margins")}
        figures["b_dpo"]["stage_eval"] = stage
        trained = figures["b_dpo"]["trained_reward"]
        check_close("(b) accuracy", figures["b_dpo"]["all"][trained]["rate"], stage["accuracies"])
        check_close("(b) reward margin", figures["b_dpo"]["all"]["reward_margin"]["mean"], stage["margins"])

    with phases("(c) win rate dDPO vs dSFT (run_eval)"):
        eval_cfg = recipe("eval", eval_overlay(s, dpo.model_dir, sft.model_dir, instructions, work / "eval"),
                          EvalRecipe, work)
        ev = run_eval(eval_cfg)
    al = ev.results["alpaca_eval"]["models"]["ddpo"]
    figures["c_win_rate"] = {k: al[k] for k in ("instructions", "judged", "win_rate", "standard_error", "wins",
                                                 "ties", "losses", "position_consistency", "first_position_rate",
                                                 "mean_tokens", "reference_mean_tokens", "parse_failures")}
    figures["c_win_rate"]["timings"] = ev.results["timings"]  # generation and judging seconds, inside the phase

    import ray

    ray.shutdown()
    elapsed = time.time() - session.env["when_unix"]
    machine = {"cores": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    write_jsonl([{"prompt_id": r["prompt_id"], "chosen_model": r["chosen_model"],
                  **{k: v[i] for k, v in per_pair.items()}} for i, r in enumerate(held["pairs"])],
                work / "per_pair.jsonl")
    payload = {"git_commit": session.code["git_head"], "quick": a.quick, "machine": machine, "versions": versions(),
               "sizes": dataclasses.asdict(s), "model": MODEL,
               "choices": {"sft": "LoRA r=16" if s.sft_lora else "full", "dpo": "LoRA r=16" if s.dpo_lora else "full",
                           "interval": "Wilson score, 95%", "win_rate_se": "sample SD over instructions / sqrt(n)"},
               "figures": figures, "phases": phases.times, "wall_s": round(elapsed, 1), **phases.totals(),
               "table": learning_table(figures, elapsed)}
    print_table(payload)
    finish_session(session, payload, a.out)


# The issue's goals for the full run: (b)'s accuracy by the trained loss's own implicit reward, and the wall time.
GOAL_ACCURACY = 0.90
GOAL_WALL_MIN = 40.0
TABLE_COLUMNS = [("figure", "figure", ""), ("value", "value", ""), ("interval", "95% interval / SE", ""),
                 ("goal", "goal", "")]


def share(p: dict[str, Any]) -> dict[str, str]:
    """A ``proportion`` as a table's value and interval cells."""
    if p["rate"] is None:
        return {"value": "-", "interval": "-"}
    return {"value": f"{p['rate']:.3f} ({p['k']}/{p['n']})", "interval": f"[{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"}


def learning_table(figures: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The run's figures as the generic ``table`` that bench/report.py renders into docs/benchmarks.md."""
    a, b, c = figures["a_sft"], figures["b_dpo"], figures["c_win_rate"]

    def met(ok: bool, goal: str) -> str:
        return f"{goal}: {'met' if ok else 'not met'}"

    trained = b["trained_reward"]
    reward = {"implicit_reward": "summed", "implicit_reward_per_token": "per answer token"}[trained]
    rows = [{"figure": "(a) held-out NLL/token of GPT-4's answers, before -> after dSFT",
             "value": f"{a['nll_before']:.3f} -> {a['nll_after']:.3f} ({a['tokens']} tokens)", "interval": "",
             "goal": met(a["nll_after"] < a["nll_before"], "lower")},
            {"figure": "(a) prompts whose NLL fell", **share(a["prompts_lower_after"]), "goal": ""}]
    accuracy = b["all"][trained]
    rows.append({"figure": f"(b) held-out preference accuracy, the trained loss's implicit reward ({reward})",
                 **share(accuracy),
                 "goal": met(accuracy["rate"] is not None and accuracy["rate"] >= GOAL_ACCURACY, f">= {GOAL_ACCURACY}")})
    for name, subset, measure in [
            (f"(b) the same, pairs where GPT-4 preferred {DAVINCI}", f"{DAVINCI}_preferred", trained),
            ("(b) the same, pairs where GPT-4 preferred zephyr-7b-beta", "zephyr-7b-beta_preferred", trained),
            ("(b) implicit reward, summed", "all", "implicit_reward"),
            ("(b) implicit reward, per answer token", "all", "implicit_reward_per_token"),
            ("(b) the reference's own log-prob preference, summed", "all", "reference_logp_summed"),
            ("(b) the reference's own log-prob preference, per token", "all", "reference_logp_per_token")]:
        if measure == trained and subset == "all":
            continue
        rows.append({"figure": name, **share(b[subset][measure]), "goal": ""})
    wr, se = c["win_rate"], c["standard_error"]
    rows.append({"figure": f"(c) win rate dDPO vs dSFT, {c['judged']} instructions (W/T/L {c['wins']}/{c['ties']}/"
                           f"{c['losses']})", "value": "-" if wr is None else f"{wr:.3f}",
                 "interval": "-" if se is None else f"± {se:.3f} (SE)", "goal": ""})
    rows.append({"figure": "wall time (min)", "value": f"{wall_s / 60:.1f}", "interval": "",
                 "goal": met(wall_s / 60 <= GOAL_WALL_MIN, f"<= {GOAL_WALL_MIN:.0f}")})
    return {"columns": TABLE_COLUMNS, "rows": rows}


def _pct(p: dict[str, Any]) -> str:
    """A ``proportion`` on one console line: ``share``'s cells joined."""
    return "-" if p["rate"] is None else " ".join(share(p).values())


def print_table(r: dict[str, Any]) -> None:
    f = r["figures"]
    a, b, c = f["a_sft"], f["b_dpo"], f["c_win_rate"]
    print(f"\n== Learning on real data: {r['model']}, {f['split']['evaluated_prompts']} held-out prompts "
          f"(split seed {f['split']['seed']}, fraction {f['split']['fraction']}) ==")
    print(f"(a) dSFT on {f['split']['trained_dialogues']} GPT-4 dialogues ({r['choices']['sft']}, {a['train_steps']} "
          f"steps): held-out NLL/token of GPT-4's answers {a['nll_before']:.4f} -> {a['nll_after']:.4f} "
          f"({a['tokens']} tokens); lower on {_pct(a['prompts_lower_after'])} of prompts")
    z = r["sizes"]
    print(f"(b) dDPO on {f['split']['trained_pairs']} pairs ({r['choices']['dpo']}, {b['train_steps']} steps, beta "
          f"{z['beta']}, lr {z['dpo_lr']}, RPO alpha {z['rpo_alpha']}, length-normalised {z['length_normalize']}), "
          f"preference accuracy [Wilson 95%]; the trained loss's implicit reward is {b['trained_reward']}:")
    print(f"    {'subset':<34}{'implicit reward summed':<32}{'ref log-prob summed':<32}{'ref log-prob per token':<32}"
          f"{'implicit reward per token':<32}")
    for subset in ("all", f"{DAVINCI}_preferred", "zephyr-7b-beta_preferred", "chosen_longer", "same_length",
                   "chosen_shorter"):
        x = b[subset]
        print(f"    {subset:<34}{_pct(x['implicit_reward']):<32}{_pct(x['reference_logp_summed']):<32}"
              f"{_pct(x['reference_logp_per_token']):<32}{_pct(x['implicit_reward_per_token']):<32}")
    change = b["all"]["logp_change_per_token"]
    print(f"    policy - reference log-prob per answer token: chosen {change['chosen']['mean']:+.3f}, rejected "
          f"{change['rejected']['mean']:+.3f}")
    wr, se = c["win_rate"], c["standard_error"]
    print(f"(c) win rate dDPO vs dSFT on {c['judged']}/{c['instructions']} held-out instructions (judge "
          f"{MODEL}, expected mode): {'-' if wr is None else f'{wr:.3f}'} ± "
          f"{'-' if se is None else f'{se:.3f}'} (SE); W/T/L {c['wins']}/{c['ties']}/{c['losses']}")
    print("phases (wall, CPU-s of this run): " + ", ".join(f"{k} {v['wall_s']:.0f}s/{v['cpu_s']:.0f}"
                                                            for k, v in r["phases"].items()))
    print(f"wall {r['wall_s']:.0f}s on {r['machine']['cores']} cores ({r['machine']['cpu_model']}), {r['cpu_s']:.0f} "
          f"CPU-s used by this run; other processes used {r['others_cores_mean']:.2f} cores on average; load "
          f"average start {r['machine']['loadavg_start'][0]:.1f}, end {r['machine']['loadavg_end'][0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run (tiny training sets, 12 prompts)")
    ap.add_argument("--shared", type=Path, default=SHARED_DATA_DIR, help="the alpaca_eval folder of ../shared/data")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/real_recipe[_quick].json")
    ap.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override one of the Sizes (recorded in the result), e.g. --set dpo_train=512")
    a = ap.parse_args()
    if a.out is None:
        a.out = ROOT / "bench" / "results" / ("real_recipe_quick.json" if a.quick else "real_recipe.json")
    if not all((a.shared / f).exists() for f in FILES.values()):
        raise SystemExit(f"{a.shared} lacks {list(FILES.values())}: this benchmark needs ../shared")
    run(a)


if __name__ == "__main__":
    main()
