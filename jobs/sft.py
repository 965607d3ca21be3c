"""``ray job submit -- python jobs/sft.py --config configs/zephyr-7b-beta/sft.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray sft``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
