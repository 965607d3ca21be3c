"""``ray job submit -- python jobs/leaderboard.py --config configs/zephyr-7b-beta/leaderboard.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray leaderboard``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["leaderboard", *sys.argv[1:]]))
