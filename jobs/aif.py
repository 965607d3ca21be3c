"""``ray job submit -- python jobs/aif.py --config configs/zephyr-7b-beta/aif.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray aif``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["aif", *sys.argv[1:]]))
