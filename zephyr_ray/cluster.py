"""Where a stage runs: its run folder and the Ray cluster (shared by every stage's driver)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import TypeVar

from zephyr_ray.config import ConfigError, to_dict

T = TypeVar("T")

# Where relative run and output paths go under `ray job submit` (whose working directory is Ray's per-session
# copy of --working-dir, deleted with the session). Default ~/zephyr-ray; on a cluster, shared storage.
BASE_ENV = "ZEPHYR_RAY_BASE"
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a job's driver (ray._private.runtime_env.constants)
_announced: set[str] = set()


def job_base() -> Path | None:
    """The persistent folder relative outputs resolve against when this driver is a Ray job (None otherwise):
    ``$ZEPHYR_RAY_BASE`` or ``~/zephyr-ray``, created, printed once; an unwritable one is a config error."""
    if _JOB_ENV not in os.environ:
        return None
    base = Path(os.environ.get(BASE_ENV) or "~/zephyr-ray").expanduser().absolute()
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=base, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{BASE_ENV}={base}: not writable ({exc.strerror or exc}); set {BASE_ENV} to a writable "
                          "folder (shared storage on a cluster) for this job's results") from None
    if str(base) not in _announced:
        _announced.add(str(base))
        print(f"Ray job: relative run and output paths resolve against {base} (set {BASE_ENV} to change)", flush=True)
    return base


def output_path(path: str | Path) -> Path:
    """``path`` made absolute: against ``job_base()`` under a Ray job, else against the working directory."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = job_base()
    return base / p if base is not None else p.absolute()


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` (set for a Ray job's driver), else start a fresh local one (of
    ``num_cpus`` CPUs, default all; benchmarks pin it); never a cluster someone else started on this machine by
    accident (Ray's default would join the last ``ray start``).

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
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_run(cfg: T) -> tuple[T, Path]:
    """``cfg`` with ``run.output_dir`` made absolute (a copy: configs are never changed in place; Ray workers run
    in another directory, so a relative path would send their metrics, checkpoints and exported model there;
    under a Ray job it goes to ``job_base()``), and that folder, created, with the resolved config written to
    ``config.json``."""
    out = output_path(cfg.run.output_dir)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(out)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return cfg, out
