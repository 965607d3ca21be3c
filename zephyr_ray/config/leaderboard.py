"""The leaderboard recipe: Open LLM Leaderboard-style multiple-choice log-likelihood tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import EngineConfig, RunConfig, WandbConfig, usable_name
from zephyr_ray.config.loader import choice


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

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = []
        if not usable_name(self.name):
            out.append(("name", "is not usable as a folder name"))
        if self.num_fewshot < 0:
            out.append(("num_fewshot", "must be >= 0"))
        if self.fewshot_pool is not None and self.fewshot_pool < self.num_fewshot:
            out.append(("fewshot_pool", f"is smaller than num_fewshot ({self.num_fewshot})"))
        return out


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

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between sections: checked at load time."""
        out = []
        names, tasks = [m.name for m in self.models], [t.name for t in self.tasks]
        if not names:
            out.append(("models", "needs at least one model"))
        if len(set(names)) != len(names):
            out.append(("models", f"names must be distinct (they label results): {names}"))
        out += [(f"models[{i}].name", "is not usable as a folder name") for i, n in enumerate(names)
                if not usable_name(n)]
        if not tasks:
            out.append(("tasks", "needs at least one task"))
        if len(set(tasks)) != len(tasks):
            out.append(("tasks", f"names must be distinct: {tasks}"))
        for i, m in enumerate(self.models):
            if self.backend == "native" and m.backend != "transformers":
                out.append((f"models[{i}].backend", "backend native scores with transformers (use backend: lm_eval "
                                                    "or a transformers engine)"))
            if self.backend == "lm_eval" and m.backend == "openai":
                out.append((f"models[{i}].backend", "lm_eval runs a local HF model, not backend openai"))
        return out
