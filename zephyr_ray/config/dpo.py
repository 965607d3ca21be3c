"""The dDPO recipe: the shared training sections plus the preference loss and its frozen reference."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import ActorPoolConfig, TrainingRecipe
from zephyr_ray.config.loader import choice

# Losses that score the policy alone: no reference model is loaded and no reference pass runs.
REFERENCE_FREE_LOSSES = ("simpo", "orpo")


@dataclass
class ReferenceConfig(ActorPoolConfig):
    # precompute: Ray actors stream the frozen model's log-probs into the data once (workers never hold
    # it); online: each worker keeps its own frozen copy (for data made on the fly).
    mode: str = choice("precompute", "online")
    # The frozen reference; None = the policy's starting point (model.path), i.e. the dSFT model.
    path: str | None = None


@dataclass
class SimPOConfig:
    """SimPO (Meng et al., 2024): -log σ(β·avg logp_chosen - β·avg logp_rejected - γ), no reference model."""

    # β, the scale of the length-normalised reward β·logp/|y| (the paper's Llama-3-Base setting); > 0.
    beta: float = 2.0
    # γ, the target reward margin the chosen answer must beat the rejected one by (TRL's simpo_gamma; the
    # SimPO repo configures γ/β instead); >= 0.
    gamma: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong): checked at load time."""
        out = []
        if self.beta <= 0:
            out.append(("beta", "must be > 0"))
        if self.gamma < 0:
            out.append(("gamma", "must be >= 0"))
        return out


@dataclass
class ORPOConfig:
    """ORPO (Hong et al., 2024): NLL of the chosen answer + λ·(-log σ(log odds ratio)), no reference model."""

    # λ, the weight of the odds-ratio term against the chosen answer's NLL (the paper's λ, TRL's
    # ORPOConfig.beta); > 0 (0 would be plain SFT on the chosen answers: use the dSFT stage).
    lambda_: float = 0.1

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong): checked at load time."""
        return [("lambda_", "must be > 0")] if self.lambda_ <= 0 else []


@dataclass
class KTOConfig:
    """KTO (Ethayarajh et al., 2024) on unpaired rows {prompt, completion, label}; its β is ``dpo.beta``."""

    # λ_D, the loss weight of desirable rows (label true); > 0. The paper advises
    # desirable_weight·n_desirable / (undesirable_weight·n_undesirable) within [1, 4/3] (a warning otherwise).
    desirable_weight: float = 1.0
    # λ_U, the loss weight of undesirable rows (label false); > 0.
    undesirable_weight: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong): checked at load time."""
        return [(key, "must be > 0") for key in ("desirable_weight", "undesirable_weight") if getattr(self, key) <= 0]


@dataclass
class DPOConfig:
    # β: the reward scale of sigmoid/ipo/hinge/apo_zero and of kto (simpo: dpo.simpo.beta; orpo: dpo.orpo.lambda_); > 0.
    beta: float = 0.1
    # sigmoid (DPO), ipo, hinge, apo_zero (APO-zero: lifts the chosen answer's own likelihood, for chosen answers
    # better than the model's; TRL's name): pairs against the frozen reference. simpo, orpo: pairs, no reference model
    # (dpo.simpo / dpo.orpo). kto: unpaired rows {prompt, completion, label} (true = desirable) against the
    # reference, with a KL estimate from mismatched (prompt, completion) pairs in each micro-batch (dpo.kto).
    loss_type: str = choice("sigmoid", "ipo", "hinge", "apo_zero", "simpo", "orpo", "kto")
    # Conservative DPO's label noise (sigmoid, ipo, hinge only).
    label_smoothing: float = 0.0
    # Weight of an NLL term on the chosen response (RPO; with simpo, CPO-SimPO); 0 disables it. Not with orpo
    # (its loss has that term already) or kto (no pairs).
    rpo_alpha: float = 0.0
    # Divide each answer's policy and reference log-probs by its token count before sigmoid/ipo/hinge/apo_zero: the
    # implicit reward becomes β × the mean log-ratio per answer token, so an answer's length no longer scales its
    # reward (length-normalised DPO, Tulu 3's dpo_norm). β then acts per token: ~10-50× the summed scale (Tulu 3: 5).
    length_normalize: bool = False
    max_prompt_length: int = 512
    # The frozen reference of sigmoid/ipo/hinge/apo_zero/kto; simpo and orpo use none (leave it at its defaults there).
    ref: ReferenceConfig = field(default_factory=ReferenceConfig)
    # loss_type=simpo's hyper-parameters.
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    # loss_type=orpo's hyper-parameters.
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    # loss_type=kto's hyper-parameters.
    kto: KTOConfig = field(default_factory=KTOConfig)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the policy with a frozen reference (no for simpo and orpo)."""
        return self.loss_type not in REFERENCE_FREE_LOSSES

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between the loss and its settings: checked at load time."""
        out = []
        if self.beta <= 0:
            out.append(("beta", "must be > 0"))
        if not self.needs_reference:
            defaults = ReferenceConfig()
            if self.ref.path is not None:
                out.append(("ref.path", f"loss_type={self.loss_type} uses no reference model; remove dpo.ref.path"))
            if self.ref.mode != defaults.mode:
                out.append(("ref.mode", f"loss_type={self.loss_type} uses no reference model; remove dpo.ref.mode"))
        if self.label_smoothing and self.loss_type not in ("sigmoid", "ipo", "hinge"):
            out.append(("label_smoothing", f"applies to sigmoid, ipo and hinge only, not loss_type={self.loss_type}"))
        if self.rpo_alpha and self.loss_type in ("orpo", "kto"):
            why = "orpo's loss has the chosen answer's NLL already" if self.loss_type == "orpo" else "kto has no pairs"
            out.append(("rpo_alpha", f"not with loss_type={self.loss_type}: {why}"))
        if self.length_normalize and self.loss_type in ("simpo", "orpo", "kto"):
            why = "its log-probs are per token already" if self.loss_type != "kto" else "kto scores unpaired rows"
            out.append(("length_normalize", f"applies to sigmoid, ipo, hinge and apo_zero, not loss_type="
                                            f"{self.loss_type}: {why}"))
        return out


@dataclass
class DPORecipe(TrainingRecipe):
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between sections: checked at load time."""
        if self.dpo.max_prompt_length >= self.data.max_length:
            return [("dpo.max_prompt_length", f"leaves no room for a response in data.max_length={self.data.max_length}"
                                              "; make it smaller than data.max_length")]
        if self.dpo.loss_type == "kto" and self.train.micro_batch_size < 2:
            return [("train.micro_batch_size", "loss_type=kto estimates its KL term from mismatched pairs within a "
                                               "micro-batch: it needs at least 2 rows")]
        return []
