"""Chat generation behind one interface (``types.Engine``), three backends chosen by ``EngineConfig.backend``:

* ``transformers`` (default, embedded): static batched ``model.generate`` with left padding and a KV cache,
  batches bucketed by prompt length (``hf.HFEngine``; also a ``ScoringEngine``);
* ``vllm``: the same interface on vLLM, imported only when chosen (``pip install zephyr-ray[gpu]``);
* ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint (a GPT-4 judge, our own Ray Serve app).

Backends are imported lazily, so picking one never imports (or requires) the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zephyr_ray.config import EngineConfig
from zephyr_ray.generation.types import Completion, Conversation, Engine, SamplingParams, ScoringEngine
from zephyr_ray.models import resolve_model_path

__all__ = ["Completion", "Conversation", "Engine", "SamplingParams", "ScoringEngine", "check_params", "make_engine",
           "option_sequences", "renormalise"]


def check_params(params: SamplingParams) -> None:
    """Reject sampling parameters no backend can honour (before any work starts); the rules are
    ``SamplingParams.problems``, which a config's ``sampling`` sections also pass when they load."""
    for key, problem in params.problems():
        raise ValueError(f"sampling.{key} {problem}, got {getattr(params, key)!r}")


def option_sequences(tokenizer: Any, options: Sequence[str], prefix: str = "", suffix: str = ""
                     ) -> tuple[list[int], list[list[int]]]:
    """The token ids of ``prefix`` (appended to the prompt) and of each option's continuation ``option + suffix``,
    as ``ScoringEngine.option_probs`` scores them; every engine uses this one rule.

    An option's tokens are what tokenizing ``prefix + option + suffix`` adds to ``prefix``'s own tokens, so BPE
    merges inside the option and its closing marker ("10]]") are the model's own. When the tokenizer merges
    across the boundary instead (a prefix ending in a space before a digit: "Rating: " + "5" -> "Ġ5"), the
    prompt still ends with ``prefix``'s tokens (the prefill is fixed text, and the model continues those tokens,
    it cannot re-merge them), and the option is ``option + suffix`` tokenized alone: AIF's "Rating: " prefix
    has always been scored so. The eval judge's prefixes end in "[[", which no BPE merges with a digit or letter.

    Options must be told apart as token sequences: none may equal or be a prefix of another (P("1") would
    swallow "10"); give a closing marker (``suffix``, e.g. "]]") to separate them.
    """
    if not options:
        raise ValueError("option_probs needs at least one option")

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    base = ids(prefix)
    seqs = []
    for option in options:
        joined = ids(prefix + option + suffix)
        seq = joined[len(base):] if joined[:len(base)] == base else ids(option + suffix)
        if not seq:
            raise ValueError(f"option {option!r} (suffix {suffix!r}) has no tokens")
        seqs.append(seq)
    for i, a in enumerate(seqs):
        for j, b in enumerate(seqs):
            if i != j and ((options[j] + suffix).startswith(options[i] + suffix) or b[:len(a)] == a):
                raise ValueError(f"option {options[i]!r} is a prefix of option {options[j]!r} (as text + suffix "
                                 f"{suffix!r}, or as tokens: {a} vs {b}): P({options[i]!r}) would include "
                                 f"{options[j]!r}; give a closing marker as suffix (e.g. ']]') so no option's text "
                                 "starts another's")
    return base, seqs


def renormalise(logprobs: Sequence[float]) -> list[float]:
    """Probabilities from (unnormalised) log-probabilities: exp, then divided by their sum."""
    top = max(logprobs)
    exps = [math.exp(lp - top) for lp in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def make_engine(cfg: EngineConfig, output_dir: str | Path) -> Engine:
    """The engine ``cfg.backend`` names. Local backends with no ``cfg.path`` use the tiny random model,
    built once under ``output_dir``."""
    if cfg.backend == "transformers":
        from zephyr_ray.generation.hf import HFEngine

        return HFEngine(cfg, resolve_model_path(cfg.path, output_dir, seed=cfg.tiny_seed, arch=cfg.tiny_arch))
    if cfg.backend == "vllm":
        from zephyr_ray.generation.vllm_engine import VLLMEngine, import_vllm

        import_vllm()  # a missing vllm fails here, before the tiny model is built
        return VLLMEngine(cfg, resolve_model_path(cfg.path, output_dir, seed=cfg.tiny_seed, arch=cfg.tiny_arch))
    if cfg.backend == "openai":
        from zephyr_ray.generation.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg)
    raise ValueError(f"engine.backend={cfg.backend!r} is not valid; choose one of transformers, vllm, openai")


def chat(model: str, prompts: list[str], max_new_tokens: int = 128, precision: str = "fp32") -> list[dict[str, str]]:
    """Greedy single-turn answers of the model at ``model`` (an HF folder, GGUF file or embedded name) to
    ``prompts``, in one batch in this process: ``zephyr-ray chat`` and the pipeline's closing chat."""
    engine = make_engine(EngineConfig(name="chat", path=model, precision=precision), Path.cwd())
    outputs = engine.generate([[{"role": "user", "content": p}] for p in prompts],
                              SamplingParams(max_new_tokens=max_new_tokens))
    return [{"user": p, "assistant": out[0].text.strip()} for p, out in zip(prompts, outputs, strict=True)]
