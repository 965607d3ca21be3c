"""Synthetic sample data the project writes itself: multi-turn dialogues and preference pairs.

The tasks and their builders are ``zephyr_ray.synthetic`` (below the models layer, which trains the tiny
tokenizer on them); this module writes the shipped files.
``python -m zephyr_ray.data.samples data/sample`` regenerates the shipped files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zephyr_ray.data.io import write_jsonl
from zephyr_ray.synthetic import TASKS, sample_dialogues, sample_preferences, sample_prompts, sample_unpaired

__all__ = ["SHIPPED", "TASKS", "sample_dialogues", "sample_preferences", "sample_prompts", "sample_unpaired",
           "write_samples"]

SHIPPED = {"sft.jsonl": lambda: sample_dialogues(256), "prefs.jsonl": lambda: sample_preferences(256),
           "prompts.jsonl": lambda: sample_prompts(64), "kto.jsonl": lambda: sample_unpaired(128)}


def write_samples(out_dir: str | Path) -> None:
    for name, make in SHIPPED.items():
        write_jsonl(make(), Path(out_dir) / name)


if __name__ == "__main__":
    write_samples(sys.argv[1] if len(sys.argv) > 1 else "data/sample")
