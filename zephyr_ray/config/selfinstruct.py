"""The self-instruct recipe: a teacher writes multi-turn dialogues from seed prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import EngineConfig, PromptsConfig, RunConfig
from zephyr_ray.sampling import SamplingParams


@dataclass
class SelfInstructRecipe:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    teacher: EngineConfig = field(default_factory=lambda: EngineConfig(name="teacher"))
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.95))
    # User/assistant exchanges per dialogue (the teacher writes every user turn after the seed).
    turns: int = 3
    next_user_template: str = "configs/prompts/selfinstruct/next_user.txt"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="selfinstruct", output_dir="runs/selfinstruct"))

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        return [("turns", "must be >= 1")] if self.turns < 1 else []
