"""``ray job submit -- python jobs/dpo.py --config configs/zephyr-7b-beta/dpo.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray dpo``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
