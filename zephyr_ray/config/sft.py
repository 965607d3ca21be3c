"""The dSFT recipe: the shared training sections plus logit-level distillation from a teacher."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import ActorPoolConfig, TrainingRecipe
from zephyr_ray.config.loader import choice


@dataclass
class DistillConfig(ActorPoolConfig):
    """Logit-level distillation: the student also learns the teacher's next-token distribution at every trained
    token, from top-k log-probs that the actor pool adds to the rows once (workers never hold the teacher)."""

    enabled: bool = False
    # The teacher (HF directory or hub id). It must share the student's tokenizer (same vocabulary and special
    # tokens, output no larger than the student's): checked before any work.
    teacher: str | None = None
    # With teacher None: the teacher is the tiny random model of model.tiny_arch with this seed (tests, demo).
    teacher_tiny_seed: int | None = None
    # forward_kl: KL(teacher || student), mass-covering (Hinton et al.); reverse_kl: KL(student || teacher),
    # mode-seeking; jsd: generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), see jsd_beta.
    loss: str = choice("forward_kl", "reverse_kl", "jsd")
    # jsd's interpolation in [0, 1] (mixture = beta * teacher + (1 - beta) * student): small ~ forward KL,
    # large ~ reverse KL; 0 and 1 are exactly forward and reverse KL (TRL's GKDTrainer convention).
    jsd_beta: float = 0.5
    # Both distributions are softened by this temperature (> 0) and the divergence scaled by its square, so the
    # gradient's size does not depend on it (Hinton et al., 2015).
    temperature: float = 1.0
    # Weight in [0, 1] of the distillation term; (1 - alpha) goes to the plain next-token loss on the labels.
    alpha: float = 0.5
    # Teacher tokens kept per position (the rest of its mass is one extra bucket): the Parquet cost per token.
    top_k: int = 20

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = []
        if self.enabled and self.teacher is None and self.teacher_tiny_seed is None:
            out.append(("teacher", "required with distill.enabled: an HF directory or hub id sharing the student's "
                                   "tokenizer (or teacher_tiny_seed for a tiny random teacher)"))
        for key in ("alpha", "jsd_beta"):
            if not 0 <= getattr(self, key) <= 1:
                out.append((key, "must be within [0, 1]"))
        if self.temperature <= 0:
            out.append(("temperature", "must be > 0"))
        if self.top_k < 1:
            out.append(("top_k", "must be >= 1"))
        return out


@dataclass
class SFTRecipe(TrainingRecipe):
    distill: DistillConfig = field(default_factory=DistillConfig)
