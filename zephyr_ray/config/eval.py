"""The eval recipe: MT-Bench and AlpacaEval-style win rate with an LLM judge."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import EngineConfig, RunConfig, WandbConfig, usable_name
from zephyr_ray.config.loader import choice
from zephyr_ray.sampling import SamplingParams

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
        out = []
        if self.mode == "expected" and self.engine.backend == "openai":
            out.append(("mode", "expected scores the options with the judge's log-probabilities, which the openai "
                                "backend (chat text over HTTP) does not give; use judge.engine.backend=transformers or "
                                "vllm, or judge.mode=generate"))
        if self.max_attempts < 1:
            out.append(("max_attempts", "must be >= 1"))
        if not usable_name(self.engine.name):
            out.append(("engine.name", "is not usable as a folder name"))
        return out


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

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        unknown = [c for c in self.reference_categories if c not in self.categories]
        return [("reference_categories", f"{unknown} are not in mt_bench.categories")] if unknown else []


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

    def alpaca_models(self) -> list[str]:
        """The models AlpacaEval judges: the recipe's (when it generates) and those read from outputs."""
        return [*(m.name for m in self.models if self.alpaca_eval.generate), *self.alpaca_eval.output_models]

    def reference_name(self) -> str | None:
        """AlpacaEval's reference: a model of the outputs file, or the generating engine's name."""
        a = self.alpaca_eval
        return a.reference_model if a.reference_model is not None else a.reference.name if a.reference else None

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between sections: checked at load time."""
        out = []
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            out.append(("models", f"names must be distinct (they label answers and results): {names}"))
        out += [(f"models[{i}].name", "is not usable as a folder name") for i, n in enumerate(names)
                if not usable_name(n)]
        a = self.alpaca_eval
        if not self.mt_bench.enabled and not a.enabled:
            out.append(("mt_bench.enabled", "and alpaca_eval.enabled are both false: nothing to evaluate"))
        if self.mt_bench.enabled and not self.models:
            out.append(("models", "mt_bench needs at least one model"))
        if a.enabled:
            evaluated = self.alpaca_models()
            if not evaluated and not a.agreement:
                out.append(("alpaca_eval", "has nothing to judge: no models (generate with models, or "
                                           "alpaca_eval.output_models) and no alpaca_eval.agreement file"))
            if len(set(evaluated)) != len(evaluated):
                out.append(("alpaca_eval.output_models", f"model names must be distinct: {evaluated}"))
            ref = self.reference_name()
            if evaluated and (a.reference_model is None) == (a.reference is None):
                out.append(("alpaca_eval.reference_model", "needs exactly one reference: reference_model (outputs "
                                                           "read from a file) or reference (an engine that generates "
                                                           "them)"))
            elif evaluated and ref is not None and not usable_name(ref):
                out.append(("alpaca_eval", f"reference {ref!r} is not usable as a folder name"))
            elif evaluated and ref in evaluated:
                out.append(("alpaca_eval", f"reference {ref!r} is also an evaluated model"))
        return out
