"""Evaluation as in the Zephyr paper: MT-Bench (multi-turn, single-answer grading 1-10) and AlpacaEval-style
pairwise win rate against a reference model, both with an LLM judge on any generation backend.

- :mod:`~zephyr_ray.eval.judging`: the judge pool's work (prompts, parsers and retries: :mod:`zephyr_ray.judging`);
- :mod:`~zephyr_ray.eval.mt_bench`: questions, reference answers, two-turn answering, scores;
- :mod:`~zephyr_ray.eval.pairwise`: win rate, standard error, position consistency, judge agreement;
- :mod:`~zephyr_ray.eval.report`: radar chart and Markdown report;
- :mod:`~zephyr_ray.eval.run`: the stage (``zephyr-ray eval``) on Ray actor pools.
"""
