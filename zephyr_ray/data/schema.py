"""Row validation for chat data in the ``ultrachat_200k`` schema.

A problem is reported as a :class:`RowProblem` naming the field; readers add the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class RowProblem(ValueError):
    """What is wrong with one row, and in which field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field}: {reason}")
        self.field = field
        self.reason = reason


class BadRowError(ValueError):
    """A bad row with ``data.on_bad_row=error``: names file, row and field."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from: file and line (JSONL, 1-based) or row (Parquet/datasets, 0-based)."""

    source: str
    row: int
    unit: str = "row"

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.row}"

    def error(self, problem: RowProblem) -> BadRowError:
        return BadRowError(f"{self}: {problem} (set data.on_bad_row=skip to count and skip such rows)")


def validate_messages(messages: Any, field: str = "messages", last_role: str = "assistant") -> list[dict[str, str]]:
    """Check ``system``? then alternating ``user``/``assistant``, non-empty strings, and the last turn's
    role (``assistant`` for training dialogues, ``user`` for prompts awaiting an answer)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowProblem(field, f"expected a non-empty list of {{role, content}}, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RowProblem(where, f"expected an object with role and content, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RowProblem(f"{where}.role", f"unknown role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise RowProblem(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RowProblem(f"{where}.content", "empty turn")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    for i, msg in enumerate(out[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise RowProblem(f"{field}[{i}].role", f"expected {expected!r} (system? then alternating user/assistant), got {msg['role']!r}")
    if out[-1]["role"] != last_role:
        raise RowProblem(f"{field}[{len(out) - 1}].role", f"the last turn must be the {last_role}'s")
    return out
