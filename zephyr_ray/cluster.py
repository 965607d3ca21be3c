"""Where a stage runs: its run folder and the Ray cluster (shared by every stage's driver)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from zephyr_ray.config import to_dict


def ensure_ray() -> None:
    """Join the cluster at ``RAY_ADDRESS`` (set for a Ray job's driver), else start a fresh local one; never a
    cluster someone else started on this machine by accident (Ray's default would join the last ``ray start``).

    A local cluster keeps its dashboard on a port chosen here, and its processes are told that address:
    Train V2's placement-group cleaner asks the state API whether the controller lives, and with another
    Ray instance on the machine it could not tell which dashboard to ask."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by the raylet and its workers
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_run(cfg: Any) -> Path:
    """``cfg.run.output_dir``, made absolute in ``cfg`` (Ray workers run in another directory, so a relative
    path would send their metrics, checkpoints and exported model there), created, with the resolved config
    written to ``config.json``."""
    out = Path(cfg.run.output_dir).absolute()
    cfg.run.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return out
