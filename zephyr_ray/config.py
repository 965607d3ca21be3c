"""Typed recipe configs: OmegaConf structured dataclasses loaded from YAML plus ``key=value`` overrides.

Every stage has one root dataclass. Loading fails before any work starts on an unknown key, a wrong
type or a value outside a field's choices, and the message names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from zephyr_ray.generation.types import SamplingParams

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
    # torch intra-op threads per worker; None keeps Ray's choice (OMP_NUM_THREADS = whole CPUs reserved,
    # at least 1). On a CPU-only box with fractional workers, more threads than reserved CPUs can pay.
    threads_per_worker: int | None = None


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


@dataclass
class EngineConfig:
    """One generation backend and where it runs (a candidate model, a judge, a teacher)."""

    # Label written next to every completion (e.g. the candidate model's name).
    name: str = "tiny"
    backend: str = choice("transformers", "vllm", "openai")
    # transformers/vllm: HF directory or hub id (None builds the tiny random model with tiny_seed);
    # openai: the model name sent to the endpoint.
    path: str | None = None
    revision: str | None = None
    tiny_seed: int = 0
    precision: str = choice("fp32", "bf16", "fp16")
    attn_implementation: str = choice("sdpa", "eager", "flash_attention_2")
    trust_remote_code: bool = False
    # Conversations per forward batch (transformers; bucketed by prompt length).
    batch_size: int = 16
    # Prompts longer than this many tokens are cut from the left (keeps the latest turns).
    max_prompt_length: int = 2048
    # openai: endpoint, the env var holding the key (never the key itself), concurrency and retries.
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    # Ray actor pool hosting the engine.
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # Prompts per Ray task: the unit that is written, retried after an actor crash, and skipped on resume.
    rows_per_task: int = 64
    # Testing fault tolerance: the first actor to take a task exits mid-task, once per output folder.
    inject_crash_once: bool = False


@dataclass
class PromptsConfig:
    # Rows with `prompt` (str) or `messages` (a conversation ending in a user turn); `prompt_id` is
    # optional (sha256 of the prompt when absent). Same readers as training data.
    path: str = "data/sample/prompts.jsonl"
    format: str = choice("auto", "jsonl", "parquet", "hf_disk", "hf_hub")
    split: str = "train"
    limit: int | None = None
    on_bad_row: str = choice("error", "skip")


@dataclass
class GenerateRecipe:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="generate", output_dir="runs/generate"))


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


@dataclass
class SelfInstructRecipe:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    teacher: EngineConfig = field(default_factory=lambda: EngineConfig(name="teacher"))
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.95))
    # User/assistant exchanges per dialogue (the teacher writes every user turn after the seed).
    turns: int = 3
    next_user_template: str = "configs/prompts/selfinstruct/next_user.txt"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="selfinstruct", output_dir="runs/selfinstruct"))


RECIPES: dict[str, type] = {"sft": SFTRecipe, "dpo": DPORecipe, "generate": GenerateRecipe, "aif": AIFRecipe,
                            "selfinstruct": SelfInstructRecipe}


def _unknown_key(exc: OmegaConfBaseException, schema: type) -> str:
    """Name the unknown key, the section it was looked up in and the keys valid there."""
    key = str(exc.full_key) if getattr(exc, "full_key", None) else str(exc)
    node = getattr(exc, "object_type", None)
    if not dataclasses.is_dataclass(node):
        node = schema
    parent = key.rsplit(".", 1)[0] if "." in key else ("<root>" if node is schema else node.__name__)
    valid = sorted(f.name for f in dataclasses.fields(node))
    return f"unknown key '{key}'; valid keys under {parent}: {', '.join(valid)}"


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{key}[{i}].")
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
            key, value = item.split("=", 1)
            # update() (not a merged dotlist) so `candidates.0.name=x` reaches a list element.
            OmegaConf.update(base, key, OmegaConf.from_dotlist([f"value={value}"]).value, merge=True)
        obj = OmegaConf.to_object(base)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise ConfigError(f"{source}: {_unknown_key(exc, schema)}") from None
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
