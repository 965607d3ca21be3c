"""Chat tokenization with labels on exactly what the assistant says."""

from __future__ import annotations

import functools
import re
from typing import Any

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenize_messages(tokenizer: Any, messages: list[dict[str, str]], max_length: int | None = None) -> dict[str, list[int]]:
    """Ids equal to ``tokenizer.apply_chat_template(messages)``; labels = ids on every assistant token
    (content + EOS, every turn) and ``IGNORE_INDEX`` elsewhere. Both are cut to ``max_length`` together.

    The assistant spans come from the template's ``{% generation %}`` markers, mapped to tokens through
    the fast tokenizer's offsets, so BPE merges at turn boundaries cannot shift them.
    """
    if not _GENERATION_TAG.search(tokenizer.chat_template or ""):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} markers, so assistant tokens cannot be "
            "located; use a template with them (zephyr_ray.models.ZEPHYR_CHAT_TEMPLATE)"
        )
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, enc["assistant_masks"])]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """One tokenizer per process for Ray Data tasks (loading costs more than a batch)."""
    from zephyr_ray.models import load_tokenizer

    return load_tokenizer(path)
