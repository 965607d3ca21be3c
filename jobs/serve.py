"""``ray job submit -- python jobs/serve.py --config configs/zephyr-7b-beta/serve.yaml [--detach] [key=value ...]``

Thin entrypoint: the same config and overrides as ``zephyr-ray serve``; the job's driver joins the cluster it was
submitted to. With ``--detach`` the job deploys the app and ends (the app keeps serving; ``serve delete zephyr``
removes it); without it the job serves until ``ray job stop``, which deletes the app.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
