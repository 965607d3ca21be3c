"""A lost node, run in its own process (``python -m tests.lost_node OUT_DIR TINY_MODEL``) because it owns a
``ray.cluster_utils.Cluster``: a head plus two worker nodes, one Ray Train worker on each (1.5 of a worker node's
2 logical CPUs). The training driver is ``zephyr-ray sft`` in a child process joined to that cluster. Once a
checkpoint is complete, the node hosting a Train worker is removed the hard way (its raylet and processes
SIGKILLed); a replacement node joins 5 s later, as an autoscaler would bring one. Writes
``OUT_DIR/lost_node.json``: what was removed and when, the driver's exit code and output tail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

STEP = 2  # remove the node once this checkpoint is complete
NODE_CPUS = 2
ROOT = Path(__file__).resolve().parents[1]


def _node_of(pid: int, nodes: list) -> object | None:
    """The cluster node whose raylet is an ancestor of ``pid``."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for node in nodes:
        raylet = node.all_processes.get("raylet")
        if raylet and raylet[0].process.pid in ancestors:
            return node
    return None


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def main(out: Path, model: str) -> None:
    from ray.cluster_utils import Cluster

    from zephyr_ray.cluster import free_port

    os.environ.pop("RAY_ADDRESS", None)
    port = free_port()
    # This cluster's processes (Train V2's placement-group cleaner) ask its own dashboard, never another one on
    # the machine (as zephyr_ray.cluster.ensure_ray does).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": port,
                                                            "dashboard_host": "127.0.0.1"})
    nodes = [cluster.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
    cluster.wait_for_nodes()
    ckpts = out / "shared" / "tiny-sft" / "checkpoints"  # checkpoint_root: <storage_path>/<run.name>/checkpoints
    record: dict = {"checkpoints": str(ckpts), "run_dir": str(out / "run")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "zephyr_ray.cli", "sft", "--config", "configs/tiny/sft.yaml", f"model.path={model}",
         f"run.output_dir={out / 'run'}", f"run.storage_path={out / 'shared'}", "wandb.enabled=false",
         "train.max_steps=8", "train.checkpoint_every=2", "run.max_failures=2", "scaling.cpus_per_worker=1.5"],
        cwd=ROOT, env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (ckpts / f"step_{STEP:08d}" / "COMPLETE").exists() and driver.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no step-{STEP} checkpoint in 600 s")
            time.sleep(0.05)
        hosts = {w.pid: _node_of(w.pid, nodes) for w in _train_workers()}
        pid, node = next((pid, n) for pid, n in sorted(hosts.items()) if n is not None)
        cluster.remove_node(node, allow_graceful=False)
        record.update(removed_at=time.time(), worker_pid=pid)
        time.sleep(5)  # capacity returns: the autoscaler's replacement node
        from zephyr_ray.train.loop import newest_complete

        record["newest_complete"] = newest_complete(str(ckpts))[0]  # nothing can complete now: a rank is gone
        cluster.add_node(num_cpus=NODE_CPUS)
        record["replaced_at"] = time.time()
        output, _ = driver.communicate(timeout=600)
        record.update(driver_rc=driver.returncode, driver_tail=output[-4000:])
    finally:
        if driver.poll() is None:
            driver.kill()
        (out / "lost_node.json").write_text(json.dumps(record))
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
