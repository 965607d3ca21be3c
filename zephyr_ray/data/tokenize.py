"""Chat tokenization with labels on exactly what the assistant says."""

from __future__ import annotations

import functools
import re
from typing import Any

from zephyr_ray.models import load_tokenizer

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenize_messages(tokenizer: Any, messages: list[dict[str, str]], max_length: int | None = None) -> dict[str, list[int]]:
    """Ids equal to ``tokenizer.apply_chat_template(messages)``; labels = ids on every assistant token
    (content + end of turn, every turn) and ``IGNORE_INDEX`` elsewhere. Both are cut to ``max_length``.

    The assistant spans come from the template's ``{% generation %}`` markers where it has them, else
    from rendering growing prefixes of the dialogue (most released chat templates, e.g. Qwen2's and
    Gemma's, have no markers); either way they are character spans mapped to tokens through the fast
    tokenizer's offsets, so BPE merges at turn boundaries cannot shift them.
    """
    if _GENERATION_TAG.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), enc["assistant_masks"]
    else:
        text, spans = assistant_spans_by_prefix(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def assistant_spans_by_prefix(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered dialogue and each assistant turn's character span: from the end of the generation
    prompt of the turns before it to the end of its own rendering, less whitespace the template adds
    after the content (the end-of-turn token stays in: it is how the model learns to stop).

    Valid only for templates whose renderings of a dialogue's prefixes are prefixes of the whole (true
    of Zephyr, ChatML/Qwen2, Llama 2/3, Mistral, Gemma); one that rewrites earlier turns (e.g. drops
    past reasoning) is refused rather than mislabelled.
    """
    def render(msgs: list[dict[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template renders assistant turn {i} differently inside the whole dialogue than on "
                "its own, so its tokens cannot be located without {% generation %} markers; add them to the "
                "template (see zephyr_ray.models.ZEPHYR_CHAT_TEMPLATE)")
        tail = through[len(before):]
        after = tail[len(m["content"]):] if tail.startswith(m["content"]) else tail
        spans.append((len(before), len(through) - (len(after) - len(after.rstrip()))))
    return text, spans


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str, chat_template: str | None = None):
    """One tokenizer per process for Ray Data tasks (loading costs more than a batch); ``chat_template``:
    ``model.chat_template``, the override every task of a stage must tokenize with."""
    return load_tokenizer(path, chat_template=chat_template)
