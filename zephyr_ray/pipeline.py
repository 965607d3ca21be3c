"""The whole recipe in one driver: dSFT -> AIF -> dDPO -> eval (-> serve) in one run folder, resumable.

Each stage is the same code as its standalone command; the pipeline only chains artifacts (paths), gives
every stage its subfolder and the W&B group, and records progress in ``manifest.json`` after every change,
so ``--resume`` restarts at the first unfinished stage (which itself resumes from its checkpoints/parts).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from zephyr_ray.cluster import ensure_ray, output_path
from zephyr_ray.config import (
    PROJECT_ROOT,
    AIFRecipe,
    ConfigError,
    DPORecipe,
    EvalRecipe,
    MixtureSource,
    PipelineRecipe,
    ServeRecipe,
    SFTRecipe,
    chained_aif,
    chained_eval,
    from_dict,
    to_dict,
)
from zephyr_ray.generation import chat
from zephyr_ray.publish import PUSH_RECORD, publish_pipeline, push_lines
from zephyr_ray.tracking import read_metrics

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TRAINING = ("sft", "aif", "dpo", "eval")
PACKAGES = ("zephyr-ray", "ray", "torch", "deepspeed", "transformers", "vllm", "wandb", "omegaconf", "numpy",
            "pyarrow")


# ---------------------------------------------------------------------------------------------------
# Stage configs: the chaining, as pure functions of the pipeline config and the earlier artifacts
# ---------------------------------------------------------------------------------------------------

def _placed(recipe: Any, cfg: PipelineRecipe, run_dir: Path, stage: str) -> Any:
    """``recipe`` writing to ``run_dir/stage`` and logging to W&B under the pipeline run's group."""
    recipe = replace(recipe, run=replace(recipe.run, output_dir=str(run_dir / stage)))
    if hasattr(recipe, "wandb"):
        recipe = replace(recipe, wandb=replace(cfg.wandb, group=cfg.wandb.group or run_dir.name))
    return recipe


def sft_config(cfg: PipelineRecipe, run_dir: Path) -> SFTRecipe:
    return _placed(cfg.sft, cfg, run_dir, "sft")


def aif_config(cfg: PipelineRecipe, run_dir: Path, sft_model: str) -> AIFRecipe:
    return _placed(chained_aif(cfg, sft_model), cfg, run_dir, "aif")


def dpo_config(cfg: PipelineRecipe, run_dir: Path, sft_model: str, pairs: str) -> DPORecipe:
    """Policy init = the dSFT model; the reference is too unless ``dpo.dpo.ref.path`` names another. The AIF pairs
    are the data, or one more source (weight 1) of ``dpo.data.mixture`` when one is configured."""
    data = cfg.dpo.data
    data = (replace(data, mixture=[*data.mixture, MixtureSource(path=pairs)]) if data.mixture
            else replace(data, path=pairs))
    dpo = replace(cfg.dpo, model=replace(cfg.dpo.model, path=sft_model), data=data)
    return _placed(dpo, cfg, run_dir, "dpo")


def eval_config(cfg: PipelineRecipe, run_dir: Path, sft_model: str, dpo_model: str) -> EvalRecipe:
    """dSFT and dDPO side by side, on ``eval.models[0]``'s backend and resources."""
    return _placed(chained_eval(cfg, sft_model, dpo_model), cfg, run_dir, "eval")


def serve_config(cfg: PipelineRecipe, run_dir: Path, dpo_model: str) -> ServeRecipe:
    return _placed(replace(cfg.serve, engine=replace(cfg.serve.engine, path=dpo_model)), cfg, run_dir, "serve")


# ---------------------------------------------------------------------------------------------------
# The run folder and its manifest
# ---------------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit and whether the checkout has uncommitted changes; None outside a git checkout (e.g. a Ray job's
    uploaded working dir)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any]

    @classmethod
    def create(cls, run_dir: Path, cfg: PipelineRecipe) -> Manifest:
        stages = [*TRAINING, *(["serve"] if cfg.pipeline.serve else [])]
        data = {"run_id": run_dir.name, "run_dir": str(run_dir.absolute()), "created": _now(), "argv": sys.argv,
                "config": to_dict(cfg), "versions": package_versions(), "git": git_state(),
                "host": platform.node(), "ray_address": os.environ.get("RAY_ADDRESS"), "resumed": [],
                "stages": {s: {"status": "pending"} for s in stages}}
        manifest = cls(run_dir / MANIFEST, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = run_dir / MANIFEST
        if not path.is_file():
            raise ConfigError(f"--resume {run_dir}: no {MANIFEST} there (not a pipeline run folder)")
        return cls(path, json.loads(path.read_text()))

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False))
        tmp.replace(self.path)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]

    def artifact(self, stage: str, key: str) -> str:
        return self.stage(stage)["artifacts"][key]


def new_run_dir(runs_dir: str | Path) -> Path:
    """``runs_dir/<UTC timestamp>`` (absolute: every stage and Ray worker gets the same path), with a suffix
    when two runs start within the same second."""
    base = output_path(runs_dir) / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------

def _last(metrics_file: Path, held_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The last row of a training stage's metrics, plus the last value of each ``held_out`` key (evaluated
    every few steps only) where the run has one."""
    rows = read_metrics(metrics_file.parent)
    last = dict(rows[-1]) if rows else {}
    for key in held_out:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            last[key] = values[-1]
    return last


def _trained(r: Any) -> dict[str, Any]:
    """A training stage's artifacts (a :class:`~zephyr_ray.train.launch.StageResult`)."""
    out = r.output_dir.absolute()
    push = json.loads((out / PUSH_RECORD).read_text()) if (out / PUSH_RECORD).is_file() else None  # run.push_to_hub
    return {"model": str(r.model_dir.absolute()), "metrics": str(out / "metrics.jsonl"),
            "curves": str(out / "curves.png"), "chat_template": r.chat_template, **({"push": push} if push else {})}


def _stage_sft(cfg: PipelineRecipe, run_dir: Path, m: Manifest) -> dict[str, Any]:
    from zephyr_ray.train.sft import run_sft

    return _trained(run_sft(sft_config(cfg, run_dir)))


def _stage_aif(cfg: PipelineRecipe, run_dir: Path, m: Manifest) -> dict[str, Any]:
    from zephyr_ray.feedback.aif import run_aif

    r = run_aif(aif_config(cfg, run_dir, m.artifact("sft", "model")))
    return {"pairs": str(r.path.absolute()), "report": str(r.path.parent.absolute() / "aif_report.json"),
            "count": r.pairs, "skipped": r.skipped}


def _stage_dpo(cfg: PipelineRecipe, run_dir: Path, m: Manifest) -> dict[str, Any]:
    from zephyr_ray.train.dpo import run_dpo

    return _trained(run_dpo(dpo_config(cfg, run_dir, m.artifact("sft", "model"), m.artifact("aif", "pairs"))))


def _stage_eval(cfg: PipelineRecipe, run_dir: Path, m: Manifest) -> dict[str, Any]:
    from zephyr_ray.eval.run import run_eval

    r = run_eval(eval_config(cfg, run_dir, m.artifact("sft", "model"), m.artifact("dpo", "model")))
    return {"results": str(r.dir.absolute() / "results.json"), "report": str(r.report.absolute()),
            **({"chart": str(r.chart.absolute())} if r.chart else {})}


def _stage_serve(cfg: PipelineRecipe, run_dir: Path, m: Manifest) -> dict[str, Any]:
    from zephyr_ray.serve.app import run_server

    detach = bool(os.environ.get("RAY_ADDRESS"))
    url = run_server(serve_config(cfg, run_dir, m.artifact("dpo", "model")), detach=detach,
                     ready=lambda msg: print(msg, flush=True))
    return {"url": url, "detached": detach}


RUNNERS: dict[str, Callable[[PipelineRecipe, Path, Manifest], dict[str, Any]]] = {
    "sft": _stage_sft, "aif": _stage_aif, "dpo": _stage_dpo, "eval": _stage_eval, "serve": _stage_serve}
TITLES = {"sft": "dSFT", "aif": "AI feedback", "dpo": "dDPO", "eval": "evaluation", "serve": "serving"}


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------

# Held-out metrics in the summary when a stage evaluated (data.eval_path / data.eval_fraction).
SFT_EVAL = ("eval_loss",)
DPO_EVAL = ("eval_rewards/accuracies", "eval_rewards/margins")


def summarize(m: Manifest) -> dict[str, Any]:
    """The numbers a reader wants first, from the stages' own files."""
    stages = m.data["stages"]
    out: dict[str, Any] = {"run_id": m.data["run_id"], "run_dir": m.data["run_dir"],
                           "seconds": {s: v.get("seconds") for s, v in stages.items()}}
    if stages["sft"]["status"] == "done":
        last = _last(Path(m.artifact("sft", "metrics")), SFT_EVAL)
        out["sft"] = {"steps": last.get("step"), "loss": last.get("loss"),
                      **{k: last[k] for k in SFT_EVAL if k in last}}
    if stages["aif"]["status"] == "done":
        out["aif"] = {"pairs": m.artifact("aif", "count"), "skipped": m.artifact("aif", "skipped")}
    if stages["dpo"]["status"] == "done":
        last = _last(Path(m.artifact("dpo", "metrics")), DPO_EVAL)
        out["dpo"] = {**{k: last.get(k) for k in ("step", "loss", "rewards/accuracies", "rewards/margins")},
                      **{k: last[k] for k in DPO_EVAL if k in last}}
    if m.data.get("chat"):
        out["chat"] = m.data["chat"]
    if m.data.get("push"):
        out["push"] = m.data["push"]
    if stages["eval"]["status"] == "done":
        results = json.loads(Path(m.artifact("eval", "results")).read_text())
        mt = results.get("mt_bench", {})
        alpaca = results.get("alpaca_eval", {})
        out["eval"] = {
            "mt_bench": {name: {"overall": s["overall"], **s["categories"], "parse_failures": s["parse_failures"]}
                         for name, s in mt.get("models", {}).items()},
            "categories": mt.get("categories", []),
            "win_rate": {name: {"win_rate": s["win_rate"], "standard_error": s["standard_error"],
                                # the length-controlled win rate, or why it is unavailable (not in older results)
                                **{k: s[k] for k in ("lc_win_rate", "lc_reason") if k in s},
                                "parse_failures": s["parse_failures"]}
                         for name, s in alpaca.get("models", {}).items()},
            "reference": alpaca.get("reference"),
            "judge": results.get("judge", {}).get("name"),
            # generate (parsed text) or expected (probability-weighted): which way every number above was made.
            "judge_mode": results.get("judge", {}).get("mode", "generate"),
        }
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def summary_table(summary: dict[str, Any]) -> str:
    """Plain-text table for the terminal (the same numbers are in summary.json)."""
    lines = [f"run {summary['run_id']}  ({summary['run_dir']})"]
    secs = ", ".join(f"{s} {_fmt(v, '.0f')} s" for s, v in summary["seconds"].items())
    lines.append(f"stage time: {secs}")
    if "sft" in summary:
        sft = summary["sft"]
        held_out = f", held-out loss {_fmt(sft['eval_loss'])}" if "eval_loss" in sft else ""
        lines.append(f"dSFT: final loss {_fmt(sft['loss'])}{held_out} after {sft['steps']} steps")
    if "aif" in summary:
        lines.append(f"AIF: {summary['aif']['pairs']} preference pairs ({summary['aif']['skipped']} prompts skipped)")
    if "dpo" in summary:
        d = summary["dpo"]
        held_out = (f"; held-out reward accuracy {_fmt(d.get('eval_rewards/accuracies'))}, "
                    f"margin {_fmt(d.get('eval_rewards/margins'))}") if any(k in d for k in DPO_EVAL) else ""
        lines.append(f"dDPO: loss {_fmt(d['loss'])}, reward accuracy {_fmt(d['rewards/accuracies'])}, "
                     f"margin {_fmt(d['rewards/margins'])} at step {d['step']}{held_out}")
    if "eval" in summary:
        e = summary["eval"]
        models = list(e["mt_bench"]) or list(e["win_rate"])
        rows = [["MT-Bench", *models]]
        rows += [[c, *(_fmt(e["mt_bench"].get(n, {}).get(c), ".2f") for n in models)] for c in ["overall", *e["categories"]]]
        rows.append(["unreadable ratings", *(_fmt(e["mt_bench"].get(n, {}).get("parse_failures")) for n in models)])
        if e["win_rate"]:
            rows.append([f"win rate vs {e['reference']}",
                         *(_fmt(e["win_rate"].get(n, {}).get("win_rate"), ".1%") for n in models)])
            if any("lc_win_rate" in s for s in e["win_rate"].values()):  # results.json before LC win rates: none
                rows.append([f"LC win rate vs {e['reference']}",
                             *(_fmt(e["win_rate"].get(n, {}).get("lc_win_rate"), ".1%") for n in models)])
        width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        how = "expected: probability-weighted" if e.get("judge_mode") == "expected" else "generate: parsed ratings"
        lines.append(f"evaluation (judge {e['judge']}, {how}):")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, width, strict=True)) for r in rows]
        reasons = {n: s["lc_reason"] for n, s in e["win_rate"].items() if s.get("lc_reason")}
        if reasons:
            lines.append("  LC win rate n/a: " + "; ".join(f"{n}: {why}" for n, why in reasons.items()))
    for turn in summary.get("chat", []):
        lines.append(f"chat (dDPO model)\n  user: {turn['user']}\n  assistant: {turn['assistant']}")
    lines += push_lines(summary.get("push"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------

@dataclass
class PipelineResult:
    run_dir: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]


def run_pipeline(cfg: PipelineRecipe | None = None, *, resume: str | Path | None = None,
                 echo: Callable[[str], None] = print) -> PipelineResult:
    """Run (or ``resume``) the pipeline; finished stages of a resumed run are not redone."""
    if resume is not None:
        run_dir = output_path(resume)
        manifest = Manifest.load(run_dir)
        cfg = from_dict(manifest.data["config"], PipelineRecipe)
        manifest.data["resumed"].append(_now())
        echo(f"resuming pipeline run {run_dir}")
    else:
        if cfg is None:
            raise ValueError("run_pipeline needs a config or resume")
        run_dir = new_run_dir(cfg.pipeline.runs_dir)
        manifest = Manifest.create(run_dir, cfg)
        echo(f"pipeline run {run_dir}")
    manifest.save()
    ensure_ray()
    names = list(manifest.data["stages"])
    for i, name in enumerate(names, 1):
        stage = manifest.stage(name)
        label = f"[{i}/{len(names)}] {TITLES[name]}"
        if stage["status"] == "done":
            echo(f"{label}: done in an earlier attempt ({_fmt(stage.get('seconds'), '.0f')} s), skipped")
            continue
        echo(f"{label} -> {run_dir / name}")
        stage.update(status="running", started=_now(), attempts=stage.get("attempts", 0) + 1)
        stage.pop("error", None)
        manifest.save()
        if name == "serve":  # serving blocks until Ctrl-C: publish and write the summary first
            _publish(cfg, manifest, echo)
            _write_summary(manifest, run_dir, echo)
        started = time.perf_counter()
        try:
            artifacts = RUNNERS[name](cfg, run_dir, manifest)
        except BaseException as exc:
            stage.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=_now())
            manifest.save()
            echo(f"{label} failed after {time.perf_counter() - started:.0f} s; rerun with: "
                 f"zephyr-ray pipeline --resume {run_dir}")
            raise
        stage.update(status="done", finished=_now(), seconds=round(time.perf_counter() - started, 1),
                     artifacts=artifacts)
        manifest.save()
        echo(f"{label} done in {stage['seconds']:.0f} s")
    if cfg.pipeline.chat_prompts and manifest.stage("dpo")["status"] == "done" and "chat" not in manifest.data:
        manifest.data["chat"] = chat(manifest.artifact("dpo", "model"), cfg.pipeline.chat_prompts,
                                     cfg.pipeline.chat_max_new_tokens, cfg.serve.engine.precision)
        manifest.save()
    _publish(cfg, manifest, echo)
    summary = _write_summary(manifest, run_dir, echo)
    if manifest.stage("dpo")["status"] == "done" and "serve" not in manifest.data["stages"]:
        model = manifest.artifact("dpo", "model")
        echo(f"try the dDPO model: zephyr-ray chat --model {model} \"What is 12 + 30?\"\n"
             f"serve it: zephyr-ray serve --config {cfg.recipes.get('serve', '<serve recipe>')} engine.path={model}")
    echo(f"pipeline run finished: {run_dir}")
    return PipelineResult(run_dir, manifest.data, summary)


def _publish(cfg: PipelineRecipe, manifest: Manifest, echo: Callable[[str], None]) -> None:
    """``pipeline.push_to_hub``: the dDPO model (card with the evaluation table) and the AIF pairs, once the dDPO
    model exists; recorded as the manifest's ``push``. Never raises; a failed push is retried by ``--resume``."""
    push = cfg.pipeline.push_to_hub
    if not push.enabled or manifest.stage("dpo")["status"] != "done" or \
            (manifest.data.get("push") or {}).get("status") == "done":
        return
    echo(f"publishing to the Hub: {push.repo_id} (revision {push.revision})")
    manifest.data["push"] = publish_pipeline(push, to_dict(cfg), manifest.data["stages"], summarize(manifest))
    manifest.save()


def _write_summary(manifest: Manifest, run_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    summary = summarize(manifest)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    echo(summary_table(summary))
    return summary



