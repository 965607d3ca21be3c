"""The pipeline recipe: every stage's recipe as a section, chained dSFT -> AIF -> dDPO -> eval (-> serve)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from zephyr_ray.config.aif import AIFRecipe
from zephyr_ray.config.common import EngineConfig, PushToHubConfig, WandbConfig
from zephyr_ray.config.dpo import DPORecipe
from zephyr_ray.config.eval import EvalRecipe
from zephyr_ray.config.serve import ServeRecipe
from zephyr_ray.config.sft import SFTRecipe


@dataclass
class PipelineConfig:
    # Each run gets <runs_dir>/<timestamp>/ (shared storage on a multi-node cluster).
    runs_dir: str = "runs"
    # The dSFT model joins the AIF candidates (engine settings copied from the first candidate).
    sft_as_candidate: bool = True
    # Deploy the dDPO model on Ray Serve at the end: on a local cluster it serves until Ctrl-C; on a running
    # cluster (RAY_ADDRESS set, e.g. under `ray job submit`) the app stays up after the pipeline exits.
    serve: bool = False
    # After dDPO, the final model answers these prompts greedily (transformers, serve.engine's precision): the
    # answers close the printed summary and summary.json ("chat"), a first look at what the recipe made.
    chat_prompts: list[str] = field(default_factory=list)
    chat_max_new_tokens: int = 48
    # At the end: the dDPO model with a card holding the evaluation table, and the AIF pairs as a dataset repo.
    push_to_hub: PushToHubConfig = field(default_factory=PushToHubConfig)


@dataclass
class PipelineRecipe:
    """dSFT -> AIF -> dDPO -> eval (-> serve). Each stage section is that stage's recipe; the pipeline sets
    the paths that chain them (dSFT model -> AIF candidate, dDPO init and reference, eval model; AIF pairs ->
    dDPO data; dDPO model -> eval, serve), the run folders and the W&B group."""

    # Stage recipe files merged under each section first (the section's own keys override them), e.g.
    # {sft: configs/tiny/sft.yaml}. Read at load time from the YAML only (not from key=value overrides).
    recipes: dict[str, str] = field(default_factory=dict)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sft: SFTRecipe = field(default_factory=SFTRecipe)
    aif: AIFRecipe = field(default_factory=AIFRecipe)
    dpo: DPORecipe = field(default_factory=DPORecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    serve: ServeRecipe = field(default_factory=ServeRecipe)
    # Every stage logs to this project under one group per pipeline run (the run id), one W&B run per stage.
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between stages, wrong however the earlier stages turn out: checked at load time,
        before hours of training."""
        out = []
        if not self.aif.candidates:
            out.append(("aif.candidates", "is empty: nobody answers the prompts, and the dSFT candidate (pipeline."
                                          "sft_as_candidate) copies its engine settings from the first candidate"
                        if self.pipeline.sft_as_candidate else
                        "is empty and pipeline.sft_as_candidate is false: nobody answers"))
        elif self.pipeline.sft_as_candidate and any(c.name == SFT_NAME for c in self.aif.candidates):
            out.append(("aif.candidates", f"the name {SFT_NAME!r} is taken by the pipeline's dSFT candidate"))
        if not self.eval.models:
            out.append(("eval.models", "needs one entry: the template for the dSFT and dDPO engines"))
        for key, engine in (("eval.models[0]", self.eval.models[0] if self.eval.models else None),
                            ("serve.engine", self.serve.engine)):
            if engine is not None and engine.chat_template:
                out.append((f"{key}.chat_template", "the pipeline's trained models carry the template they were "
                                                    "trained with (sft.model.chat_template); unset it"))
        if self.aif.completions:
            out.append(("aif.completions", "pre-generated completions cannot include the dSFT model's answers; unset "
                                           "it in the pipeline"))
        return out

    def validation_view(self) -> PipelineRecipe:
        """The stage sections as the pipeline runs them (the AIF candidates with the dSFT model, dSFT and dDPO as
        the evaluated models), with placeholders for the models that do not exist yet: their rules are checked in
        this form."""
        return replace(self, aif=chained_aif(self, "<dsft model>"),
                       eval=chained_eval(self, "<dsft model>", "<ddpo model>"))


# Labels of the trained models in the AIF candidates and the evaluation.
SFT_NAME, DPO_NAME = "dsft", "ddpo"


def trained_engine(template: EngineConfig, model: str, name: str) -> EngineConfig:
    """A trained model as an engine: ``template``'s backend and resources, the trained weights and the chat
    template saved with them (not ``template``'s override, which belongs to another model)."""
    return replace(template, name=name, path=model, revision=None, chat_template=None)


def chained_aif(cfg: PipelineRecipe, sft_model: str) -> AIFRecipe:
    """The AIF section with the dSFT model as one more candidate (``pipeline.sft_as_candidate``)."""
    aif = cfg.aif
    if not cfg.pipeline.sft_as_candidate:
        return aif
    return replace(aif, candidates=[*aif.candidates, trained_engine(aif.candidates[0], sft_model, SFT_NAME)])


def chained_eval(cfg: PipelineRecipe, sft_model: str, dpo_model: str) -> EvalRecipe:
    """The eval section with dSFT and dDPO side by side, on ``eval.models[0]``'s backend and resources."""
    template = cfg.eval.models[0]
    return replace(cfg.eval, models=[trained_engine(template, sft_model, SFT_NAME),
                                     trained_engine(template, dpo_model, DPO_NAME)])
