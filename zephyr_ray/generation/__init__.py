"""Chat generation behind one interface (``types.Engine``), three backends chosen by ``EngineConfig.backend``:

* ``transformers`` (default, embedded): static batched ``model.generate`` with left padding and a KV cache,
  batches bucketed by prompt length (``hf.HFEngine``; also a ``ScoringEngine``);
* ``vllm``: the same interface on vLLM, imported only when chosen (``pip install zephyr-ray[gpu]``);
* ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint (a GPT-4 judge, our own Ray Serve app).

Backends are imported lazily, so picking one never imports (or requires) the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from zephyr_ray.generation.types import Completion, Conversation, Engine, SamplingParams, ScoringEngine

if TYPE_CHECKING:
    from zephyr_ray.config import EngineConfig

__all__ = ["Completion", "Conversation", "Engine", "SamplingParams", "ScoringEngine", "check_params", "make_engine"]


def check_params(params: SamplingParams) -> None:
    """Reject sampling parameters no backend can honour (before any work starts)."""
    if params.n < 1:
        raise ValueError(f"sampling.n must be >= 1, got {params.n}")
    if params.max_new_tokens < 1:
        raise ValueError(f"sampling.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {params.top_p}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise ValueError(f"sampling.stop must be non-empty strings, got {params.stop!r}")


def make_engine(cfg: EngineConfig, output_dir: str | Path) -> Engine:
    """The engine ``cfg.backend`` names. Local backends with no ``cfg.path`` use the tiny random model,
    built once under ``output_dir``."""
    if cfg.backend == "transformers":
        from zephyr_ray.generation.hf import HFEngine
        from zephyr_ray.models import resolve_model_path

        return HFEngine(cfg, resolve_model_path(cfg.path, output_dir, seed=cfg.tiny_seed, arch=cfg.tiny_arch))
    if cfg.backend == "vllm":
        from zephyr_ray.generation.vllm_engine import VLLMEngine, import_vllm
        from zephyr_ray.models import resolve_model_path

        import_vllm()  # a missing vllm fails here, before the tiny model is built
        return VLLMEngine(cfg, resolve_model_path(cfg.path, output_dir, seed=cfg.tiny_seed, arch=cfg.tiny_arch))
    if cfg.backend == "openai":
        from zephyr_ray.generation.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg)
    raise ValueError(f"engine.backend={cfg.backend!r} is not valid; choose one of transformers, vllm, openai")


def chat(model: str, prompts: list[str], max_new_tokens: int = 128, precision: str = "fp32") -> list[dict[str, str]]:
    """Greedy single-turn answers of the model at ``model`` (an HF folder, GGUF file or embedded name) to
    ``prompts``, in one batch in this process: ``zephyr-ray chat`` and the pipeline's closing chat."""
    from zephyr_ray.config import EngineConfig  # config imports generation.types: not at the top

    engine = make_engine(EngineConfig(name="chat", path=model, precision=precision), Path.cwd())
    outputs = engine.generate([[{"role": "user", "content": p}] for p in prompts],
                              SamplingParams(max_new_tokens=max_new_tokens))
    return [{"user": p, "assistant": out[0].text.strip()} for p, out in zip(prompts, outputs, strict=True)]
