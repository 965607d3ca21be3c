"""Self-instruct dialogues for dSFT data, in the ``ultrachat_200k`` schema.

Seed prompt → teacher answers → teacher writes the user's next turn from the dialogue so far →
teacher answers → ... for ``turns`` exchanges. Batched: each round is one ``engine.generate`` over
every dialogue still going for the answers, then one for the next user turns.

Pure and Ray-free: the stage calls :func:`self_instruct` inside Ray Data ``map_batches`` on a batch of
seeds and merges the :class:`SelfInstructReport`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from zephyr_ray.cluster import ensure_ray, open_run
from zephyr_ray.config import SelfInstructRecipe, resolve_path
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.schema import RowProblem, validate_messages
from zephyr_ray.feedback.binarize import stable_prompt_id
from zephyr_ray.generation.pool import KEY, resolve_engine, run_pool
from zephyr_ray.generation.run import load_prompts
from zephyr_ray.generation.types import Conversation, SamplingParams
from zephyr_ray.judging import fill

# Why a dialogue ended before ``turns`` exchanges, or was dropped (keys of the report's counters).
EMPTY_SEED = "empty or malformed seed prompt"
EMPTY_ANSWER = "empty assistant turn"
EMPTY_USER = "empty user turn"
NO_EXCHANGE = "no complete exchange"

_LABEL = re.compile(r"^\s*(?:[*_#>\s]*)(?:user|human|question|next\s+(?:user\s+)?(?:message|turn|question))"
                    r"\s*[*_]*\s*:\s*[*_]*", re.I)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»"}


@dataclass
class SelfInstructReport:
    """Tallies of one :func:`self_instruct` call; :meth:`merge` adds up batches."""

    seeds: int = 0
    dialogues: int = 0  # rows written
    exchanges: int = 0  # user/assistant exchanges in the rows written
    truncated: int = 0  # generated turns that hit max_new_tokens (kept)
    ended_early: Counter = field(default_factory=Counter)  # dialogues kept with fewer than `turns` exchanges
    dropped: Counter = field(default_factory=Counter)  # seeds that gave no row

    def merge(self, other: SelfInstructReport) -> SelfInstructReport:
        self.seeds += other.seeds
        self.dialogues += other.dialogues
        self.exchanges += other.exchanges
        self.truncated += other.truncated
        self.ended_early.update(other.ended_early)
        self.dropped.update(other.dropped)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ended_early": dict(self.ended_early), "dropped": dict(self.dropped)}


def transcript(messages: Sequence[dict[str, str]]) -> str:
    """The dialogue as the teacher sees it when writing the next user turn."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def clean_user_turn(text: str) -> str:
    """The generated user turn without a leading label (``User:``, ``**Question:**``) or wrapping quotes."""
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def next_user_conversation(template: str, messages: Sequence[dict[str, str]]) -> Conversation:
    """The chat that asks the teacher for the user's next turn (``{dialogue}`` in the template)."""
    return [{"role": "user", "content": fill(template, dialogue=transcript(messages))}]


def _generate(engine: Any, conversations: list[Conversation], params: SamplingParams) -> list[tuple[str, bool]]:
    outputs = engine.generate(conversations, params)
    if len(outputs) != len(conversations):
        raise RuntimeError(f"engine returned {len(outputs)} results for {len(conversations)} conversations")
    return [(out[0].text, out[0].finish_reason == "length") if out else ("", False) for out in outputs]


def _seed_messages(seed: dict[str, Any]) -> list[dict[str, str]] | None:
    """The seed's opening turns: ``prompt`` as one user turn, or a ``prompt``/``messages`` list
    (``system``? then alternating turns, ending with the user's); ``None`` if empty or malformed."""
    prompt = seed.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else None
    turns = prompt if prompt is not None else seed.get("messages")
    if turns is None or isinstance(turns, str):
        return None
    turns = list(turns)
    if not turns or not all(isinstance(m, dict) for m in turns) or turns[-1].get("role") != "user":
        return None
    try:  # the schema check wants a final assistant turn; a placeholder stands in for the answer to come
        validate_messages([*turns, {"role": "assistant", "content": "-"}])
    except RowProblem:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def self_instruct(engine: Any, seeds: Sequence[dict[str, Any]], *, turns: int, params: SamplingParams,
                  next_user_template: str, user_params: SamplingParams | None = None
                  ) -> tuple[list[dict[str, Any]], SelfInstructReport]:
    """Dialogues of up to ``turns`` user/assistant exchanges grown from seed prompts by the teacher.

    ``seeds``: rows with ``prompt`` (the first user turn), or ``prompt``/``messages`` as a message list
    ending with a user turn (a system turn is kept), and optionally ``prompt_id`` (default: the SHA-256
    of the prompt). A row's ``prompt`` is the first user turn. ``params`` drive the answers, ``user_params`` (default ``params``) the user
    turns; ``next_user_template`` holds ``{dialogue}``.

    A turn that is empty after stripping ends its dialogue there (the report counts it under
    ``ended_early``); a dialogue needs at least one full exchange, otherwise it is dropped and counted
    under ``dropped``, as are empty seeds. Returns rows ``{"prompt", "prompt_id", "messages"}`` in the
    ``ultrachat_200k`` schema (they pass :func:`zephyr_ray.data.schema.validate_messages`) and the report.
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if "{dialogue}" not in next_user_template:
        raise ValueError("next_user_template has no {dialogue} placeholder")
    params = dataclasses.replace(params, n=1)
    user_params = dataclasses.replace(user_params or params, n=1)
    report = SelfInstructReport(seeds=len(seeds))

    dialogues: list[dict[str, Any]] = []
    for seed in seeds:
        messages = _seed_messages(seed)
        if messages is None:
            report.dropped[EMPTY_SEED] += 1
            continue
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        source = seed.get("prompt") if isinstance(seed.get("prompt"), str) else messages
        dialogues.append({"prompt": first_user, "prompt_id": str(seed.get("prompt_id") or stable_prompt_id(source)),
                          "messages": messages, "ended": None})

    for turn in range(turns):
        active = [d for d in dialogues if d["ended"] is None]
        if not active:
            break
        for d, (text, cut) in zip(active, _generate(engine, [d["messages"] for d in active], params)):
            report.truncated += cut
            if text.strip():
                d["messages"].append({"role": "assistant", "content": text.strip()})
            else:
                d["ended"] = EMPTY_ANSWER
        if turn == turns - 1:
            break
        active = [d for d in dialogues if d["ended"] is None]
        if not active:
            break
        asks = [next_user_conversation(next_user_template, d["messages"]) for d in active]
        for d, (text, cut) in zip(active, _generate(engine, asks, user_params)):
            report.truncated += cut
            question = clean_user_turn(text)
            if question:
                d["messages"].append({"role": "user", "content": question})
            else:
                d["ended"] = EMPTY_USER

    rows = []
    for d in dialogues:
        messages = d["messages"]
        if messages[-1]["role"] == "user":
            messages = messages[:-1]  # a user turn whose answer came back empty
        if len(messages) < 2:
            report.dropped[NO_EXCHANGE] += 1
            continue
        if d["ended"] is not None:
            report.ended_early[d["ended"]] += 1
        validate_messages(messages)
        report.dialogues += 1
        report.exchanges += len(messages) // 2
        rows.append({"prompt": d["prompt"], "prompt_id": d["prompt_id"], "messages": messages})
    return rows, report


def selfinstruct_work(engine: Any, units: list[dict[str, Any]], *, turns: int, params: SamplingParams,
                      next_user_template: str) -> list[dict[str, Any]]:
    """Pool work: one output row per seed (``messages`` None when it was dropped), so a resumed run
    never redoes a seed; the task's report rides on its first row."""
    rows, report = self_instruct(engine, units, turns=turns, params=params, next_user_template=next_user_template)
    made = {r["prompt_id"]: r for r in rows}
    return [{KEY: u[KEY], "prompt_id": u["prompt_id"], "prompt": u["prompt"],
             "messages": made.get(u["prompt_id"], {}).get("messages"),
             "report": json.dumps(report.to_dict()) if i == 0 else None}
            for i, u in enumerate(units)]


def run_selfinstruct(cfg: SelfInstructRecipe) -> Path:
    """``zephyr-ray selfinstruct``: seeds → teacher dialogues in ``run.output_dir/dialogues.jsonl``
    (the dSFT input) and the merged report in ``selfinstruct_report.json``."""
    cfg, out = open_run(cfg)
    ensure_ray()
    template = Path(resolve_path(cfg.next_user_template)).read_text(encoding="utf-8")
    engine = resolve_engine(cfg.teacher, out / "models")
    work = partial(selfinstruct_work, turns=cfg.turns, params=cfg.sampling, next_user_template=template)
    table = run_pool(load_prompts(cfg.prompts), engine, work, out / "dialogues", f"self-instruct [{engine.name}]")
    rows = table.sort_by([("prompt_id", "ascending")]).to_pylist()
    report = SelfInstructReport()
    for r in rows:
        if r["report"]:
            one = json.loads(r["report"])
            report.merge(SelfInstructReport(**{**one, "ended_early": Counter(one["ended_early"]),
                                               "dropped": Counter(one["dropped"])}))
    (out / "selfinstruct_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    path = write_jsonl(({k: r[k] for k in ("prompt", "prompt_id", "messages")} for r in rows if r["messages"]),
                       out / "dialogues.jsonl")
    logging.getLogger(__name__).info("self-instruct: %s; dialogues in %s", report.to_dict(), path.absolute())
    return path
