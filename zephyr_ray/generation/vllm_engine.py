"""vLLM backend (GPU; ``pip install zephyr-ray[gpu]``): same interface and semantics as ``hf.HFEngine``.

Prompts are rendered with the same tokenizer and chat template as the transformers engine (``load_tokenizer``:
Zephyr's template for base models), cut from the left to ``max_prompt_length`` and passed as token ids.
``seed`` is per request in vLLM, so a prompt's samples do not depend on the rest of the batch. ``token_ids``
of a vLLM completion run up to and including the EOS or the token that completed a stop string, which is
our ``completion_tokens``; ``finish_reason`` is vLLM's (``stop`` or ``length``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zephyr_ray.generation import check_params
from zephyr_ray.generation.types import Completion, Conversation, SamplingParams

if TYPE_CHECKING:
    from zephyr_ray.config import EngineConfig

MISSING = ("the vllm backend needs the `vllm` package, which is not installed: pip install 'zephyr-ray[gpu]' "
           "(Linux with a CUDA GPU), or set engine.backend=transformers")


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    return vllm


class VLLMEngine:
    """``Engine`` and ``ScoringEngine`` on ``vllm.LLM`` (tensor parallel over ``tensor_parallel_size`` GPUs)."""

    def __init__(self, cfg: EngineConfig, path: str):
        vllm = import_vllm()
        from zephyr_ray.models import DTYPES, load_tokenizer

        self.cfg = cfg
        self._vllm = vllm
        self.tokenizer = load_tokenizer(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        self.llm = vllm.LLM(model=path, tokenizer=path, revision=cfg.revision, dtype=DTYPES[cfg.precision],
                            tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, trust_remote_code=cfg.trust_remote_code)

    def _prompts(self, conversations: list[Conversation], suffix: list[int] | None = None) -> list[list[int]]:
        if not conversations:
            return []
        rendered = self.tokenizer.apply_chat_template([list(c) for c in conversations], tokenize=True,
                                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        return [(list(ids) + (suffix or []))[-self.cfg.max_prompt_length:] for ids in rendered]

    def _run(self, prompts: list[list[int]], sampling: Any) -> list[Any]:
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
        return self.llm.generate(inputs, sampling, use_tqdm=False)

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[list[Completion]]:
        check_params(params)
        prompts = self._prompts(conversations)
        sampling = self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                             max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                             seed=params.seed)
        outputs = self._run(prompts, sampling)
        return [[Completion(text=o.text, prompt_tokens=len(ids), completion_tokens=len(o.token_ids),
                            finish_reason=str(o.finish_reason))
                 for o in out.outputs]
                for ids, out in zip(prompts, outputs, strict=True)]

    def option_probs(self, conversations: list[Conversation], options: list[str], prefix: str = "") -> list[list[float]]:
        """Each option token appended to the prompt (+ ``prefix``) and scored with ``prompt_logprobs``
        (the log-prob of every actual prompt token is always returned), renormalised over the options."""
        import math

        if not options:
            raise ValueError("option_probs needs at least one option")
        tok = self.tokenizer
        ids = []
        base = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        for o in options:  # same rule as HFEngine.option_token
            joined = tok(prefix + o, add_special_tokens=False)["input_ids"]
            alone = tok(o, add_special_tokens=False)["input_ids"]
            if len(joined) == len(base) + 1 and joined[:len(base)] == base:
                ids.append(joined[-1])
            elif len(alone) == 1:
                ids.append(alone[0])
            else:
                raise ValueError(f"option {o!r} is not a single token: {tok.convert_ids_to_tokens(alone)}")
        prompts = self._prompts(conversations, base)
        sampling = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._run([p + [t] for p in prompts for t in ids], sampling)
        out = []
        for c in range(len(prompts)):
            logps = [outputs[c * len(ids) + k].prompt_logprobs[-1][t].logprob for k, t in enumerate(ids)]
            top = max(logps)
            exps = [math.exp(lp - top) for lp in logps]
            out.append([e / sum(exps) for e in exps])
        return out
