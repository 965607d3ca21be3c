"""The dDPO recipe: the shared training sections plus the preference loss and its frozen reference."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import ActorPoolConfig, TrainingRecipe
from zephyr_ray.config.loader import choice


@dataclass
class ReferenceConfig(ActorPoolConfig):
    # precompute: Ray actors stream the frozen model's log-probs into the data once (workers never hold
    # it); online: each worker keeps its own frozen copy (for data made on the fly).
    mode: str = choice("precompute", "online")
    # The frozen reference; None = the policy's starting point (model.path), i.e. the dSFT model.
    path: str | None = None


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = choice("sigmoid", "ipo", "hinge")
    label_smoothing: float = 0.0
    # Weight of an NLL term on the chosen response (RPO); 0 disables it.
    rpo_alpha: float = 0.0
    max_prompt_length: int = 512
    ref: ReferenceConfig = field(default_factory=ReferenceConfig)


@dataclass
class DPORecipe(TrainingRecipe):
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between sections: checked at load time."""
        if self.dpo.max_prompt_length >= self.data.max_length:
            return [("dpo.max_prompt_length", f"leaves no room for a response in data.max_length={self.data.max_length}"
                                              "; make it smaller than data.max_length")]
        return []
