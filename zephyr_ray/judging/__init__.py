"""LLM-as-a-judge, shared by AI feedback (UltraFeedback ratings) and evaluation (MT-Bench grades, pairwise
verdicts): what the judge is shown, how it is asked (one retry loop; or option probabilities in ``expected``
mode), and how its answers are read.

- :mod:`~zephyr_ray.judging.prompts`: placeholder filling, UltraFeedback aspect templates, FastChat judge prompts;
- :mod:`~zephyr_ray.judging.parsing`: free-text ratings, ``[[rating]]`` / ``[[verdict]]``, expected ratings;
- :mod:`~zephyr_ray.judging.asking`: :func:`judge_with_retries` and the expected mode.

Pure and Ray-free; it sits below ``feedback/`` and ``eval/`` (which never import each other) and above
``generation/`` (whose engines it calls).
"""

from zephyr_ray.judging.asking import (
    EXPECTED,
    EXPECTED_OPTIONS,
    EXPECTED_PREFIX,
    EXPECTED_SUFFIX,
    GENERATE,
    RATING_PREFIX,
    RETRY_TEMPERATURE,
    Judged,
    judge_expected,
    judge_with_retries,
    option_distributions,
)
from zephyr_ray.judging.parsing import (
    PARSERS,
    SCORE_HIGH,
    SCORE_LOW,
    TIE,
    VERDICTS,
    Verdict,
    decided,
    expected_rating,
    parse_rating,
    parse_score,
    parse_verdict,
    verdict_probs,
)
from zephyr_ray.judging.prompts import (
    ASPECTS,
    PAIRWISE,
    PLACEHOLDERS,
    ROLES,
    SINGLE,
    JudgePrompt,
    fill,
    instruction_text,
    judge_conversation,
    load_judge_prompts,
    load_templates,
    require_prompt,
)

__all__ = [
    "ASPECTS", "EXPECTED", "EXPECTED_OPTIONS", "EXPECTED_PREFIX", "EXPECTED_SUFFIX", "GENERATE", "PAIRWISE",
    "PARSERS", "PLACEHOLDERS", "RATING_PREFIX", "RETRY_TEMPERATURE", "ROLES", "SCORE_HIGH", "SCORE_LOW", "SINGLE",
    "TIE", "VERDICTS", "JudgePrompt", "Judged", "Verdict", "decided", "expected_rating", "fill", "instruction_text",
    "judge_conversation", "judge_expected", "judge_with_retries", "load_judge_prompts", "load_templates",
    "option_distributions", "parse_rating", "parse_score", "parse_verdict", "require_prompt", "verdict_probs",
]
