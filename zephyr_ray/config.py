"""Typed recipe configs: OmegaConf structured dataclasses loaded from YAML plus ``key=value`` overrides.

Every stage has one root dataclass. Loading fails before any work starts on an unknown key, a wrong
type or a value outside a field's choices, and the message names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from zephyr_ray.generation.types import SamplingParams
from zephyr_ray.models import TINY_FAMILY_NAMES

PROJECT_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe config that cannot be used as written."""


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to ``choices`` (checked at load time)."""
    return field(default=default, metadata={"choices": (default, *choices)})


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
    # Each window's rows go out longest first (dSFT: without packing; dDPO: always), so a micro-batch holds
    # rows of similar length: padded, it pads little (transformers' group_by_length, with the window as its
    # mega-batch); packed, the workers' micro-batches of a step are alike and none waits for another.
    group_by_length: bool = True
    shuffle: bool = True
    # Rows shuffled together (a seeded permutation of each window of the input, in input order): streaming, so
    # memory does not grow with the data, unlike a global shuffle, which holds every row before the first goes out.
    shuffle_window: int = 8192
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

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = []
        if not 0 <= self.eval_fraction < 1:
            out.append(("eval_fraction", "must be within [0, 1)"))
        if self.shuffle_window < 1:
            out.append(("shuffle_window", "must be at least 1 row"))
        if self.eval_fraction and self.eval_path:
            out.append(("eval_fraction", f"holds out part of data.path, but data.eval_path={self.eval_path!r} is "
                                         "set too: give one of them"))
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
    # The stage's summary (aif_report.json) as one W&B run named run.name in group wandb.group.
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SelfInstructRecipe:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    teacher: EngineConfig = field(default_factory=lambda: EngineConfig(name="teacher"))
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.95))
    # User/assistant exchanges per dialogue (the teacher writes every user turn after the seed).
    turns: int = 3
    next_user_template: str = "configs/prompts/selfinstruct/next_user.txt"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="selfinstruct", output_dir="runs/selfinstruct"))


MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
# FastChat's gen_model_answer.py temperatures per category.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


@dataclass
class EvalJudgeConfig:
    """The LLM judge of MT-Bench and AlpacaEval (any backend: a local model, vLLM, GPT-4 over HTTP)."""

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(name="judge"))
    # Judge prompts in FastChat's judge_prompts.jsonl format ({name, type, system_prompt, prompt_template, ...}).
    prompts: str = "data/sample/mt_bench/judge_prompts.jsonl"
    # FastChat judges greedily with up to 2048 new tokens.
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=2048))
    # Calls per judgment; an unparseable one is retried (new seed, temperature > 0), then counted as failed.
    max_attempts: int = 3
    # generate: FastChat's way, the judge writes an explanation and [[rating]] / [[A]] (parsed, retried; for
    # GPT-4-class judges). expected: its answer is prefilled up to the verdict and one forward pass scores the
    # options (rating = sum_k k * P(k), verdicts as probabilities); a small local judge then scores every answer.
    # expected needs next-token log-probs: engine.backend transformers or vllm (sampling, max_attempts unused).
    mode: str = choice("generate", "expected")

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        if self.mode == "expected" and self.engine.backend == "openai":
            return [("mode", "expected scores the options with the judge's log-probabilities, which the openai "
                             "backend (chat text over HTTP) does not give; use judge.engine.backend=transformers or "
                             "vllm, or judge.mode=generate")]
        return []


@dataclass
class MTBenchConfig:
    enabled: bool = True
    # FastChat's question.jsonl format: question_id, category, turns (2 strings), optional reference.
    questions: str = "data/sample/mt_bench/question.jsonl"
    # FastChat reference answers (question_id, choices[0].turns, e.g. reference_answer/gpt-4.jsonl); where a
    # question has none there, its own `reference` field is used.
    reference_answers: str | None = None
    # Valid categories (a question outside them is a bad row), and those graded against a reference.
    categories: list[str] = field(default_factory=lambda: list(MT_BENCH_CATEGORIES))
    reference_categories: list[str] = field(default_factory=lambda: ["math", "reasoning", "coding"])
    # Keep the first N questions of each category, then the first `limit` (None: all).
    per_category: int | None = None
    limit: int | None = None
    on_bad_row: str = choice("error", "skip")
    # Answer temperature per category (FastChat's); a category not listed uses sampling.temperature.
    temperatures: dict[str, float] = field(default_factory=lambda: dict(MT_BENCH_TEMPERATURES))
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=1024))
    # Judge prompt names; "<name>-multi-turn" grades the second turn.
    prompt: str = "single-v1"
    reference_prompt: str = "single-math-v1"


@dataclass
class AlpacaEvalConfig:
    enabled: bool = True
    # Rows with `instruction` or `prompt`; they may carry outputs (grouped `completions: [{model, text}]`, or flat
    # `output`/`completion` + `generator`/`model`, e.g. AlpacaEval's model_outputs.json).
    instructions: str = "data/sample/prompts.jsonl"
    limit: int | None = None
    on_bad_row: str = choice("error", "skip")
    # The recipe's models answer the instructions ...
    generate: bool = True
    # ... and/or these models' outputs are read from `outputs` (default: the instructions file).
    output_models: list[str] = field(default_factory=list)
    outputs: str | None = None
    # The reference: a model's outputs in `outputs` (e.g. text_davinci_003), else generated by `reference`.
    reference_model: str | None = None
    reference: EngineConfig | None = None
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, max_new_tokens=2048))
    # Pairwise judge prompt (FastChat name); each pair is judged in both orders.
    prompt: str = "pair-v2"
    # Judge agreement: preference rows (`chosen`/`rejected`, or AlpacaEval's output_1/output_2/preference).
    agreement: str | None = None
    agreement_limit: int | None = None


@dataclass
class EvalRecipe:
    # The evaluated models (e.g. the dSFT and the dDPO model); one report compares them.
    models: list[EngineConfig] = field(default_factory=lambda: [EngineConfig()])
    judge: EvalJudgeConfig = field(default_factory=EvalJudgeConfig)
    mt_bench: MTBenchConfig = field(default_factory=MTBenchConfig)
    alpaca_eval: AlpacaEvalConfig = field(default_factory=AlpacaEvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="eval", output_dir="runs/eval"))
    # The stage's summary (results.json, radar chart) as one W&B run named run.name in group wandb.group.
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class LeaderboardTaskConfig:
    """One multiple-choice log-likelihood task (``zephyr_ray/eval/leaderboard.py``)."""

    # Label in results.json and the report.
    name: str = "arc"
    # JSONL rows {question or context, choices: [...], gold: int} (mc2: labels: [1/0 per choice], 1 = true);
    # local or any fsspec URL.
    path: str = "data/sample/leaderboard/arc.jsonl"
    # Prompt of a row: qa = "Question: ...\nAnswer:" (ARC), continuation = the context as is (HellaSwag),
    # mmlu = question + lettered choices + "Answer:" (" A".." scored), truthfulqa = "Q: ...\nA:".
    format: str = choice("qa", "continuation", "mmlu", "truthfulqa")
    # Headline metric: acc (argmax of summed log-probs), acc_norm (of log-prob / characters of the choice),
    # mc2 (normalised probability mass on the true answers; rows need labels).
    metric: str = choice("acc_norm", "acc", "mc2")
    # Examples (with their gold answers) before each scored row; the leaderboard's: ARC 25, HellaSwag 10, MMLU 5,
    # TruthfulQA 0.
    num_fewshot: int = 0
    # Few-shot examples are drawn (seeded, per row) from this file; None = from the first fewshot_pool rows
    # of path, which are then not scored.
    fewshot_path: str | None = None
    # Rows held out at the head of path when fewshot_path is None (None = num_fewshot).
    fewshot_pool: int | None = None
    # Text before the few-shot examples; {subject} is the row's `subject` (underscores as spaces).
    description: str = ""
    # Score the first N rows (after the few-shot pool); None = all.
    limit: int | None = None
    # backend lm_eval: the harness's own task of this name (e.g. arc_challenge, hellaswag, mmlu, truthfulqa_mc2);
    # None = this task's file (path), scored by the harness with this format's prompts.
    lm_eval_task: str | None = None


MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def _leaderboard_tasks() -> list[LeaderboardTaskConfig]:
    """The Open LLM Leaderboard's four tasks and shot counts, on the shipped sample files."""
    sample = "data/sample/leaderboard"
    return [
        LeaderboardTaskConfig("arc", f"{sample}/arc.jsonl", "qa", "acc_norm", 25, lm_eval_task="arc_challenge"),
        LeaderboardTaskConfig("hellaswag", f"{sample}/hellaswag.jsonl", "continuation", "acc_norm", 10,
                              lm_eval_task="hellaswag"),
        LeaderboardTaskConfig("mmlu", f"{sample}/mmlu.jsonl", "mmlu", "acc", 5, description=MMLU_DESCRIPTION,
                              lm_eval_task="mmlu"),
        LeaderboardTaskConfig("truthfulqa_mc2", f"{sample}/truthfulqa_mc.jsonl", "truthfulqa", "mc2", 0,
                              lm_eval_task="truthfulqa_mc2"),
    ]


@dataclass
class LeaderboardRecipe:
    # The evaluated models (e.g. the dSFT and the dDPO model); native needs backend transformers.
    models: list[EngineConfig] = field(default_factory=lambda: [EngineConfig()])
    tasks: list[LeaderboardTaskConfig] = field(default_factory=_leaderboard_tasks)
    # native: our log-likelihood scoring on Ray actor pools; lm_eval: lm-evaluation-harness's simple_evaluate
    # on each model's HF folder with tasks[].lm_eval_task (pip install zephyr-ray[leaderboard]).
    backend: str = choice("native", "lm_eval")
    # Seeds the few-shot draw of every row.
    seed: int = 1234
    run: RunConfig = field(default_factory=lambda: RunConfig(name="leaderboard", output_dir="runs/leaderboard"))
    # The stage's summary (results.json) as one W&B run named run.name in group wandb.group.
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the chat replicas (replaces ``serve.num_replicas`` when enabled)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    # None = min_replicas.
    initial_replicas: int | None = None
    # Replicas are added when the requests in flight per replica (running + queued in it) exceed this.
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0


@dataclass
class ServeConfig:
    """The OpenAI-compatible chat endpoint (``zephyr_ray/serve``)."""

    # Where `zephyr-ray serve` starts the Ray Serve HTTP proxy (a Serve config YAML sets its own http_options).
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "zephyr"
    # The model id of /v1/models, which requests must name; None = engine.name.
    model_name: str | None = None
    # Fixed replica count; ignored when autoscaling.enabled.
    num_replicas: int = 1
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # Requests one replica takes at once (running + waiting for a batch); >= max_batch_size to fill batches.
    max_ongoing_requests: int = 64
    # Requests waiting in Serve for a replica before it answers 503; -1 = unbounded.
    max_queued_requests: int = -1
    # Resources per replica.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    # torch intra-op threads in a replica; None keeps Ray's (OMP_NUM_THREADS = whole CPUs of the replica).
    torch_threads: int | None = None
    # Name of the env var holding the bearer key clients must send; None = no key. Read where the app is built.
    api_key_env: str | None = None
    # Rows (requests x samples) generated together in one batch. Before a batch starts, the batcher waits for as
    # many rows as were in flight when the last batch ended (at most 1/4 of that batch's time, and at most this
    # long between two arrivals); a lone client never waits.
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # A stream sends at most one SSE event per this many seconds (the first token and the end go at once; what
    # comes in between is merged); 0 = an event per token. Each event costs a Ray object between replica and proxy.
    stream_interval_s: float = 0.02
    # All streams of a replica together send about this many SSE events a second at most (each stream's interval
    # grows to live streams / this when that is longer); 0 = no cap.
    stream_events_per_s: float = 200.0
    # Context length (prompt + completion); None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Largest max_tokens a request may ask for, and what a request without one gets (capped by the context).
    max_tokens_limit: int = 4096
    default_max_tokens: int | None = 512
    # OpenAI's defaults for requests that omit them.
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    max_n: int = 8
    # vllm backend: ray.serve.llm's OpenAI app (serve_llm), our ingress around the vLLM engine (ingress; has
    # our validation and API key), or auto = serve_llm when ray.serve.llm imports and no API key is set.
    vllm_app: str = choice("auto", "serve_llm", "ingress")


@dataclass
class ServeRecipe:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(name="zephyr"))
    serve: ServeConfig = field(default_factory=ServeConfig)
    # output_dir holds the tiny model built when engine.path is empty.
    run: RunConfig = field(default_factory=lambda: RunConfig(name="serve", output_dir="runs/serve"))


PIPELINE_STAGES = ("sft", "aif", "dpo", "eval", "serve")


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


RECIPES: dict[str, type] = {"sft": SFTRecipe, "dpo": DPORecipe, "generate": GenerateRecipe, "aif": AIFRecipe,
                            "selfinstruct": SelfInstructRecipe, "eval": EvalRecipe,
                            "leaderboard": LeaderboardRecipe, "serve": ServeRecipe, "pipeline": PipelineRecipe}


def _unknown_key(exc: Exception, schema: type) -> str:
    """Name the unknown key, the section it was looked up in and the keys valid there."""
    key = str(exc.full_key) if getattr(exc, "full_key", None) else str(exc)
    node = getattr(exc, "object_type", None)
    if not dataclasses.is_dataclass(node):
        node = schema
    parent = key.rsplit(".", 1)[0] if "." in key else ("<root>" if node is schema else node.__name__)
    valid = sorted(f.name for f in dataclasses.fields(node))
    return f"unknown key '{key}'; valid keys under {parent}: {', '.join(valid)}"


def _validate(obj: Any, prefix: str = "") -> None:
    """Every field's choices, and each section's own ``problems()`` where it has them."""
    for key, problem in getattr(obj, "problems", list)():
        raise ConfigError(f"{prefix}{key}={getattr(obj, key)!r}: {problem}")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _validate(item, f"{key}[{i}].")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(f.metadata['choices'])}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = SFTRecipe) -> T:
    """Load ``path`` (YAML) over ``schema``'s defaults, apply ``key=value`` overrides, validate."""
    # omegaconf is imported here, not at module level: the dataclasses alone (e.g. for
    # bench/gpu_train_step.py on a bare GPU box) need nothing beyond the standard library.
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    base = OmegaConf.structured(schema)
    source = str(path) if path else "<defaults>"
    try:
        if path is not None:
            data = OmegaConf.load(path)
            for section, recipe in (data.get("recipes") or {}).items():
                if section not in PIPELINE_STAGES or section not in {f.name for f in dataclasses.fields(schema)}:
                    raise ConfigError(f"{path}: recipes.{section}: not a stage section of {schema.__name__}")
                source = f"{recipe} (recipes.{section} of {path})"
                if not Path(resolve_path(recipe)).is_file():
                    raise ConfigError(f"{path}: recipes.{section}: no such file {recipe!r}")
                base = OmegaConf.merge(base, {section: OmegaConf.load(resolve_path(recipe))})
            source = str(path)
            base = OmegaConf.merge(base, data)
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
    _validate(obj)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (for manifests, W&B and Ray task arguments)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], schema: type[T] = SFTRecipe) -> T:
    from omegaconf import OmegaConf

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
