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


def _cli(*argv: str) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """``python -m zephyr_ray.cli ARGV`` with ``-X importtime``: the process, the top-level packages it imported,
    and its stderr without the import-time lines."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "zephyr_ray.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    imported = {x.rsplit("|", 1)[1].strip().split(".")[0] for x in lines if x.startswith("import time:")}
    assert "zephyr_ray" in imported, "-X importtime lists the imports"
    return proc, imported, [x for x in lines if not x.startswith("import time:")]


def test_help_and_config_and_path_errors_import_neither_torch_nor_ray(tmp_path):
    proc, imported, _ = _cli("--help")
    assert proc.returncode == 0 and "pipeline" in proc.stdout
    assert not imported & {"torch", "ray"}
    for argv, expected in [
        # rules between fields: checked when the config loads
        (["dpo", "--config", "configs/tiny/dpo.yaml", "dpo.max_prompt_length=4096"],
         "config error: dpo.max_prompt_length=4096: leaves no room"),
        (["serve", "--config", "configs/tiny/serve.yaml", "serve.route_prefix=v1"],
         "config error: serve.route_prefix='v1': must start with '/'"),
        (["pipeline", "--config", "configs/tiny/pipeline.yaml", "aif.candidates.0.name=dsft"],
         "config error: aif.candidates: the name 'dsft' is taken"),
        # an input path that does not exist
        (["sft", "--config", "configs/tiny/sft.yaml", "data.path=nowhere/sft.jsonl", f"run.output_dir={tmp_path}/sft"],
         "config error: data.path=nowhere/sft.jsonl: no such file or folder"),
    ]:
        proc, imported, lines = _cli(*argv)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith(expected), lines
        assert not imported & {"torch", "ray"}, f"{argv[0]}: a config error imported {imported & {'torch', 'ray'}}"
    assert "no such file or folder" in (tmp_path / "sft" / "error.log").read_text()  # the full trace of the last
