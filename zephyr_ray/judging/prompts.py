"""What a judge is shown: placeholder filling, UltraFeedback aspect templates (AIF) and FastChat judge prompts
(evaluation).

- **Filling** (:func:`fill`): ``{name}`` placeholders are replaced in one pass, so text put in for one placeholder
  is never scanned for another, and other braces stay as written. Both formats use it.
- **UltraFeedback templates** (AIF): one ``<aspect>.txt`` per aspect, each holding ``{instruction}`` and
  ``{completion}``; the judge sees one user turn (:func:`judge_conversation`).
- **FastChat prompts** (evaluation): a ``judge_prompts.jsonl`` file, one JSON object a line: ``name``, ``type``
  (``single`` or ``pairwise``), ``system_prompt`` (may be empty), ``prompt_template`` with ``{placeholders}``,
  and optional ``description``, ``category``, ``output_format``. The judge sees a system turn (when the system
  prompt is not blank) and one user turn (:meth:`JudgePrompt.conversation`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from zephyr_ray.data.schema import BadRowError, RowProblem, RowRef
from zephyr_ray.generation.types import Conversation

# ---------------------------------------------------------------------------------------------------
# Filling
# ---------------------------------------------------------------------------------------------------


def fill(template: str, **values: str) -> str:
    """Replace ``{name}`` placeholders in one pass: text inserted for one placeholder is never
    scanned for another (a completion that contains ``{instruction}`` stays as written), and other
    braces are left alone."""
    return re.sub(r"\{(" + "|".join(map(re.escape, values)) + r")\}", lambda m: values[m.group(1)], template)


def instruction_text(prompt: Any) -> str:
    """The instruction shown to the judge: the prompt string, or a message list as a transcript
    (a single user turn is shown as its bare text)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# ---------------------------------------------------------------------------------------------------
# UltraFeedback aspect templates (AIF)
# ---------------------------------------------------------------------------------------------------

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
# Judge templates hold these placeholders; anything else in braces is literal text.
PLACEHOLDERS = ("instruction", "completion")


def load_templates(directory: str | Path, aspects: Sequence[str] = ASPECTS) -> dict[str, str]:
    """``{aspect: template}`` from ``<directory>/<aspect>.txt``; each must contain every placeholder."""
    directory = Path(directory)
    templates = {}
    for aspect in aspects:
        path = directory / f"{aspect}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no judge template for aspect {aspect!r}: {path} does not exist")
        text = path.read_text(encoding="utf-8")
        missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in text]
        if missing:
            raise ValueError(f"{path}: missing placeholder(s) {', '.join('{' + p + '}' for p in missing)}")
        templates[aspect] = text
    return templates


def judge_conversation(template: str, prompt: Any, completion: str) -> Conversation:
    """The chat the judge sees: one user turn, the template filled with instruction and completion."""
    return [{"role": "user", "content": fill(template, instruction=instruction_text(prompt), completion=completion)}]


# ---------------------------------------------------------------------------------------------------
# FastChat judge prompts (evaluation)
# ---------------------------------------------------------------------------------------------------

SINGLE, PAIRWISE = "single", "pairwise"

# What a prompt of each role must be able to show the judge.
ROLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "single": (SINGLE, ("question", "answer")),
    "single-reference": (SINGLE, ("question", "answer", "ref_answer_1")),
    "single-multi-turn": (SINGLE, ("question_1", "answer_1", "question_2", "answer_2")),
    "single-reference-multi-turn": (SINGLE, ("question_1", "answer_1", "question_2", "answer_2", "ref_answer_1",
                                             "ref_answer_2")),
    "pairwise": (PAIRWISE, ("question", "answer_a", "answer_b")),
}


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str = ""

    def conversation(self, **values: str) -> Conversation:
        """The judge's chat: the system prompt (if any), then the template filled with ``values``."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        messages.append({"role": "user", "content": fill(self.prompt_template, **values)})
        return messages


def _validate_prompt(row: dict[str, Any]) -> JudgePrompt:
    for name in ("name", "prompt_template"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise RowProblem(name, f"expected a non-empty string, got {row.get(name)!r:.60}")
    if row.get("type") not in (SINGLE, PAIRWISE):
        raise RowProblem("type", f"expected 'single' or 'pairwise', got {row.get('type')!r:.60}")
    system = row.get("system_prompt", "")
    if not isinstance(system, str):
        raise RowProblem("system_prompt", f"expected a string, got {type(system).__name__}")
    fmt = row.get("output_format", "")
    return JudgePrompt(row["name"], row["type"], system, row["prompt_template"], fmt if isinstance(fmt, str) else "")


def load_judge_prompts(path: str) -> dict[str, JudgePrompt]:
    """``{name: JudgePrompt}`` from a FastChat ``judge_prompts.jsonl``; a bad line raises naming file, line, field."""
    prompts: dict[str, JudgePrompt] = {}
    with fsspec.open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            ref = RowRef(path, number, "line")
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowProblem("<json>", f"expected an object, got {type(row).__name__}")
                prompt = _validate_prompt(row)
            except json.JSONDecodeError as exc:
                raise BadRowError(f"{ref}: field <json>: malformed JSON ({exc.msg} at column {exc.colno})") from None
            except RowProblem as problem:
                raise BadRowError(f"{ref}: {problem}") from None
            if prompt.name in prompts:
                raise BadRowError(f"{ref}: field name: judge prompt {prompt.name!r} is defined twice")
            prompts[prompt.name] = prompt
    if not prompts:
        raise ValueError(f"{path}: no judge prompts")
    return prompts


def require_prompt(prompts: dict[str, JudgePrompt], name: str, role: str, source: str) -> JudgePrompt:
    """The prompt ``name``, checked to be of the right type and to hold every placeholder ``role`` needs."""
    kind, needed = ROLES[role]
    if name not in prompts:
        raise ValueError(f"{source}: no judge prompt named {name!r} (needed for {role} grading); "
                         f"the file has {sorted(prompts)}")
    prompt = prompts[name]
    if prompt.type != kind:
        raise ValueError(f"{source}: judge prompt {name!r} has type {prompt.type!r}; {role} grading needs {kind!r}")
    missing = [p for p in needed if "{" + p + "}" not in prompt.prompt_template]
    if missing:
        raise ValueError(f"{source}: judge prompt {name!r}: prompt_template lacks "
                         f"{', '.join('{' + p + '}' for p in missing)}")
    return prompt
