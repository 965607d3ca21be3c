"""dSFT: next-token loss on the assistant turns of teacher-written dialogues, on Ray Train + DeepSpeed."""

from __future__ import annotations

from typing import Any

from zephyr_ray.config import SFTRecipe
from zephyr_ray.train.curves import SFT_PANELS
from zephyr_ray.train.launch import StageResult, run_stage
from zephyr_ray.train.objectives import SFTObjective


def _make_objective(cfg: SFTRecipe, model_path: str, device: Any, one_row: bool) -> SFTObjective:
    from zephyr_ray.data.tokenize import cached_tokenizer

    pad_id = cached_tokenizer(model_path).pad_token_id
    if cfg.distill.enabled:
        from zephyr_ray.train.distill import DistillObjective

        return DistillObjective(pad_id, cfg.distill, one_row=one_row)
    return SFTObjective(pad_id, one_row=one_row)


def sft_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the dSFT TorchTrainer."""
    from zephyr_ray.train.loop import run_worker

    run_worker(config, _make_objective, SFTRecipe)


def run_sft(cfg: SFTRecipe) -> StageResult:
    from zephyr_ray.data.sft import sft_examples, sft_schema

    prepare = None
    if cfg.distill.enabled:  # the teacher's top-k join the rows; its tokenizer is checked first, here
        from zephyr_ray.train.distill import teacher_prepare

        prepare = teacher_prepare(cfg)
    return run_stage(cfg, examples=sft_examples, schema=sft_schema(), train_fn=sft_train_loop, curves=SFT_PANELS,
                     prepare=prepare)
