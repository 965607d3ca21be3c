"""The embedded backend: transformers' static batched ``generate`` (left padding, KV cache), bucketed by length.

How a call runs:

* every conversation is rendered with the chat template and its generation prompt, and cut from the left
  to ``max_prompt_length`` tokens (the latest turns are kept);
* the rows (one per conversation and sample; greedy decodes each conversation once and copies it ``n``
  times) are sorted by prompt length, longest first, and cut into batches of ``batch_size``, so rows of a
  batch have similar lengths and little left padding; each batch is one ``model.generate`` call with the
  KV cache; results come back in input order;
* a row stops at its first EOS or stop string; the others go on (finished rows are fed padding until the
  whole batch is done or ``max_new_tokens`` is reached).

Token accounting: ``prompt_tokens`` is the prompt after truncation (no padding); ``completion_tokens``
counts the generated tokens up to and including the EOS, or the token that completed a stop string, and
never the padding behind them. ``finish_reason`` is ``stop`` (EOS or stop string) or ``length``. The rule is
:mod:`zephyr_ray.generation.stopping`, shared with the serving batcher through :meth:`HFEngine.stop_rule`
(which also uses :meth:`HFEngine.left_pad`, :meth:`HFEngine.generation_config` and :func:`processor_classes`).

Sampling (``temperature > 0``) does not use the global RNG: each row draws from its own
``torch.Generator``, seeded from (``params.seed``, sample index, prompt token ids), inside a logits
processor that applies temperature and top-p and leaves only the drawn token for ``generate``'s argmax.
Guarantee: the same prompt with the same params gives the same completion whatever else is in the call,
in whatever order or batch (a Ray task retried with other rows reproduces its text), and the ``n`` samples
of a prompt are different draws. Caveat: a different batch changes the padding, hence the matmul shapes,
hence the logits in the last bits; a draw that falls within that distance of a boundary of the
cumulative distribution can then differ. Greedy decoding is token-exact batched vs alone (tested).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from zephyr_ray.generation import check_params, option_sequences
from zephyr_ray.generation.adapters import BASE, load_adapters
from zephyr_ray.generation.stopping import StopRule
from zephyr_ray.generation.types import Completion, Conversation, SamplingParams
from zephyr_ray.models import DTYPES, load_model, load_tokenizer

if TYPE_CHECKING:
    from zephyr_ray.config import EngineConfig


@dataclass
class GenerationStats:
    """Running totals of one engine (what padding and early-finished rows cost)."""

    calls: int = 0
    batches: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    # batch rows x padded prompt length, summed over batches: prefill positions computed.
    prompt_slots: int = 0
    completion_tokens: int = 0
    # batch rows x decode steps, summed over batches: decode positions computed (finished rows included).
    decode_slots: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompt_padding"] = 1 - self.prompt_tokens / self.prompt_slots if self.prompt_slots else 0.0
        out["decode_padding"] = 1 - self.completion_tokens / self.decode_slots if self.decode_slots else 0.0
        return out


def row_seed(seed: int, sample: int, prompt_ids: list[int]) -> int:
    """A 63-bit seed from the call's seed, the sample index and the prompt's tokens."""
    h = hashlib.blake2b(f"{seed}:{sample}:".encode(), digest_size=8)
    h.update(array("q", prompt_ids).tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


@functools.cache
def processor_classes() -> tuple[type, type]:
    """``(SeededSampler, StopStrings)``: the logits processor and stopping criterion classes of ``generate``
    (made once); the serving batcher applies the same sampler per row group."""

    class SeededSampler(LogitsProcessor):
        """Temperature + top-p sampling with one generator per row (inverse-CDF draw of one uniform per row
        per step). Returns scores where only the drawn token is finite, so greedy ``generate`` picks it."""

        def __init__(self, seeds: list[int], temperature: float, top_p: float):
            self.generators = [torch.Generator().manual_seed(s) for s in seeds]
            self.temperature = temperature
            self.top_p = top_p

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            probs = torch.softmax(scores.float() / self.temperature, dim=-1)
            if self.top_p < 1.0:
                probs, order = probs.sort(dim=-1, descending=True)
                cdf = probs.cumsum(dim=-1)
                # The nucleus: the most likely tokens until their mass reaches top_p (at least one).
                kept = ((cdf - probs) < self.top_p).sum(dim=-1)
            else:
                order, cdf = None, probs.cumsum(dim=-1)
                kept = torch.full((probs.shape[0],), probs.shape[-1], device=probs.device)
            mass = cdf.gather(-1, (kept - 1)[:, None])
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
            target = u.to(device=cdf.device, dtype=cdf.dtype)[:, None] * mass
            pick = torch.minimum(torch.searchsorted(cdf, target, right=True), (kept - 1)[:, None])
            token = order.gather(-1, pick) if order is not None else pick
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(-1, token, 0.0)

    class StopStrings(StoppingCriteria):
        """Stops a row when the text of its latest tokens (``rule.window`` of them) contains a stop string;
        records how many tokens it had generated then (the one that completed the string included)."""

        def __init__(self, tokenizer: Any, rule: StopRule, prompt_len: int, rows: int):
            self.tokenizer, self.rule, self.prompt_len = tokenizer, rule, prompt_len
            self.done = [False] * rows
            self.stopped_at: list[int | None] = [None] * rows

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            generated = input_ids.shape[1] - self.prompt_len
            last = input_ids[:, -1].tolist()
            live = []
            for r, token in enumerate(last):
                if self.done[r]:
                    continue
                if self.rule.is_eos(token):
                    self.done[r] = True
                else:
                    live.append(r)
            hit = [False] * len(last)
            if live:
                start = max(self.prompt_len, input_ids.shape[1] - self.rule.window)
                tails = self.tokenizer.batch_decode(input_ids[live, start:].tolist(), skip_special_tokens=True)
                for r, text in zip(live, tails):
                    if self.rule.stop_in(text):
                        self.done[r], self.stopped_at[r], hit[r] = True, generated, True
            return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)

    return SeededSampler, StopStrings


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes a KV cache: ``cache`` in newer transformers 5.x (``past_key_values``
    is deprecated there, removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(result: Any) -> Any:
    cache = getattr(result, "cache", None)
    return cache if cache is not None else result.past_key_values


class HFEngine:
    """``Engine`` and ``ScoringEngine`` on a transformers causal LM (CPU or one GPU).

    ``adapters`` (served name -> peft LoRA folder) are loaded onto the model (``generation/adapters.py``);
    ``generate(..., adapter=name)`` and ``adapter_selection`` pick them per call or per row; scoring and calls
    without an adapter run the base with every adapter off."""

    def __init__(self, cfg: EngineConfig, path: str, model: Any = None, tokenizer: Any = None,
                 adapters: Mapping[str, str] | None = None):
        self.cfg = cfg
        self.path = path
        self.tokenizer = tokenizer or load_tokenizer(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                                     chat_template=cfg.chat_template)
        if model is None:
            model = load_model(path, dtype=getattr(torch, DTYPES[cfg.precision]), attn_implementation=cfg.attn_implementation,
                               revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
            if torch.cuda.is_available():
                model = model.to("cuda")
        self._adapter_ids: dict[str, str] = {}
        if adapters:
            model, self._adapter_ids = load_adapters(model, adapters, path)
        self.model = model.eval().requires_grad_(False)
        self.device = self.model.device
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = sorted({*eos, self.tokenizer.eos_token_id})
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.stats = GenerationStats()

    # ---------------------------------------------------------------- adapters

    @property
    def adapters(self) -> tuple[str, ...]:
        """The served names of the loaded LoRA adapters."""
        return tuple(self._adapter_ids)

    def adapter_selection(self, rows: Sequence[str | None]) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``/``model(...)`` that run row ``i`` of a batch with adapter
        ``rows[i]`` (None: the base, adapters off); empty when no adapter is loaded (the plain model)."""
        if not self._adapter_ids:
            if any(r is not None for r in rows):
                raise ValueError(f"adapter {next(r for r in rows if r is not None)!r} requested, but this engine has "
                                 "no adapters loaded")
            return {}
        unknown = sorted({r for r in rows if r is not None and r not in self._adapter_ids})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {list(self._adapter_ids)}")
        return {"adapter_names": [BASE if r is None else self._adapter_ids[r] for r in rows]}

    def _base_model(self) -> Any:
        """The transformers model (inside peft's wrapper when adapters are loaded)."""
        return self.model.get_base_model() if self._adapter_ids else self.model

    # ---------------------------------------------------------------- prompts

    def prompt_ids(self, conversations: list[Conversation], suffix: list[int] | None = None) -> list[list[int]]:
        """Chat template + generation prompt (+ ``suffix``), cut from the left to ``max_prompt_length``."""
        if not conversations:
            return []
        rendered = self.tokenizer.apply_chat_template(
            [list(c) for c in conversations], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        limit = self.cfg.max_prompt_length
        return [(list(ids) + (suffix or []))[-limit:] for ids in rendered]

    def left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of token rows, left-padded with the pad id, on the model's device."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _buckets(self, lengths: list[int]) -> list[list[int]]:
        """Row indices sorted by length (longest first, ties in input order) in batches of ``batch_size``."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        size = max(1, self.cfg.batch_size)
        return [order[s:s + size] for s in range(0, len(order), size)]

    # ---------------------------------------------------------------- generate

    def stop_rule(self, stops: list[str]) -> StopRule:
        """How a sequence of this engine ends with these stop strings (EOS ids, text, token count, reason)."""
        return StopRule(self.eos_ids, stops, functools.partial(self.tokenizer.decode, skip_special_tokens=True))

    def generation_config(self, max_new_tokens: int) -> Any:
        """The ``GenerationConfig`` of every decode: greedy argmax (sampling is a logits processor), KV cache,
        the engine's EOS ids and pad id."""
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                eos_token_id=self.eos_ids, pad_token_id=self.pad_id)

    def generate(self, conversations: list[Conversation], params: SamplingParams, adapter: str | None = None
                 ) -> list[list[Completion]]:
        """``Engine.generate``; ``adapter``: a loaded adapter's served name, None = the base model."""
        check_params(params)
        self.adapter_selection([adapter])  # an unknown adapter fails before any work
        started = time.perf_counter()
        prompts = self.prompt_ids(conversations)
        samples = params.n if params.temperature > 0 else 1  # greedy: n identical completions, decoded once
        rows = [(i, j) for i in range(len(prompts)) for j in range(samples)]
        done: dict[tuple[int, int], Completion] = {}
        for batch in self._buckets([len(prompts[i]) for i, _ in rows]):
            picked = [rows[b] for b in batch]
            outs = self._generate_batch([prompts[i] for i, _ in picked],
                                        [row_seed(params.seed, j, prompts[i]) for i, j in picked], params, adapter)
            done.update(zip(picked, outs))
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - started
        return [[replace(done[(i, j if samples > 1 else 0)]) for j in range(params.n)] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                        adapter: str | None = None) -> list[Completion]:
        sampler_cls, stop_cls = processor_classes()
        ids, mask = self.left_pad(prompts)
        width = ids.shape[1]
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(sampler_cls(seeds, params.temperature, params.top_p))
        rule = self.stop_rule(list(params.stop))
        criteria = StoppingCriteriaList()
        stopper = None
        if params.stop:
            stopper = stop_cls(self.tokenizer, rule, width, len(prompts))
            criteria.append(stopper)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=self.generation_config(params.max_new_tokens),
                                      logits_processor=processors, stopping_criteria=criteria,
                                      **self.adapter_selection([adapter] * len(prompts)))
        generated = out[:, width:].tolist()
        completions = []
        for r, tokens in enumerate(generated):
            end = rule.end(tokens, stopper.stopped_at[r] if stopper is not None else None)
            completions.append(Completion(text=end.text, prompt_tokens=len(prompts[r]),
                                          completion_tokens=end.completion_tokens, finish_reason=end.finish_reason))
        s = self.stats
        s.batches += 1
        s.rows += len(prompts)
        s.prompt_tokens += sum(len(p) for p in prompts)
        s.prompt_slots += len(prompts) * width
        s.completion_tokens += sum(c.completion_tokens for c in completions)
        s.decode_slots += len(prompts) * len(generated[0])
        return completions

    # ---------------------------------------------------------------- scoring

    def option_probs(self, conversations: list[Conversation], options: list[str], prefix: str = "",
                     suffix: str = "") -> list[list[float]]:
        """P(option | conversation + generation prompt + ``prefix``), each option scored as its whole token
        sequence (``option + suffix``, see ``option_sequences``) and renormalised over the options.

        Per batch (bucketed by length, left padding) the prompt is run once, with the KV cache kept when an
        option has more than one token: its first token is read from the prompt's last logits, the rest from
        one short forward per option over the cached prompt (a copy of the cache, so every option continues
        the same prompt). Cost: one prompt forward per conversation plus, per option, a forward of its
        ``len - 1`` tokens; never a prompt forward per option."""
        prefix_ids, seqs = option_sequences(self.tokenizer, options, prefix, suffix)
        prompts = self.prompt_ids(conversations, prefix_ids)
        first = torch.tensor([seq[0] for seq in seqs], device=self.device)
        continued = [(k, seq) for k, seq in enumerate(seqs) if len(seq) > 1]
        out: list[list[float]] = [[] for _ in prompts]
        for batch in self._buckets([len(p) for p in prompts]):
            ids, mask = self.left_pad([prompts[i] for i in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    use_cache=bool(continued), logits_to_keep=1,
                                    **self.adapter_selection([None] * len(batch)))
                scores = torch.log_softmax(result.logits[:, -1, :].float(), dim=-1)[:, first]  # (rows, options)
                for k, seq in continued:
                    scores[:, k] += self._continuation_logprob(_output_cache(result), mask, positions, seq)
            probs = torch.softmax(scores, dim=-1).tolist()
            for i, p in zip(batch, probs):
                out[i] = p
        return out

    def _continuation_logprob(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor, seq: list[int]
                              ) -> torch.Tensor:
        """Sum of log P(seq[j] | prompt, seq[:j]) for j >= 1, per row, continuing a copy of the prompt's cache."""
        rows, n = mask.shape[0], len(seq) - 1
        tokens = torch.tensor(seq, device=self.device)
        step = torch.arange(1, n + 1, device=self.device)
        result = self.model(input_ids=tokens[:-1].expand(rows, n),
                            attention_mask=torch.cat([mask, mask.new_ones(rows, n)], dim=-1),
                            position_ids=positions[:, -1:] + step, use_cache=True,
                            **{_cache_kwarg(self._base_model()): copy.deepcopy(cache)},
                            **self.adapter_selection([None] * rows))
        logp = torch.log_softmax(result.logits.float(), dim=-1)  # (rows, n, vocab)
        return logp.gather(-1, tokens[1:].expand(rows, n)[..., None]).squeeze(-1).sum(-1)
