"""Sections every recipe shares: model (with LoRA), data, training, DeepSpeed, scaling, run, W&B, a
generation engine, a prompt set and a frozen-model actor pool."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from zephyr_ray.config.loader import choice
from zephyr_ray.models import TINY_FAMILY_NAMES
from zephyr_ray.templates import template_problem

DEFAULT_DATA_PATH = "data/sample/sft.jsonl"


def chat_template_field() -> Any:
    """``model.chat_template`` / ``engine.chat_template``: checked at load time (a known name or an existing file)."""
    return field(default=None, metadata={"check": template_problem})


def usable_name(name: str) -> bool:
    """Whether ``name`` (a model, judge or task label) can name a folder of a run's outputs."""
    return bool(name) and "/" not in name and name not in (".", "..")


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) instead of full fine-tuning: the base stays frozen, so optimizer state, gradients
    and checkpoints hold only the adapters; the exported model has them merged in (``zephyr_ray/train/lora.py``)."""

    enabled: bool = False
    # Rank of each adapter's update B·A: its capacity (the alignment-handbook's Zephyr QLoRA: 16 dSFT, 128 dDPO).
    r: int = 16
    # The update is scaled by alpha / r, so the step size stays comparable when r changes.
    alpha: int = 32
    # Dropout on the adapters' input: regularises the few trained parameters.
    dropout: float = 0.05
    # Modules that get adapters: peft module names (q_proj, v_proj, ...) or all-linear (every linear layer but
    # the LM head, as QLoRA does).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Store the frozen base in 4 bits (QLoRA: NF4, double quantization, compute in train.precision) or 8 bits
    # with bitsandbytes: a 7B base in ~4 GB instead of ~14. Needs CUDA workers and bitsandbytes (the gpu extra).
    quantize: str = choice("none", "4bit", "8bit")

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = []
        if self.r < 1:
            out.append(("r", "must be >= 1"))
        if self.alpha <= 0:
            out.append(("alpha", "must be > 0"))
        if not 0 <= self.dropout < 1:
            out.append(("dropout", "must be within [0, 1)"))
        if not self.target_modules or ("all-linear" in self.target_modules and len(self.target_modules) > 1):
            out.append(("target_modules", "name modules (e.g. [q_proj, v_proj]) or give [all-linear] alone"))
        if self.quantize in ("4bit", "8bit") and not self.enabled:
            out.append(("quantize", "quantizes the frozen base under LoRA adapters: needs model.lora.enabled=true"))
        return out


@dataclass
class ModelConfig:
    # HF directory or hub id; None builds the tiny random model (tests, demo).
    path: str | None = None
    revision: str | None = None
    # sdpa: PyTorch SDPA, run per packed sequence (attention.sdpa_varlen) on families with transformers'
    # attention interface; flash_attention_2 on GPUs. Either trains a packed micro-batch as one row.
    attn_implementation: str = choice("sdpa", "eager", "flash_attention_2")
    trust_remote_code: bool = False
    tiny_seed: int = 0
    # Family of the tiny random model built when path is None (models.TINY_FAMILIES).
    tiny_arch: str = choice(*TINY_FAMILY_NAMES)
    # Train LoRA/QLoRA adapters instead of every weight (dSFT and dDPO).
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # The chat template trained with, instead of the tokenizer's: a named one (NAMED_TEMPLATES: zephyr, chatml,
    # llama-2, mistral) or a Jinja file; the exported tokenizer carries it. None = the tokenizer's (Zephyr's if none).
    chat_template: str | None = chat_template_field()


@dataclass
class MixtureSource:
    """One source of ``data.mixture`` (``zephyr_ray/data/mixture.py``): its rows, renamed, weighted and split."""

    # Local file or folder (JSONL, Parquet, a `datasets` save_to_disk folder) or a hub dataset id (needs `datasets`).
    path: str = ""
    # The hub dataset's configuration (datasets.load_dataset's name); None = its default.
    config: str | None = None
    # The split of a `datasets` folder or hub id; None = data.split.
    split: str | None = None
    # Source column -> our column, e.g. {conversations: messages} or {question: prompt, good: chosen, bad: rejected};
    # other columns stay as they are. A source column that no row has is an error naming the source and column.
    columns: dict[str, str] = field(default_factory=dict)
    # Rows used per row read (> 0), after the held-out split: 0.5 = a seeded half, 2.5 = every row twice plus a
    # seeded half (data.seed).
    weight: float = 1.0
    # Share in [0, 1) of this source's prompts held out for evaluation, split by prompt text as data.eval_fraction
    # (data/split.py, data.seed); 0 = none.
    eval_fraction: float = 0.0

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        where = f"(source {self.path or '<no path>'})"
        out = []
        if not self.path:
            out.append(("path", "every mixture source needs a path (file, folder or hub dataset id)"))
        if not self.weight > 0:
            out.append(("weight", f"must be > 0 {where}"))
        if not 0 <= self.eval_fraction < 1:
            out.append(("eval_fraction", f"must be within [0, 1) {where}"))
        return out


@dataclass
class DataConfig:
    # JSONL / Parquet file or folder, a `datasets` save_to_disk folder, or a hub id; local or fsspec URL.
    # Exclusive with mixture (leave it at its default or null there).
    path: str | None = DEFAULT_DATA_PATH
    format: str = choice("auto", "jsonl", "parquet", "hf_disk", "hf_hub")
    split: str = "train"
    max_length: int = 2048
    packing: bool = True
    # Sequences packed together per Ray Data batch (best-fit decreasing within the window).
    pack_window: int = 512
    # Each window's rows go out longest first (dSFT: without packing; dDPO: always), so a micro-batch holds
    # rows of similar length: padded, it pads little (transformers' group_by_length, with the window as its
    # mega-batch); packed, the workers' micro-batches of a step are alike and none waits for another.
    group_by_length: bool = True
    shuffle: bool = True
    # Rows shuffled together (a seeded permutation of each window of the input, in input order): streaming, so
    # memory does not grow with the data, unlike a global shuffle, which holds every row before the first goes out.
    shuffle_window: int = 8192
    # Object-store memory (MB) the data pipeline may fill ahead of what consumes it (the planning pass, the stream
    # into the workers): Ray Data's budget, with JSONL read in shards, so the data never sits whole in the store
    # however large it is. Training consumes far slower than reading: a block or two ahead is enough.
    stream_buffer_mb: int = 16
    seed: int = 0
    on_bad_row: str = choice("error", "skip")
    # What to do with a dialogue longer than max_length tokens.
    overlong: str = choice("truncate", "skip", "error")
    limit: int | None = None
    # Held-out rows evaluated during training (train.eval_every): a file/folder/hub id read like path (same format,
    # eval_split, limit). Exclusive with eval_fraction.
    eval_path: str | None = None
    # The split of eval_path to read (datasets folders and hub ids, e.g. test_sft); None = split.
    eval_split: str | None = None
    # Share in [0, 1) of path's prompts held out for evaluation instead (data.split.held_out: by a hash of seed
    # and prompt text, so all rows of one prompt land on one side); 0 = none.
    eval_fraction: float = 0.0
    # Several sources instead of path (dSFT, dDPO; MixtureSource: columns, weight, held-out share each), mixed
    # with seed and read on the driver; data_report.json counts each source's rows read, used and held out.
    mixture: list[MixtureSource] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = self.mixture_problems()
        if not self.path and not self.mixture:
            out.append(("path", "give a data file, folder or hub id (or data.mixture)"))
        if not 0 <= self.eval_fraction < 1:
            out.append(("eval_fraction", "must be within [0, 1)"))
        if self.shuffle_window < 1:
            out.append(("shuffle_window", "must be at least 1 row"))
        if self.stream_buffer_mb < 1:
            out.append(("stream_buffer_mb", "must be at least 1 MB"))
        if self.eval_fraction and self.eval_path:
            out.append(("eval_fraction", f"holds out part of data.path, but data.eval_path={self.eval_path!r} is "
                                         "set too: give one of them"))
        return out

    def mixture_problems(self) -> list[tuple[str, str]]:
        """What ``data.mixture`` rules out elsewhere in ``data``."""
        if not self.mixture:
            return []
        out = []
        if self.path and self.path != DEFAULT_DATA_PATH:
            out.append(("path", f"is exclusive with data.mixture ({len(self.mixture)} sources): give one of them"))
        if self.eval_fraction:
            out.append(("eval_fraction", "holds out part of data.path; with data.mixture, set "
                                         "data.mixture[i].eval_fraction per source"))
        held = [i for i, src in enumerate(self.mixture) if src.eval_fraction]
        if self.eval_path and held:
            out.append(("eval_path", f"data.mixture[{held[0]}].eval_fraction holds out rows too: give one of them"))
        return out


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
    # Evaluate on the held-out rows (data.eval_path / data.eval_fraction) every this many steps and at the last;
    # None = max(1, total steps // 10), i.e. 10 evaluations per run.
    eval_every: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        return [("eval_every", "must be >= 1")] if self.eval_every is not None and self.eval_every < 1 else []


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


# A Hub repo id: owner/name, each part starting and ending with a letter or digit (the Hub's rule).
HUB_REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")


@dataclass
class PushToHubConfig:
    """Publishing to the Hugging Face Hub (``zephyr_ray/publish.py``): clusters are torn down after a run, so the
    model (with a generated model card) goes to a repo. The client reads ``HF_TOKEN`` and ``HF_ENDPOINT``; a
    failed push never loses the local result (it is recorded as ``push: {status: failed, error}``)."""

    enabled: bool = False
    # Target model repo, ``owner/name`` (required when enabled).
    repo_id: str | None = None
    # Create the repo private (ignored when it exists already).
    private: bool = True
    # Branch to commit to; created from main when missing.
    revision: str = "main"
    # Commit summary; None = "zephyr-ray: <stage> model from <output folder>".
    commit_message: str | None = None
    # pipeline.push_to_hub only: the AIF preference pairs' dataset repo; None = ``<repo_id>-aif-pairs``.
    dataset_repo_id: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        if not self.enabled:
            return []
        out = []
        shape = "must name a Hub repo as owner/name (letters, digits, '-', '_', '.')"
        if not self.repo_id:
            out.append(("repo_id", "required with push_to_hub.enabled: " + shape))
        elif not HUB_REPO_ID.fullmatch(self.repo_id):
            out.append(("repo_id", shape))
        if self.dataset_repo_id is not None and not HUB_REPO_ID.fullmatch(self.dataset_repo_id):
            out.append(("dataset_repo_id", shape))
        if not self.revision.strip():
            out.append(("revision", "must name a branch (e.g. main)"))
        if self.commit_message is not None and not self.commit_message.strip():
            out.append(("commit_message", "must not be empty (None = generated)"))
        return out


@dataclass
class RunConfig:
    name: str = "sft"
    # Where metrics.jsonl, the exported model and (by default) Ray checkpoints go.
    output_dir: str = "runs/sft"
    # Ray Train storage for checkpoints; must be shared (NFS or s3://) on a multi-node cluster.
    storage_path: str | None = None
    max_failures: int = 0
    # Training stages (dSFT, dDPO): push the exported model and its card to the Hub when the stage ends.
    push_to_hub: PushToHubConfig = field(default_factory=PushToHubConfig)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "zephyr-ray"
    group: str | None = None
    # auto = online when WANDB_API_KEY is set, offline otherwise.
    mode: str = choice("auto", "offline", "online", "disabled")


@dataclass
class TrainingRecipe:
    """What every training stage (dSFT, dDPO) has; each stage's recipe adds its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ActorPoolConfig:
    """A Ray Data actor pool streaming the training rows through a frozen model once (dDPO's reference,
    dSFT's distillation teacher); ``zephyr_ray/train/frozen.py``."""

    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    # torch threads per actor; None keeps Ray's (whole CPUs reserved, at least 1).
    threads_per_actor: int | None = None
    # Rows (dSFT packed rows, dDPO pairs) per forward pass of the frozen model.
    batch_size: int = 16


@dataclass
class EngineConfig:
    """One generation backend and where it runs (a candidate model, a judge, a teacher)."""

    # Label written next to every completion (e.g. the candidate model's name).
    name: str = "tiny"
    backend: str = choice("transformers", "vllm", "openai")
    # transformers/vllm: HF directory or hub id (None builds the tiny random model of family tiny_arch
    # with tiny_seed); openai: the model name sent to the endpoint.
    path: str | None = None
    revision: str | None = None
    tiny_seed: int = 0
    # Family of that tiny model (models.TINY_FAMILIES).
    tiny_arch: str = choice(*TINY_FAMILY_NAMES)
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
    # torch threads per actor; None keeps Ray's (whole CPUs reserved, at least 1).
    threads_per_actor: int | None = None
    # Prompts per Ray task: the unit that is written, retried after an actor crash, and skipped on resume.
    rows_per_task: int = 64
    # Testing fault tolerance: the first actor to take a task exits mid-task, once per output folder.
    inject_crash_once: bool = False
    # Prompts rendered with this chat template instead of the tokenizer's (model.chat_template's choices). In the
    # pipeline, the trained models use the template saved with them.
    chat_template: str | None = chat_template_field()

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = []
        if self.backend == "openai" and not self.path:
            out.append(("path", "must name the model for the openai backend (e.g. gpt-4-0613)"))
        if self.max_concurrency < 1:
            out.append(("max_concurrency", "must be >= 1"))
        return out


@dataclass
class PromptsConfig:
    # Rows with `prompt` (str) or `messages` (a conversation ending in a user turn); `prompt_id` is
    # optional (sha256 of the prompt when absent). Same readers as training data.
    path: str = "data/sample/prompts.jsonl"
    format: str = choice("auto", "jsonl", "parquet", "hf_disk", "hf_hub")
    split: str = "train"
    limit: int | None = None
    on_bad_row: str = choice("error", "skip")
