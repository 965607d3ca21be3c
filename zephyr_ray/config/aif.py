"""The AI-feedback recipe: candidates answer a prompt set, judges rate the answers, pairs are binarized."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import EngineConfig, PromptsConfig, RunConfig, WandbConfig
from zephyr_ray.config.loader import choice
from zephyr_ray.sampling import SamplingParams


@dataclass
class JudgeConfig:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(name="judge"))
    # generate: parse "Rating: N" from the judge's text; expected: sum_k k * P(k) from next-token
    # probabilities (local transformers/vllm judges only; never fails to parse).
    mode: str = choice("generate", "expected")
    templates: str = "configs/prompts/ultrafeedback"
    aspects: list[str] = field(default_factory=lambda: ["instruction_following", "honesty", "truthfulness",
                                                        "helpfulness"])
    # Calls per (completion, aspect) before an unparseable rating is marked missing.
    max_attempts: int = 3
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128))

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = []
        if self.mode == "expected" and self.engine.backend == "openai":
            out.append(("mode", "expected needs next-token probabilities (engine.backend transformers or vllm); use "
                                "mode=generate with an OpenAI-compatible endpoint"))
        if self.max_attempts < 1:
            out.append(("max_attempts", "must be >= 1"))
        return out


@dataclass
class AIFRecipe:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    # Each candidate answers every prompt (sampling.n completions each).
    candidates: list[EngineConfig] = field(default_factory=lambda: [EngineConfig()])
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.95))
    # Pre-generated completions (rows: prompt, model, completion[, prompt_id]); skips generation.
    completions: str | None = None
    # Several judges are averaged and their agreement reported.
    judges: list[JudgeConfig] = field(default_factory=lambda: [JudgeConfig()])
    # Picks the random `rejected` (reproducible per prompt_id).
    seed: int = 0
    run: RunConfig = field(default_factory=lambda: RunConfig(name="aif", output_dir="runs/aif"))
    # The stage's summary (aif_report.json) as one W&B run named run.name in group wandb.group.
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between sections: checked at load time."""
        out = []
        names = [c.name for c in self.candidates]
        if not self.completions and len(set(names)) != len(names):
            out.append(("candidates", f"names must be distinct (they label completions): {names}"))
        if not self.judges:
            out.append(("judges", "needs at least one judge"))
        judges = [j.engine.name for j in self.judges]
        if len(set(judges)) != len(judges):
            out.append(("judges", f"engine names must be distinct (they label scores): {judges}"))
        return out
