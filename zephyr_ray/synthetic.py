"""Synthetic checkable tasks (arithmetic, string edits, sorting, code, unicode) as dialogues, preference pairs and
prompts: deterministic, so a tiny model can visibly learn them and a wrong answer makes a clear ``rejected``.

Standard library only and low in the package: the tiny model's tokenizer is trained on these dialogues
(``models.build_tiny``), and ``data.samples`` writes the shipped sample files from them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

WORDS = ["river", "mountain", "café", "naïve", "garden", "rocket", "señor", "über", "piano", "zephyr",
         "lantern", "harbor", "Straße", "jalapeño", "orbit", "meadow", "東京", "данные", "λόγος", "🙂smile"]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a careful tutor who explains each step.",
]

Task = tuple[str, str, str, str]  # question, answer, follow-up question, follow-up answer


def _arith(r: random.Random) -> Task:
    a, b = r.randint(2, 99), r.randint(2, 99)
    return (f"What is {a} + {b}?", f"{a} + {b} = {a + b}.",
            "And if you multiply that by 2?", f"({a + b}) × 2 = {2 * (a + b)}.")


def _reverse(r: random.Random) -> Task:
    w = r.choice(WORDS)
    return (f"Reverse the word '{w}'.", f"Reversed, '{w}' is '{w[::-1]}'.",
            "Now write it in upper case.", f"In upper case: '{w[::-1].upper()}'.")


def _sort(r: random.Random) -> Task:
    xs = r.sample(range(1, 60), 5)
    return (f"Sort these numbers: {', '.join(map(str, xs))}.",
            f"In ascending order: {', '.join(map(str, sorted(xs)))}.",
            "What is the largest one?", f"The largest is {max(xs)}.")


def _code(r: random.Random) -> Task:
    op, sym = r.choice([("add", "+"), ("subtract", "-"), ("multiply", "*")])
    name = f"{op}_{r.choice(['values', 'pair', 'numbers'])}"
    body = f"```python\ndef {name}(a, b):\n    return a {sym} b\n```"
    return (f"Write a Python function named {name} that can {op} two numbers.",
            f"Here it is:\n{body}",
            f"What does {name}(3, 4) return?", f"{name}(3, 4) returns {eval(f'3 {sym} 4')}.")


def _count(r: random.Random) -> Task:
    w = r.choice(WORDS)
    return (f"How many characters are in '{w}'?", f"'{w}' has {len(w)} characters.",
            "And its first character?", f"The first character is '{w[0]}'.")


TASKS: list[Callable[[random.Random], Task]] = [_arith, _reverse, _sort, _code, _count]


def _wrong(answer: str, r: random.Random) -> str:
    """A plausible but wrong or unhelpful answer (the ``rejected`` side)."""
    kind = r.randrange(3)
    if kind == 0:
        return "I am not able to help with that."
    if kind == 1:
        digits = [c for c in answer if c.isdigit()]
        if digits:
            i = answer.rfind(digits[-1])
            return answer[:i] + str((int(digits[-1]) + 1) % 10) + answer[i + 1:]
    return answer.split(" ")[0] + " ... never mind."


def sample_dialogues(n: int, seed: int = 0) -> list[dict]:
    """``n`` dialogues in the ultrachat_200k schema (1-2 turns, system prompt on some)."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        q, a, q2, a2 = r.choice(TASKS)(r)
        messages = []
        if r.random() < 0.3:
            messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if r.random() < 0.5:
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"prompt": q, "prompt_id": f"sft-{seed}-{i:05d}", "messages": messages})
    return rows


def sample_preferences(n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs in the ultrafeedback_binarized schema: the right answer chosen, a wrong one rejected."""
    r = random.Random(seed + 1)
    rows = []
    for i in range(n):
        q, a, _, _ = r.choice(TASKS)(r)
        prompt = [{"role": "user", "content": q}]
        rows.append({
            "prompt": q,
            "prompt_id": f"pref-{seed}-{i:05d}",
            "chosen": prompt + [{"role": "assistant", "content": a}],
            "rejected": prompt + [{"role": "assistant", "content": _wrong(a, r)}],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        })
    return rows


def sample_unpaired(n: int, seed: int = 0) -> list[dict]:
    """KTO's unpaired rows ``{prompt, completion, label}`` from ``n`` preference pairs (TRL's unpairing): each
    pair's right answer (label true, desirable), then its wrong one (false): 2n rows, balanced 1:1."""
    rows = []
    for pair in sample_preferences(n, seed):
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": pair["prompt"], "prompt_id": pair["prompt_id"],
                         "completion": pair[side][-1]["content"], "label": label})
    return rows


def sample_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` single-turn prompts (``prompt``, ``prompt_id``): seeds for AI feedback and self-instruct."""
    r = random.Random(seed + 2)
    return [{"prompt": r.choice(TASKS)(r)[0], "prompt_id": f"prompt-{seed}-{i:05d}"} for i in range(n)]
