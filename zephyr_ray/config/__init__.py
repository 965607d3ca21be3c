"""Typed recipe configs: OmegaConf structured dataclasses loaded from YAML plus ``key=value`` overrides.

Every stage has one root dataclass (``RECIPES``), in its own module; the sections they share are in
``common``, loading and validation in ``loader``. Everything is re-exported here, so ``from zephyr_ray.config
import X`` is the one import path. This package sits low in the layers: it imports the standard library,
``zephyr_ray.sampling`` and ``zephyr_ray.models`` only (omegaconf when a config loads).
"""

from pathlib import Path
from typing import Any, TypeVar

from zephyr_ray.config import loader
from zephyr_ray.config.aif import AIFRecipe, JudgeConfig
from zephyr_ray.config.common import (
    DEFAULT_DATA_PATH,
    HUB_REPO_ID,
    ActorPoolConfig,
    DataConfig,
    DeepSpeedConfig,
    EngineConfig,
    LoRAConfig,
    MixtureSource,
    ModelConfig,
    PromptsConfig,
    PushToHubConfig,
    RunConfig,
    ScalingConfig,
    TrainConfig,
    TrainingRecipe,
    WandbConfig,
    usable_name,
)
from zephyr_ray.config.dpo import DPOConfig, DPORecipe, ReferenceConfig
from zephyr_ray.config.eval import (
    MT_BENCH_CATEGORIES,
    MT_BENCH_TEMPERATURES,
    AlpacaEvalConfig,
    EvalJudgeConfig,
    EvalRecipe,
    MTBenchConfig,
)
from zephyr_ray.config.generate import GenerateRecipe
from zephyr_ray.config.leaderboard import MMLU_DESCRIPTION, LeaderboardRecipe, LeaderboardTaskConfig
from zephyr_ray.config.loader import (
    PIPELINE_STAGES,
    PROJECT_ROOT,
    ConfigError,
    choice,
    resolve_path,
    to_dict,
    validate,
)
from zephyr_ray.config.pipeline import (
    PipelineConfig,
    PipelineRecipe,
    chained_aif,
    chained_eval,
    trained_engine,
)
from zephyr_ray.config.selfinstruct import SelfInstructRecipe
from zephyr_ray.config.serve import AutoscalingConfig, ServeConfig, ServeRecipe
from zephyr_ray.config.sft import DistillConfig, SFTRecipe
from zephyr_ray.models import TINY_FAMILY_NAMES
from zephyr_ray.sampling import SamplingParams

RECIPES: dict[str, type] = {"sft": SFTRecipe, "dpo": DPORecipe, "generate": GenerateRecipe, "aif": AIFRecipe,
                            "selfinstruct": SelfInstructRecipe, "eval": EvalRecipe,
                            "leaderboard": LeaderboardRecipe, "serve": ServeRecipe, "pipeline": PipelineRecipe}

__all__ = [
    "DEFAULT_DATA_PATH", "HUB_REPO_ID", "MixtureSource", "MMLU_DESCRIPTION", "MT_BENCH_CATEGORIES", "MT_BENCH_TEMPERATURES", "PIPELINE_STAGES", "PROJECT_ROOT", "RECIPES",
    "TINY_FAMILY_NAMES", "AIFRecipe", "ActorPoolConfig", "AlpacaEvalConfig", "AutoscalingConfig", "ConfigError",
    "DPOConfig", "DPORecipe", "DataConfig", "DeepSpeedConfig", "DistillConfig", "EngineConfig", "EvalJudgeConfig",
    "EvalRecipe", "GenerateRecipe", "JudgeConfig", "LeaderboardRecipe", "LeaderboardTaskConfig", "LoRAConfig",
    "MTBenchConfig", "ModelConfig", "PipelineConfig", "PipelineRecipe", "PromptsConfig", "PushToHubConfig", "ReferenceConfig",
    "RunConfig", "SFTRecipe", "SamplingParams", "ScalingConfig", "SelfInstructRecipe", "ServeConfig", "ServeRecipe",
    "TrainConfig", "TrainingRecipe", "WandbConfig", "chained_aif", "chained_eval", "choice", "from_dict",
    "load_config", "resolve_path", "to_dict", "trained_engine", "usable_name", "validate",
]


T = TypeVar("T")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                schema: type[T] | T = SFTRecipe) -> T:
    """:func:`zephyr_ray.config.loader.load_config` with the dSFT recipe as the default schema."""
    return loader.load_config(path, overrides, schema)


def from_dict(data: dict[str, Any], schema: type[T] = SFTRecipe) -> T:
    """:func:`zephyr_ray.config.loader.from_dict` with the dSFT recipe as the default schema."""
    return loader.from_dict(data, schema)
