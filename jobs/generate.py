"""``ray job submit -- python jobs/generate.py --config configs/zephyr-7b-beta/generate.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray generate``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
