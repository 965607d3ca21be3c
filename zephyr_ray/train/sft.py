"""dSFT recipe: next-token loss on the assistant turns of teacher-written dialogues, on Ray Train + DeepSpeed.

Read top to bottom: the recipe (``SFTRecipe``) → the frozen pass (with ``distill.enabled``, Ray actors hosting
the teacher add its top-k to the packed rows once; ``train/distill.py``) → ``run_stage`` (Ray Train workers
rebuild the recipe and its objective, ``objectives.SFTObjective`` or ``DistillObjective``) → the stage's result.
"""

from __future__ import annotations

from zephyr_ray.config import SFTRecipe
from zephyr_ray.data.sft import sft_examples, sft_schema
from zephyr_ray.train.curves import SFT_PANELS
from zephyr_ray.train.distill import teacher_prepare
from zephyr_ray.train.launch import StageResult, run_stage


def run_sft(cfg: SFTRecipe) -> StageResult:
    """The dSFT stage end to end: the trained model in ``<output_dir>/model``, metrics and curves beside it."""
    # The frozen pass: the teacher's top-k join the rows (its tokenizer is checked first, here, on the driver).
    prepare = teacher_prepare(cfg) if cfg.distill.enabled else None
    return run_stage(cfg, examples=sft_examples, schema=sft_schema(), curves=SFT_PANELS, prepare=prepare)
