import subprocess
import sys

from .conftest import ROOT


def test_unknown_key_fails_before_any_work():
    proc = subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "sft", "--config", "configs/tiny/sft.yaml", "train.lrr=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.lrr'" in proc.stderr and "valid keys under train" in proc.stderr
    assert "Ray" not in proc.stderr  # nothing started
