"""Prompts (inputs of generation, AI feedback and self-instruct) and pre-generated completions.

A prompt row has ``prompt`` (str) or ``messages`` (a conversation ending in a user turn), and an
optional ``prompt_id`` (UltraFeedback's convention when absent: sha256 of the prompt text).
"""

from __future__ import annotations

import hashlib
from typing import Any

from zephyr_ray.data.rows import DataReport, valid_rows
from zephyr_ray.data.schema import RowProblem, validate_messages


def prompt_id_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """``{prompt_id, prompt, messages}``: ``prompt`` is the last user turn, ``messages`` what a model sees."""
    if row.get("messages") is not None:
        messages = validate_messages(row["messages"], "messages", last_role="user")
    else:
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowProblem("prompt", f"expected a non-empty string (or a `messages` list), got {prompt!r:.60}")
        messages = [{"role": "user", "content": prompt}]
    text = messages[-1]["content"]
    pid = row.get("prompt_id")
    if pid is not None and (not isinstance(pid, (str, int)) or str(pid) == ""):
        raise RowProblem("prompt_id", f"expected a non-empty string, got {pid!r:.60}")
    return {"prompt_id": str(pid) if pid is not None else prompt_id_of(text), "prompt": text, "messages": messages}


def prompt_rows(rows: list[dict[str, Any]], on_bad_row: str) -> tuple[list[dict[str, Any]], DataReport]:
    report = DataReport()
    out = [p for _, p in valid_rows(rows, validate_prompt, on_bad_row, report)]
    report.used = len(out)
    return out, report


def validate_completions(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Pre-generated completions, flat (``prompt``, ``model``, ``completion``) or grouped per prompt
    (``prompt``, ``completions``: [{``model``, ``text``}], the shared AlpacaEval layout), as flat rows
    ``{prompt_id, prompt, messages, model, sample, completion}``."""
    prompt = validate_prompt(row)
    if "completions" in row:
        items = row["completions"]
        if not isinstance(items, list) or not items:
            raise RowProblem("completions", "expected a non-empty list of {model, text}")
        pairs = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RowProblem(f"completions[{i}]", f"expected an object, got {type(item).__name__}")
            pairs.append((f"completions[{i}]", item.get("model"), item.get("text", item.get("completion"))))
    else:
        pairs = [("", row.get("model"), row.get("completion"))]
    out, samples = [], {}
    for where, model, text in pairs:
        if not isinstance(model, str) or not model:
            raise RowProblem(f"{where}.model".lstrip("."), f"expected a model name, got {model!r:.60}")
        if not isinstance(text, str) or not text.strip():
            raise RowProblem(f"{where}.text" if where else "completion", "empty or missing completion")
        sample = samples[model] = samples.get(model, -1) + 1
        out.append({**prompt, "model": model, "sample": sample, "completion": text})
    return out
