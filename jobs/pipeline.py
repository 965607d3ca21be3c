"""``ray job submit -- python jobs/pipeline.py --config configs/zephyr-7b-beta/pipeline.yaml [key=value ...]``

Thin entrypoint: the same arguments as ``zephyr-ray pipeline`` (``--resume runs/<id>`` included); the job's
driver joins the cluster it was submitted to. Put ``pipeline.runs_dir`` on shared storage on a multi-node cluster.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
