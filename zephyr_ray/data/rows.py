"""Turning raw rows into validated examples, with bad rows either raised or counted and logged.

Shared by every stage that reads chat data: the stage supplies a ``validate`` function that raises
:class:`RowProblem`; this module adds the file/row, applies ``on_bad_row`` and keeps the tallies.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE
from zephyr_ray.data.schema import BadRowError, RowProblem, RowRef

log = logging.getLogger(__name__)
# Optional column naming a row's unit ("line" or "row") where RAW_JSON alone would mislead (data/mixture.py rows).
UNIT = "_unit"
_INDEX = re.compile(r"\[\d+\]")
_BAD_ROW_TEXT = re.compile(r"BadRowError: (.+)")


@dataclass
class DataReport:
    """Totals of one pass over a dataset; summed across Ray Data batches."""

    rows: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    label_tokens: int = 0
    packed_rows: int = 0

    def skip(self, ref: RowRef, problem: RowProblem) -> None:
        self.skipped[f"{_INDEX.sub('[*]', problem.field)}: {problem.reason}"] += 1
        log.warning("skipping %s: %s", ref, problem)

    def overlong(self, ref: RowRef, problem: RowProblem, policy: str) -> bool:
        """``data.overlong`` for a row over the length limits: ``error`` raises, ``skip`` counts and logs it
        (True: drop the row), ``truncate`` counts it (False: keep the cut row)."""
        if policy == "error":
            raise ref.error(problem)
        if policy == "skip":
            self.skip(ref, problem)
            return True
        self.truncated += 1
        return False

    def merge(self, other: DataReport) -> DataReport:
        self.rows += other.rows
        self.used += other.used
        self.skipped.update(other.skipped)
        self.truncated += other.truncated
        self.tokens += other.tokens
        self.label_tokens += other.label_tokens
        self.packed_rows += other.packed_rows
        return self

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "skipped": dict(self.skipped)})

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        data = json.loads(text)
        return cls(**{**data, "skipped": Counter(data["skipped"])})

    def summary(self) -> str:
        lines = [
            f"rows read {self.rows}, used {self.used}, skipped {sum(self.skipped.values())}, "
            f"truncated {self.truncated}; {self.tokens} tokens ({self.label_tokens} trained), "
            f"{self.packed_rows} training rows"
        ]
        lines += [f"  skipped {n:>6} x {reason}" for reason, n in self.skipped.most_common()]
        return "\n".join(lines)


def row_ref(row: dict[str, Any]) -> RowRef:
    unit = row.get(UNIT) or ("line" if RAW_JSON in row else "row")
    return RowRef(row.get(SOURCE, "<memory>"), int(row.get(ROW, -1)), unit)


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row's fields; a raw JSONL line is decoded here so a malformed one is an ordinary bad row."""
    if RAW_JSON not in row:
        return row
    try:
        data = json.loads(row[RAW_JSON])
    except json.JSONDecodeError as exc:
        raise RowProblem("<json>", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise RowProblem("<json>", f"expected an object, got {type(data).__name__}")
    return data


def valid_rows(rows: list[dict[str, Any]], validate: Callable[[dict[str, Any]], Any], on_bad_row: str,
               report: DataReport) -> Iterator[tuple[RowRef, Any]]:
    """Yield ``(ref, validate(row))`` for good rows; bad ones raise (``error``) or are tallied (``skip``)."""
    for row in rows:
        report.rows += 1
        ref = row_ref(row)
        try:
            example = validate(parse_row(row))
        except RowProblem as problem:
            if on_bad_row == "error":
                raise ref.error(problem) from None
            report.skip(ref, problem)
            continue
        yield ref, example


def raise_bad_row(exc: BaseException) -> None:
    """Re-raise a :class:`BadRowError` from inside a Ray task failure as itself, with its clean message.

    Ray wraps task errors and carries the original only as traceback text, so the text is searched too.
    """
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = str(e).splitlines()[0] if isinstance(e, BadRowError) else None
        match = _BAD_ROW_TEXT.search(str(e))
        if found or match:
            raise BadRowError(found or match.group(1)) from None
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
