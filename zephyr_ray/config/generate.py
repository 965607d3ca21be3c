"""The generate recipe: one model's completions for a prompt set."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import EngineConfig, PromptsConfig, RunConfig
from zephyr_ray.sampling import SamplingParams


@dataclass
class GenerateRecipe:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="generate", output_dir="runs/generate"))
