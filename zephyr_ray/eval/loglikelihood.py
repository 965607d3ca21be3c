"""Batched continuation log-likelihoods on a transformers causal LM (lm-eval's ``loglikelihood`` requests).

A request is ``(context ids, continuation ids)``. The model reads ``(context + continuation)[:-1]`` (cut from the
left to ``max_length`` tokens, as lm-eval does); the log-probability of each continuation token is read at the
position before it, in fp32 (``log_softmax`` of the logits cast to float32), and summed. Requests are sorted by
length (longest first) and cut into batches of ``batch_size``; a batch is right-padded (real tokens keep positions
0..n-1, so a row's numbers do not depend on its batch beyond floating-point noise) and run in one forward pass.
``logits_to_keep`` limits the LM head to the batch's continuation span where the model supports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

Request = tuple[Sequence[int], Sequence[int]]


def _max_length(model: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def loglikelihood(model: Any, tokenizer: Any, requests: Sequence[Request], batch_size: int = 16,
                  max_length: int | None = None) -> list[tuple[float, bool]]:
    """``(sum of continuation log-probs, whether greedy decoding would produce the continuation)`` per request,
    in input order."""
    if not requests:
        return []
    max_length = max_length or _max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    rows: list[tuple[list[int], int]] = []  # (model input, number of continuation tokens scored)
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a request has an empty continuation")
        whole = [*ctx, *cont][-(max_length + 1):]
        rows.append((whole[:-1], min(len(cont), len(whole) - 1)))
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    size = max(1, batch_size)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    with torch.inference_mode():
        for s in range(0, len(order), size):
            batch = order[s:s + size]
            width = max(len(rows[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                inp = rows[i][0]
                ids[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                mask[b, :len(inp)] = 1
            # The first position any row's continuation is read at; logits before it are never needed.
            first = min(len(rows[i][0]) - rows[i][1] for i in batch)
            kwargs = {"logits_to_keep": width - first} if keep_arg else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            offset = width - logits.shape[1]  # logits[:, j] belongs to input position offset + j
            for b, i in enumerate(batch):
                inp, n = rows[i]
                start = len(inp) - n
                target = torch.tensor(requests[i][1][-n:], dtype=torch.long, device=logits.device)
                logp = logits[b, start - offset:len(inp) - offset].float().log_softmax(-1)
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]
