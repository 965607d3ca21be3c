"""Where a stage runs: its run folder and the Ray cluster (shared by every stage's driver)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from zephyr_ray.config import to_dict


def ensure_ray() -> None:
    """Join the cluster at ``RAY_ADDRESS`` (or the job's), else start a local one. (It keeps the dashboard:
    Train V2's placement-group cleaner asks the state API whether the controller lives.)"""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def open_run(cfg: Any) -> Path:
    """``cfg.run.output_dir``, created, with the resolved config written to ``config.json``."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return out
