"""``ray job submit -- python jobs/eval.py --config configs/zephyr-7b-beta/eval.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray eval``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
