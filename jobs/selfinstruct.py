"""``ray job submit -- python jobs/selfinstruct.py --config configs/zephyr-7b-beta/selfinstruct.yaml [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray selfinstruct``; the job's driver joins the
cluster it was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["selfinstruct", *sys.argv[1:]]))
