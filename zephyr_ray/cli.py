"""``zephyr-ray <stage> --config FILE key=value ...``

A stage's module is imported only when its subcommand runs, after its config loaded and its input paths were
checked: ``--help``, a config error and a path error answer without importing torch or Ray."""

from __future__ import annotations

import argparse
import logging
import sys

from zephyr_ray.config import (
    AIFRecipe,
    ConfigError,
    DPORecipe,
    EvalRecipe,
    GenerateRecipe,
    LeaderboardRecipe,
    PipelineRecipe,
    SelfInstructRecipe,
    ServeRecipe,
    SFTRecipe,
    load_config,
)
from zephyr_ray.inputs import check_paths, pipeline_path_problems, user_error, write_trace
from zephyr_ray.publish import pipeline_push_records, push_exit_code, stage_push_record


def _sft(cfg: SFTRecipe) -> str:
    from zephyr_ray.train.sft import run_sft

    result = run_sft(cfg)
    return f"dSFT finished at step {result.steps} (loss {result.final_metrics.get('loss')}); model: {result.model_dir.absolute()}"


def _dpo(cfg: DPORecipe) -> str:
    from zephyr_ray.train.dpo import run_dpo

    result = run_dpo(cfg)
    m = result.final_metrics
    return (f"dDPO finished at step {result.steps} (loss {m.get('loss')}, reward accuracy {m.get('rewards/accuracies')}, "
            f"margin {m.get('rewards/margins')}); model: {result.model_dir.absolute()}")


def _generate(cfg: GenerateRecipe) -> str:
    from zephyr_ray.generation.run import run_generate

    return f"completions: {run_generate(cfg).absolute()}"


def _aif(cfg: AIFRecipe) -> str:
    from zephyr_ray.feedback.aif import run_aif

    result = run_aif(cfg)
    return f"{result.pairs} preference pairs ({result.skipped} prompts skipped): {result.path.absolute()}"


def _selfinstruct(cfg: SelfInstructRecipe) -> str:
    from zephyr_ray.feedback.selfinstruct import run_selfinstruct

    return f"dialogues: {run_selfinstruct(cfg).absolute()}"


def _eval(cfg: EvalRecipe) -> str:
    from zephyr_ray.eval.run import run_eval

    result = run_eval(cfg)
    return f"evaluation report: {result.report.absolute()} (results.json, chart and judgments in {result.dir.absolute()})"


def _leaderboard(cfg: LeaderboardRecipe) -> str:
    from zephyr_ray.eval.leaderboard_run import run_leaderboard

    result = run_leaderboard(cfg)
    return f"leaderboard report: {result.report.absolute()} (results.json in {result.dir.absolute()})"


STAGES = {
    "sft": (SFTRecipe, _sft, "distilled supervised fine-tuning (dSFT)"),
    "dpo": (DPORecipe, _dpo, "distilled direct preference optimisation (dDPO)"),
    "generate": (GenerateRecipe, _generate, "completions of one model for a prompt set"),
    "aif": (AIFRecipe, _aif, "AI feedback: candidates answer, judges rate, best vs random lower become pairs"),
    "selfinstruct": (SelfInstructRecipe, _selfinstruct, "multi-turn dSFT dialogues written by a teacher from seed prompts"),
    "eval": (EvalRecipe, _eval, "MT-Bench and AlpacaEval-style win rate with an LLM judge; radar chart and report"),
    "leaderboard": (LeaderboardRecipe, _leaderboard,
                    "Open LLM Leaderboard-style multiple-choice log-likelihood tasks (ARC, HellaSwag, MMLU, TruthfulQA)"),
}


def _loaded(args: argparse.Namespace, schema: type) -> object:
    """The recipe, its input paths checked before Ray starts; its run folder noted for the error log."""
    cfg = load_config(args.config, args.overrides, schema)
    args.run_dir = getattr(getattr(cfg, "run", None), "output_dir", None)
    if schema is PipelineRecipe:
        problems = pipeline_path_problems(cfg)
        if problems:
            raise ConfigError("; ".join(problems))
    else:
        check_paths(cfg)
    return cfg


def _run_stage(args: argparse.Namespace) -> int:
    schema, run, _ = STAGES[args.command]
    cfg = _loaded(args, schema)
    print(run(cfg))
    return push_exit_code([stage_push_record(cfg)])  # PUSH_FAILED_EXIT when run.push_to_hub failed


def _chat(args: argparse.Namespace) -> int:
    from zephyr_ray.generation import chat

    for turn in chat(args.model, args.prompts, args.max_new_tokens):
        print(f"user: {turn['user']}\nassistant: {turn['assistant']}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    cfg = _loaded(args, ServeRecipe)
    from zephyr_ray.serve.app import run_server  # after the config: its errors answer without importing Ray

    run_server(cfg, detach=args.detach, ready=lambda msg: print(msg, flush=True))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from zephyr_ray.pipeline import run_pipeline

    if (args.config is None) == (args.resume is None):
        raise ConfigError("pipeline needs exactly one of --config FILE and --resume runs/<id>")
    if args.resume and args.overrides:
        raise ConfigError("--resume continues a run with the config it started with; overrides are not allowed")
    if args.resume:
        args.run_dir = args.resume
    cfg = _loaded(args, PipelineRecipe) if args.config else None
    args.run_dir = args.resume  # a new run's folder does not exist yet
    result = run_pipeline(cfg, resume=args.resume, echo=lambda msg: print(msg, flush=True))
    return push_exit_code(pipeline_push_records(result.manifest))  # PUSH_FAILED_EXIT when a push failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zephyr-ray", description="The Zephyr alignment recipe on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_) in STAGES.items():
        stage = sub.add_parser(name, help=help_)
        stage.add_argument("--config", required=True, help=f"recipe YAML, e.g. configs/tiny/{name}.yaml")
        stage.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.output_dir=runs/x")
        stage.set_defaults(func=_run_stage)
    chat = sub.add_parser("chat", help="greedy replies from an exported model, one per prompt")
    chat.add_argument("--model", required=True,
                      help="HF model folder (e.g. runs/<id>/dpo/model), a .gguf file or smollm2-135m-instruct")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("prompts", nargs="+")
    chat.set_defaults(func=_chat)
    pipe = sub.add_parser("pipeline", help="the whole recipe: dSFT -> AIF -> dDPO -> eval (-> serve) in runs/<timestamp>/")
    pipe.add_argument("--config", help="pipeline recipe YAML, e.g. configs/tiny/pipeline.yaml")
    pipe.add_argument("--resume", metavar="RUN_DIR", help="continue runs/<id> from its first unfinished stage")
    pipe.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.train.epochs=2")
    pipe.set_defaults(func=_pipeline)
    srv = sub.add_parser("serve", help="OpenAI-compatible chat endpoint on Ray Serve (until Ctrl-C)")
    srv.add_argument("--config", required=True, help="serve recipe YAML, e.g. configs/tiny/serve.yaml")
    srv.add_argument("--detach", action="store_true",
                     help="deploy onto the cluster (RAY_ADDRESS) and exit, leaving the app running")
    srv.add_argument("overrides", nargs="*", help="key=value overrides, e.g. serve.port=8000")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "leaderboard"]:  # the leaderboard is an evaluation: `zephyr-ray eval leaderboard` works too
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a user error ends as one line and exit code 2; anything else keeps its traceback
        message = user_error(exc)
        if message is None:
            raise
        trace = write_trace(exc, getattr(args, "run_dir", None))
        print(f"{message} (full trace: {trace})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
