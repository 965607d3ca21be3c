"""Where every stage records what it did: W&B runs and the files next to its outputs.

- **W&B**: one run per stage, in the pipeline's group (the run id), offline unless ``WANDB_API_KEY`` is set
  (:func:`wandb_mode`). A training stage streams its steps (:class:`MetricsLogger`, resumable: one run id per
  output folder); a driver-side stage (AIF, eval, leaderboard) logs its summary once (:func:`log_summary_run`:
  the summary's numeric leaves and its images).
- **Files**: ``metrics.jsonl`` (one JSON line per training step, :class:`MetricsLogger` / :func:`read_metrics`)
  and a stage's summary JSON (``aif_report.json``, ``results.json``; :func:`write_summary`).

``wandb`` is imported only when a run is started: importing it takes about a second and nothing of it is
needed when W&B is off.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from zephyr_ray.config import WandbConfig

METRICS_FILE = "metrics.jsonl"
# The W&B run id of a training stage's output folder: a restarted attempt resumes the same run.
WANDB_ID_FILE = "wandb_id"
# Where wandb keeps the address of the W&B service a process (and the processes it starts) logs through.
WANDB_SERVICE_ENV = "WANDB_SERVICE"


# ---------------------------------------------------------------------------------------------------
# W&B
# ---------------------------------------------------------------------------------------------------

def wandb_mode(cfg: WandbConfig) -> str:
    """``cfg.mode``, with ``auto`` resolved: online when ``WANDB_API_KEY`` is set, offline otherwise."""
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_enabled(cfg: WandbConfig) -> bool:
    return cfg.enabled and wandb_mode(cfg) != "disabled"


def start_run(cfg: WandbConfig, run_name: str, out_dir: str | Path, config: dict[str, Any] | None = None,
              **init: Any) -> Any:
    """A W&B run ``run_name`` in ``cfg.project`` / ``cfg.group``, its files under ``out_dir/wandb``; ``init``
    goes to ``wandb.init`` as is (``id``, ``resume``, ``reinit``). None when W&B is off."""
    if not wandb_enabled(cfg):
        return None
    import wandb

    return wandb.init(project=cfg.project, group=cfg.group, name=run_name, dir=str(out_dir), mode=wandb_mode(cfg),
                      config=config, **init)


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """The int/float leaves of nested dicts and lists, keyed by their "/"-joined path (list items by index);
    strings, None and bools are left out."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {prefix: tree} if isinstance(tree, int | float) and not isinstance(tree, bool) and prefix else {}
    flat: dict[str, float] = {}
    for key, value in items:
        flat.update(numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def log_summary_run(wandb_cfg: WandbConfig, run_name: str, out_dir: str | Path, summary: dict[str, Any],
                    config: dict[str, Any] | None = None, images: dict[str, Path | None] | None = None) -> bool:
    """One W&B run (``run_name`` in ``wandb_cfg.group``, files under ``out_dir/wandb``) holding a stage's
    summary: the numeric leaves of ``summary`` (``numeric_leaves``) and ``images`` (PNG paths), logged once
    from the driver. False when W&B is off."""
    run = start_run(wandb_cfg, run_name, out_dir, config, reinit="create_new")
    if run is None:
        return False
    import wandb  # 1-2 s to import: only when W&B is on

    try:
        metrics: dict[str, Any] = numeric_leaves(summary)
        metrics.update({key: wandb.Image(str(path)) for key, path in (images or {}).items()
                        if path is not None and Path(path).exists()})
        run.log(metrics)
    finally:
        run.finish()
    return True


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """A stage's summary as indented JSON (non-ASCII text kept as is: model names, judge answers)."""
    path = Path(path)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return path


class MetricsLogger:
    """Appends one JSON line per step to ``metrics.jsonl`` and logs the step to W&B; on resume, lines past the
    restored step are dropped first so the file is the trajectory of the run that survived, not of the attempt
    that crashed."""

    def __init__(self, out_dir: str | Path, wandb_cfg: WandbConfig, run_name: str, config: dict[str, Any],
                 resume_step: int = 0):
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logged = 0  # the last step the attempt that died logged (W&B has it: never logged twice)
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            if resume_step:
                logged = max((json.loads(line).get("step", 0) for line in lines), default=0)
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._wandb = None
        if wandb_enabled(wandb_cfg):
            id_file = Path(out_dir) / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self._wandb = start_run(wandb_cfg, run_name, out_dir, config, id=run_id, resume="allow")
        # W&B's step only goes up: steps redone after a restart (same numbers, exact resume) are not sent again.
        # Online, the run says where it stands; offline, the previous attempt's metrics.jsonl does.
        self._wandb_after = max(logged, getattr(self._wandb, "starting_step", 0) - 1) if self._wandb else 0

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self._wandb is not None and metrics["step"] > self._wandb_after:
            self._wandb.log(metrics, step=metrics["step"])

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every step ``MetricsLogger`` wrote under ``out_dir``, in order."""
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
