import subprocess
import sys

from .conftest import ROOT


def test_unknown_key_fails_before_any_work():
    proc = subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "sft", "--config", "configs/tiny/sft.yaml", "train.lrr=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.lrr'" in proc.stderr and "valid keys under train" in proc.stderr
    assert "Ray" not in proc.stderr  # nothing started


def test_eval_leaderboard_is_the_leaderboard_stage(monkeypatch, capsys):
    from zephyr_ray import cli

    seen = []
    monkeypatch.setitem(cli.STAGES, "leaderboard", (cli.LeaderboardRecipe, lambda cfg: seen.append(cfg) or "ran", ""))
    assert cli.main(["eval", "leaderboard", "--config", str(ROOT / "configs/tiny/leaderboard.yaml"), "seed=7"]) == 0
    assert [c.seed for c in seen] == [7] and capsys.readouterr().out.strip() == "ran"
