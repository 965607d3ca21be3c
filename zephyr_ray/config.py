"""Typed recipe configs: OmegaConf structured dataclasses loaded from YAML plus ``key=value`` overrides.

Every stage has one root dataclass. Loading fails before any work starts on an unknown key, a wrong
type or a value outside a field's choices, and the message names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe config that cannot be used as written."""


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to ``choices`` (checked at load time)."""
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass
class ModelConfig:
    # HF directory or hub id; None builds the tiny random model (tests, demo).
    path: str | None = None
    revision: str | None = None
    attn_implementation: str = choice("sdpa", "eager", "flash_attention_2")
    trust_remote_code: bool = False
    tiny_seed: int = 0


@dataclass
class DataConfig:
    # JSONL / Parquet file or folder, a `datasets` save_to_disk folder, or a hub id; local or fsspec URL.
    path: str = "data/sample/sft.jsonl"
    format: str = choice("auto", "jsonl", "parquet", "hf_disk", "hf_hub")
    split: str = "train"
    max_length: int = 2048
    packing: bool = True
    # Sequences packed together per Ray Data batch (best-fit decreasing within the window).
    pack_window: int = 512
    shuffle: bool = True
    seed: int = 0
    on_bad_row: str = choice("error", "skip")
    # What to do with a dialogue longer than max_length tokens.
    overlong: str = choice("truncate", "skip", "error")
    limit: int | None = None


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    lr_scheduler: str = choice("cosine", "linear", "constant")
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    precision: str = choice("bf16", "fp32")
    gradient_checkpointing: bool = False
    seed: int = 42
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Write the sample ids of every step to samples/rank{r}.jsonl (audits data order and resume).
    trace_samples: bool = False
    # Raise at this step in a run that did not start from a checkpoint (exercises fault tolerance).
    inject_failure_at_step: int | None = None


@dataclass
class DeepSpeedConfig:
    # JSON file; relative paths are looked up from the working directory, then the project root.
    config: str = "configs/deepspeed/zero3.json"
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # Fractional CPUs leave headroom for Ray Data on small machines (2 workers on 2 cores stall at 1.0).
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0


@dataclass
class RunConfig:
    name: str = "sft"
    # Where metrics.jsonl, the exported model and (by default) Ray checkpoints go.
    output_dir: str = "runs/sft"
    # Ray Train storage for checkpoints; must be shared (NFS or s3://) on a multi-node cluster.
    storage_path: str | None = None
    max_failures: int = 0


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "zephyr-ray"
    group: str | None = None
    # auto = online when WANDB_API_KEY is set, offline otherwise.
    mode: str = choice("auto", "offline", "online", "disabled")


@dataclass
class SFTRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ReferenceConfig:
    # precompute: Ray actors stream the frozen model's log-probs into the data once (workers never hold
    # it); online: each worker keeps its own frozen copy (for data made on the fly).
    mode: str = choice("precompute", "online")
    # The frozen reference; None = the policy's starting point (model.path), i.e. the dSFT model.
    path: str | None = None
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    batch_size: int = 16


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
class DPORecipe(SFTRecipe):
    dpo: DPOConfig = field(default_factory=DPOConfig)


RECIPES: dict[str, type] = {"sft": SFTRecipe, "dpo": DPORecipe}


def _valid_keys(schema: type, dotted: str) -> tuple[str, list[str]]:
    """The deepest existing section of ``dotted`` and the keys valid there."""
    node, walked = schema, []
    for part in dotted.split(".")[:-1]:
        sub = typing.get_type_hints(node).get(part)
        if not dataclasses.is_dataclass(sub):
            break
        node = sub
        walked.append(part)
    return ".".join(walked) or "<root>", sorted(f.name for f in dataclasses.fields(node))


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(f.metadata['choices'])}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = SFTRecipe) -> T:
    """Load ``path`` (YAML) over ``schema``'s defaults, apply ``key=value`` overrides, validate."""
    base = OmegaConf.structured(schema)
    source = str(path) if path else "<defaults>"
    try:
        if path is not None:
            base = OmegaConf.merge(base, OmegaConf.load(path))
        source = "command line"
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(base)
    except ConfigKeyError as exc:
        key = str(exc.full_key) if getattr(exc, "full_key", None) else str(exc)
        section, valid = _valid_keys(schema, key)
        raise ConfigError(f"{source}: unknown key '{key}'; valid keys under {section}: {', '.join(valid)}") from None
    except OmegaConfBaseException as exc:
        msg = str(getattr(exc, "msg", exc)).splitlines()[0]
        raise ConfigError(f"{source}: {getattr(exc, 'full_key', None) or '<root>'}: {msg}") from None
    _check_choices(obj)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (for manifests, W&B and Ray task arguments)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], schema: type[T] = SFTRecipe) -> T:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))


def resolve_path(path: str) -> str:
    """A local file found from the cwd first, then the project root (made absolute so Ray workers with
    another cwd find it too); URLs and hub ids come back unchanged."""
    if "://" in path:
        return path
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.exists():
            return str(candidate.absolute())
    return path
