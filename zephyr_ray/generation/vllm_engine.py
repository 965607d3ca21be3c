"""vLLM backend (GPU; ``pip install zephyr-ray[gpu]``): same interface and semantics as ``hf.HFEngine``.

Prompts are rendered with the same tokenizer and chat template as the transformers engine (``load_tokenizer``:
Zephyr's template for base models), cut from the left to ``max_prompt_length`` and passed as token ids.
``seed`` is per request in vLLM, so a prompt's samples do not depend on the rest of the batch. ``token_ids``
of a vLLM completion run up to and including the EOS or the token that completed a stop string, which is
our ``completion_tokens``; ``finish_reason`` is vLLM's (``stop`` or ``length``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zephyr_ray.generation import check_params, option_sequences, renormalise
from zephyr_ray.generation.types import Completion, Conversation, SamplingParams
from zephyr_ray.models import DTYPES, load_tokenizer

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
        self.cfg = cfg
        self._vllm = vllm
        self.tokenizer = load_tokenizer(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                        chat_template=cfg.chat_template)
        self.llm = vllm.LLM(model=path, tokenizer=path, revision=cfg.revision, dtype=DTYPES[cfg.precision],
                            tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, trust_remote_code=cfg.trust_remote_code)

    def prompt_ids(self, conversations: list[Conversation], suffix: list[int] | None = None) -> list[list[int]]:
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
        prompts = self.prompt_ids(conversations)
        sampling = self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                             max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                             seed=params.seed)
        outputs = self._run(prompts, sampling)
        return [[Completion(text=o.text, prompt_tokens=len(ids), completion_tokens=len(o.token_ids),
                            finish_reason=str(o.finish_reason))
                 for o in out.outputs]
                for ids, out in zip(prompts, outputs, strict=True)]

    def option_probs(self, conversations: list[Conversation], options: list[str], prefix: str = "",
                     suffix: str = "") -> list[list[float]]:
        """Each option's tokens (``option_sequences``, the same rule as ``HFEngine``) appended to the prompt (+
        ``prefix``) and scored with ``prompt_logprobs`` (the log-prob of every actual prompt token is always
        returned): the sum over the option's tokens, renormalised over the options. The prompts of one
        conversation share their prefix, which vLLM's prefix cache can compute once."""
        prefix_ids, seqs = option_sequences(self.tokenizer, options, prefix, suffix)
        prompts = self.prompt_ids(conversations, prefix_ids)
        sampling = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._run([p + seq for p in prompts for seq in seqs], sampling)
        out = []
        for c, prompt in enumerate(prompts):
            logps = []
            for k, seq in enumerate(seqs):
                scored = outputs[c * len(seqs) + k].prompt_logprobs  # one dict per prompt position (None first)
                logps.append(sum(scored[len(prompt) + j][t].logprob for j, t in enumerate(seq)))
            out.append(renormalise(logps))
        return out
