"""The pipeline: chaining configs (pure), the run folder and manifest, and the tiny recipe end to end with an
interrupted stage resumed."""

import json
import subprocess
import sys

import pytest

from zephyr_ray import pipeline
from zephyr_ray.config import ConfigError, PipelineRecipe, load_config

from .conftest import ROOT

TINY = ROOT / "configs" / "tiny" / "pipeline.yaml"


def _tiny(*overrides: str) -> PipelineRecipe:
    return load_config(TINY, list(overrides), PipelineRecipe)


def test_stage_recipes_merge_under_sections_and_the_pipeline_file_wins():
    cfg = _tiny("dpo.dpo.beta=0.25")
    assert cfg.sft.data.path == "data/sample/sft.jsonl"  # from configs/tiny/sft.yaml
    assert cfg.sft.train.lr == 2.0e-3 and cfg.sft.train.epochs == 4  # sft.yaml says 8; pipeline.yaml says 4
    assert [c.name for c in cfg.aif.candidates] == ["tiny-a", "tiny-b", "tiny-c"]
    assert cfg.dpo.dpo.beta == 0.25 and cfg.dpo.data.packing is True


def test_recipes_must_name_stage_sections_and_existing_files(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("recipes: {training: configs/tiny/sft.yaml}\n")
    with pytest.raises(ConfigError, match="recipes.training: not a stage section"):
        load_config(bad, [], PipelineRecipe)
    bad.write_text("recipes: {sft: configs/tiny/nope.yaml}\n")
    with pytest.raises(ConfigError, match="recipes.sft: no such file 'configs/tiny/nope.yaml'"):
        load_config(bad, [], PipelineRecipe)
    bad.write_text("recipes: {sft: configs/tiny/sft.yaml}\nsft: {train: {epoch: 2}}\n")
    with pytest.raises(ConfigError, match="unknown key 'sft.train.epoch'"):
        load_config(bad, [], PipelineRecipe)


def test_stages_are_chained_through_the_earlier_artifacts(tmp_path):
    cfg = _tiny("wandb.project=zp")
    run = tmp_path / "20260101-000000"
    sft = pipeline.sft_config(cfg, run)
    assert sft.run.output_dir == str(run / "sft") and sft.wandb.group == run.name and sft.wandb.project == "zp"
    aif = pipeline.aif_config(cfg, run, "/m/sft")
    dsft = aif.candidates[-1]
    assert [c.name for c in aif.candidates] == ["tiny-a", "tiny-b", "tiny-c", "dsft"]
    assert dsft.path == "/m/sft" and dsft.batch_size == cfg.aif.candidates[0].batch_size
    assert aif.run.output_dir == str(run / "aif")
    dpo = pipeline.dpo_config(cfg, run, "/m/sft", "/p/pairs.jsonl")
    # Policy init is the dSFT model, and so is the reference (ref.path unset means the policy's start).
    assert dpo.model.path == "/m/sft" and dpo.dpo.ref.path is None and dpo.data.path == "/p/pairs.jsonl"
    assert dpo.wandb.group == run.name and dpo.run.output_dir == str(run / "dpo")
    ev = pipeline.eval_config(cfg, run, "/m/sft", "/m/dpo")
    assert [(m.name, m.path) for m in ev.models] == [("dsft", "/m/sft"), ("ddpo", "/m/dpo")]
    assert ev.models[0].threads_per_actor == cfg.eval.models[0].threads_per_actor
    assert pipeline.serve_config(cfg, run, "/m/dpo").engine.path == "/m/dpo"
    # Without the dSFT candidate the configured ones stay as they are.
    assert len(pipeline.aif_config(_tiny("pipeline.sft_as_candidate=false"), run, "/m").candidates) == 3


def test_pipeline_config_problems_fail_when_it_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^aif.candidates: the name 'dsft' is taken"):
        _tiny("aif.candidates.1.name=dsft")
    _tiny("aif.candidates.1.name=dsft", "pipeline.sft_as_candidate=false")  # no dSFT candidate: the name is free
    with pytest.raises(ConfigError, match=r"^aif.completions='x.jsonl': pre-generated completions"):
        _tiny("aif.completions=x.jsonl")
    with pytest.raises(ConfigError, match=r"^eval.judge.max_attempts=0: must be >= 1"):
        _tiny("eval.judge.max_attempts=0")
    with pytest.raises(ConfigError, match=r"^aif.sampling.n=0: must be >= 1"):
        _tiny("aif.sampling.n=0")
    with pytest.raises(ConfigError, match=r"^dpo.dpo.max_prompt_length=4096: leaves no room .* data.max_length=\d+"):
        _tiny("dpo.dpo.max_prompt_length=4096")
    with pytest.raises(ConfigError, match=r"^aif.candidates=\[\]: is empty: nobody answers"):
        _tiny("aif.candidates=[]")
    with pytest.raises(ConfigError, match=r"^aif.candidates=\[\]: is empty and pipeline.sft_as_candidate is false"):
        _tiny("aif.candidates=[]", "pipeline.sft_as_candidate=false")
    with pytest.raises(ConfigError, match=r"^eval.models=\[\]: needs one entry"):
        _tiny("eval.models=[]")


def test_stage_sections_are_validated_as_the_pipeline_runs_them():
    """The eval section's models are only the template of the dSFT and dDPO engines: its rules see dsft and
    ddpo as the evaluated models, not the template's name."""
    cfg = _tiny("eval.alpaca_eval.reference.name=tiny-a")  # tiny-a is the template, not an evaluated model
    assert cfg.eval.alpaca_eval.reference.name == "tiny-a"
    with pytest.raises(ConfigError, match=r"^eval.alpaca_eval: reference 'ddpo' is also an evaluated model"):
        _tiny("eval.alpaca_eval.reference.name=ddpo")
    view = cfg.validation_view()
    assert [m.name for m in view.eval.models] == ["dsft", "ddpo"] and view.aif.candidates[-1].name == "dsft"
    assert cfg.eval.models[0].name == "tiny-a" and len(cfg.aif.candidates) == 3, "the loaded config is unchanged"


def test_run_dirs_are_fresh_and_the_manifest_round_trips(tmp_path):
    first, second = pipeline.new_run_dir(tmp_path), pipeline.new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    m = pipeline.Manifest.create(first, _tiny())
    loaded = pipeline.Manifest.load(first)
    assert loaded.data == m.data and list(loaded.data["stages"]) == ["sft", "aif", "dpo", "eval"]
    assert loaded.data["versions"]["ray"] and loaded.data["versions"]["torch"]
    assert loaded.data["git"]["commit"] is None or len(loaded.data["git"]["commit"]) == 40
    assert list(pipeline.Manifest.create(second, _tiny("pipeline.serve=true")).data["stages"])[-1] == "serve"
    with pytest.raises(ConfigError, match="no manifest.json"):
        pipeline.Manifest.load(tmp_path / "nothing")


def test_a_stage_run_dir_given_relative_becomes_absolute(tmp_path, monkeypatch):
    """Stage commands (`zephyr-ray sft --config ...`) take run.output_dir relative to where they start; the Ray
    workers, which run elsewhere, must get it absolute."""
    from zephyr_ray.cluster import open_run
    from zephyr_ray.config import SFTRecipe

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/tiny/sft.yaml", ["run.output_dir=runs/x"], SFTRecipe)
    placed, out = open_run(cfg)
    assert out == tmp_path / "runs" / "x" and out.is_dir() and placed.run.output_dir == str(out)
    assert cfg.run.output_dir == "runs/x", "the loaded config is not changed in place"
    assert json.loads((out / "config.json").read_text())["run"]["output_dir"] == str(out)


def test_summary_table_prints_every_number_and_marks_missing_ones():
    summary = {"run_id": "r1", "run_dir": "/runs/r1", "seconds": {"sft": 61.2, "aif": None},
               "sft": {"steps": 40, "loss": 1.23456},
               "dpo": {"step": 8, "loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.125},
               "eval": {"mt_bench": {"dsft": {"overall": 5.0, "writing": 6.5, "math": None, "parse_failures": 1},
                                     "ddpo": {"overall": 6.25, "writing": 7.0, "math": 4.0, "parse_failures": 0}},
                        "categories": ["writing", "math"], "reference": "ref",
                        "win_rate": {"dsft": {"win_rate": 0.4}, "ddpo": {"win_rate": 0.625}}, "judge": "j"}}
    table = pipeline.summary_table(summary)
    assert "sft 61 s, aif n/a s" in table
    assert "final loss 1.235 after 40 steps" in table
    assert "reward accuracy 0.750, margin 0.125 at step 8" in table
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[4:]}
    assert lines["overall"] == ["5.00", "6.25"] and lines["math"] == ["n/a", "4.00"]
    assert table.splitlines()[-1].split()[-2:] == ["40.0%", "62.5%"]
    assert "evaluation (judge j, generate: parsed ratings):" in table  # results.json before judge modes: generate
    summary["eval"]["judge_mode"] = "expected"
    assert "evaluation (judge j, expected: probability-weighted):" in pipeline.summary_table(summary)


def test_summary_shows_the_last_held_out_values_when_a_stage_evaluated(tmp_path):
    m = pipeline.Manifest.create(tmp_path, _tiny())
    rows = {"sft": [{"step": 1, "loss": 3.0, "eval_loss": 3.5}, {"step": 2, "loss": 2.0}],
            "dpo": [{"step": 1, "loss": 0.6, "rewards/accuracies": 0.5, "rewards/margins": 0.1,
                     "eval_rewards/accuracies": 0.25, "eval_rewards/margins": -0.5},
                    {"step": 2, "loss": 0.5, "rewards/accuracies": 1.0, "rewards/margins": 0.2,
                     "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.375}]}
    for stage, metrics in rows.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
        m.stage(stage).update(status="done", artifacts={"metrics": str(tmp_path / stage / "metrics.jsonl")})
    summary = pipeline.summarize(m)
    assert summary["sft"] == {"steps": 2, "loss": 2.0, "eval_loss": 3.5}  # the last step that evaluated
    assert summary["dpo"]["eval_rewards/accuracies"] == 0.75 and summary["dpo"]["eval_rewards/margins"] == 0.375
    table = pipeline.summary_table(summary)
    assert "dSFT: final loss 2.000, held-out loss 3.500 after 2 steps" in table
    assert "at step 2; held-out reward accuracy 0.750, margin 0.375" in table
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")  # no eval
    plain = pipeline.summarize(m)["sft"]
    assert plain == {"steps": 1, "loss": 1.0} and "held-out loss" not in pipeline.summary_table({**summary, "sft": plain})


def test_cli_needs_exactly_one_of_config_and_resume(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "pipeline", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    both = run("--config", str(TINY), "--resume", str(tmp_path))
    assert both.returncode == 2 and "exactly one of --config" in both.stderr
    over = run("--resume", str(tmp_path), "sft.train.epochs=1")
    assert over.returncode == 2 and "overrides are not allowed" in over.stderr
    missing = run("--resume", str(tmp_path))
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr


# ----------------------------------------------------------------------------------------------- end to end

SMALL = ["sft.train.epochs=1", "sft.train.max_steps=6", "aif.prompts.limit=8", "aif.sampling.max_new_tokens=12",
         "dpo.train.epochs=1", "dpo.train.max_steps=2", "eval.mt_bench.per_category=1",
         "eval.mt_bench.sampling.max_new_tokens=8", "eval.alpaca_eval.limit=4",
         "eval.alpaca_eval.sampling.max_new_tokens=8", "eval.judge.sampling.max_new_tokens=8",
         "eval.judge.max_attempts=1", "wandb.mode=offline"]


# The recipe end to end (a Ray job whose driver is killed -9 mid-dSFT, then resubmitted with --resume) is
# tests/test_jobs.py's pipeline test.

@pytest.mark.ray
def test_an_interrupted_stage_is_marked_failed_and_resume_redoes_only_it(ray_cluster, tmp_path, monkeypatch):
    """Ctrl-C during dDPO: the manifest says which stages are done, the last line says how to resume, and the
    resumed run skips the finished stages (stage runners stand in for the real ones: this is the bookkeeping)."""
    cfg = _tiny(f"pipeline.runs_dir={tmp_path / 'runs'}")
    calls: list[str] = []

    def runner(name, artifacts):
        def run(cfg, run_dir, manifest):
            calls.append(name)
            return artifacts
        return run

    def interrupted(*args):
        calls.append("dpo")
        raise KeyboardInterrupt  # Ctrl-C (or a lost driver) during dDPO
    for name in ("sft", "aif", "eval"):
        monkeypatch.setitem(pipeline.RUNNERS, name, runner(name, {"stand_in": name}))
    monkeypatch.setattr(pipeline, "_write_summary", lambda *args: {})  # stand-in stages wrote no metrics
    monkeypatch.setitem(pipeline.RUNNERS, "dpo", interrupted)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, echo=said.append)
    run_dir = next((tmp_path / "runs").iterdir())
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [m["stages"][s]["status"] for s in ("sft", "aif", "dpo", "eval")] == ["done", "done", "failed", "pending"]
    assert m["stages"]["dpo"]["error"] == "KeyboardInterrupt: " and calls == ["sft", "aif", "dpo"]
    assert said[-1].endswith(f"rerun with: zephyr-ray pipeline --resume {run_dir}")

    monkeypatch.setitem(pipeline.RUNNERS, "dpo", runner("dpo", {"model": "/m/dpo"}))
    said.clear()
    calls.clear()
    result = pipeline.run_pipeline(resume=run_dir, echo=said.append)
    assert calls == ["dpo", "eval"]  # dSFT and AIF are not redone
    assert "[1/4] dSFT: done in an earlier attempt" in said[1] and "[2/4] AI feedback: done" in said[2]
    m = result.manifest
    assert all(m["stages"][s]["status"] == "done" for s in ("sft", "aif", "dpo", "eval"))
    assert m["stages"]["dpo"]["attempts"] == 2 and m["stages"]["sft"]["attempts"] == 1 and len(m["resumed"]) == 1
    assert m["stages"]["eval"]["artifacts"] == {"stand_in": "eval"} and "error" not in m["stages"]["dpo"]
