"""Attention over packed rows: one SDPA call per sequence instead of one masked call per row.

Packed rows (several sequences in a row, ``position_ids`` restarting at 0 at each) are kept apart by
transformers' SDPA path with a block-diagonal mask built for the whole row; a materialised mask sends
PyTorch's SDPA to its slow math kernel on CPU and costs (row length)^2 memory. Flash-attention instead
reads the sequence boundaries from ``position_ids`` (varlen), but only for a batch of one row.

``sdpa_varlen`` gives SDPA the same ability: with no padding mask it splits each row at its position
restarts and runs causal SDPA (``is_causal``: the fused kernel, no mask) per sequence. Every other
call (a padding mask, a KV cache, rows without restarts) is plain SDPA, so it is a drop-in for
``sdpa`` and ``load_model`` uses it wherever a family supports transformers' attention interface.
With such an attention a micro-batch of packed sequences can be one row with no padding at all
(``allows_one_row``): the layout flash-attention needs, and the fastest on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

VARLEN_SDPA = "sdpa_varlen"
# Attention implementations that keep packed sequences of ONE row apart using position_ids alone.
ONE_ROW_ATTENTION = frozenset({VARLEN_SDPA, "flash_attention_2", "flash_attention_3", "flash_attention_4"})


def _sequence_bounds(position_ids: torch.Tensor) -> list[int]:
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [*starts, position_ids.shape[-1]]


def _window_mask(length: int, window: int, device: Any) -> torch.Tensor:
    """(1, 1, L, L) boolean causal mask limited to the last ``window`` positions (Mistral's sliding window)."""
    i = torch.arange(length, device=device)
    offset = i[:, None] - i[None, :]
    return ((offset >= 0) & (offset < window))[None, None]


def sdpa_varlen(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, None]:
    """transformers attention function (B, H, L, D) → (B, L, H, D): causal SDPA per packed sequence."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if attention_mask is not None or key.shape[2] != length or length == 1:  # padding, or a KV cache
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.get("sliding_window")
    if position_ids is None or not bool((position_ids[:, 1:] == 0).any()):  # one sequence per row
        return sdpa_attention_forward(module, query, key, value, _window_mask(length, window, query.device)
                                      if window and length > window else None, **kwargs)
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for b in range(query.shape[0]):
        bounds = _sequence_bounds(position_ids[b])
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            mask = _window_mask(end - start, window, query.device) if window and end - start > window else None
            seg = slice(start, end)
            parts.append(sdpa_attention_forward(module, query[b:b + 1, :, seg], key[b:b + 1, :, seg],
                                                value[b:b + 1, :, seg], mask, **kwargs)[0])
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _mask(**kwargs: Any) -> torch.Tensor | None:
    """No mask without padding or cache (``sdpa_varlen`` then applies causality, packing and the sliding window
    itself, per sequence); otherwise SDPA's own mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"]:
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    """Make ``sdpa_varlen`` a transformers attention implementation (idempotent; per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, sdpa_varlen)
    AttentionMaskInterface.register(VARLEN_SDPA, _mask)


def use_varlen_sdpa(model: Any) -> None:
    """Switch a model loaded with ``sdpa`` to ``sdpa_varlen`` when its family takes transformers' attention
    interface (Falcon and MPT do not: they keep their own attention and the block-masked packed path)."""
    if model.config._attn_implementation == "sdpa" and getattr(type(model), "_supports_attention_backend", False):
        register()
        model.set_attn_implementation(VARLEN_SDPA)


def trains_one_row(model: Any, packing: bool) -> bool:
    """The training layout, for the workers and the actors scoring their rows alike: a packed micro-batch is
    one unpadded row when the model's attention allows it."""
    return packing and allows_one_row(model)


def allows_one_row(model: Any) -> bool:
    """Whether ``model`` (possibly under DeepSpeed's engine or peft) keeps packed sequences of one row apart
    from ``position_ids`` alone, so a micro-batch may be concatenated into one unpadded row."""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) in ONE_ROW_ATTENTION
