"""bench/report.py builds docs/benchmarks.md and README's headline block from bench/results/*.json (no Ray, no
training): the numbers on the page are the JSON's, a stale README is detected, smoke runs are never published;
and bench/common.py's token parity and headline rules refuse a ratio when the sides trained different tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def _load(name: str):
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))  # report.py and common.py import siblings as top-level modules
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return _load("report")


@pytest.fixture(scope="module")
def common():
    return _load("common")


def _dpo_result(quick: bool = False) -> dict:
    cols = [["name", "config", ""], ["steady_pairs_per_s", "pairs/s", ".2f"], ["train_sum_rss_mb", "RSS MB", ".0f"]]
    return {
        "schema": 1, "bench": "dpo_throughput", "command": ".venv/bin/python bench/dpo_throughput.py --repeats 3",
        "quick": quick, "when_unix": 1_700_000_000.0, "git": {"commit": "0123456789abcdef", "dirty": False},
        "machine": {"cores": 2, "cpu_model": "Test CPU", "loadavg_start": [0.5, 0.4, 0.3]},
        "packages": {"torch": "2.13.0", "trl": "1.16.0", "ray": None},
        "parity": {"ok": True, "tokens": {"ours-2w": 1000, "trl-2p": 1000}, "beyond_allowed": {}, "allowed": {}},
        "table": {"columns": cols, "rows": [
            {"name": "ours-2w", "steady_pairs_per_s": 14.8123, "train_sum_rss_mb": 2500.4},
            {"name": "trl-2p", "steady_pairs_per_s": 9.25, "train_sum_rss_mb": 3125.6},
        ]},
        "headline": [{"name": "dDPO steady pairs/s", "ratio": 14.8123 / 9.25, "unit": "pairs/s",
                      "ours_config": "ours-2w", "ours_value": 14.8123, "peer_config": "trl-2p", "peer_value": 9.25,
                      "goal": 1.5, "met": True}],
    }


def _write(folder: Path, results: list[dict]) -> None:
    folder.mkdir()
    for r in results:
        (folder / f"{r['bench']}.json").write_text(json.dumps(r))


README = "# Project\n\nintro\n\n<!-- bench:begin -->\nold figure 1.72x\n<!-- bench:end -->\n\nrest\n"


def test_page_and_readme_carry_the_json_numbers(report, tmp_path):
    _write(tmp_path / "results", [_dpo_result()])
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    readme.write_text(README)
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--page", str(page)]
    assert report.main(args) == 0
    text = page.read_text()
    assert "| ours-2w | 14.81 | 2500 |" in text  # .2f and .0f from the JSON's columns
    assert "| trl-2p | 9.25 | 3126 |" in text
    assert "| config | pairs/s | RSS MB |" in text
    assert "`.venv/bin/python bench/dpo_throughput.py --repeats 3`" in text
    assert "commit `0123456789`" in text and "2 cores (Test CPU), load 0.50 at start" in text
    assert "torch 2.13.0, trl 1.16.0" in text and "ray" not in text.split("packages:")[1].split("\n")[0]
    assert "token parity: same tokens" in text
    new = readme.read_text()
    assert "1.72x" not in new  # the old hand-written figure is gone
    assert "**1.60x** (ours-2w 14.81 vs trl-2p 9.25 pairs/s; goal >= 1.5x met)" in new  # 14.8123 / 9.25 = 1.6013
    assert new.startswith("# Project\n\nintro\n\n<!-- bench:begin -->") and new.endswith("<!-- bench:end -->\n\nrest\n")
    assert report.main([*args, "--check"]) == 0


def test_stale_readme_or_page_is_detected(report, tmp_path, capsys):
    _write(tmp_path / "results", [_dpo_result()])
    readme, page = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text(README)
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--page", str(page)]
    assert report.main([*args, "--check"]) == 1  # nothing generated yet
    assert report.main(args) == 0
    assert report.main([*args, "--check"]) == 0
    readme.write_text(readme.read_text().replace("1.60x", "1.72x"))  # someone edits the figure by hand
    assert report.main([*args, "--check"]) == 1
    assert "stale: " in capsys.readouterr().err
    report.main(args)
    result = _dpo_result()
    result["headline"][0].update(ours_value=16.0, ratio=16.0 / 9.25)  # a new run, docs not regenerated
    (tmp_path / "results" / "dpo_throughput.json").write_text(json.dumps(result))
    assert report.main([*args, "--check"]) == 1
    report.main(args)
    assert "**1.73x** (ours-2w 16.00 vs trl-2p 9.25" in readme.read_text()


def test_quick_runs_and_missing_markers(report, tmp_path):
    _write(tmp_path / "results", [_dpo_result(quick=True)])
    results, skipped = report.load_results(tmp_path / "results")
    assert results == [] and skipped == ["dpo_throughput.json (a --quick smoke run)"]
    block = report.render_headlines(results)
    assert "No committed benchmark results yet" in block
    with pytest.raises(SystemExit, match="needs exactly one"):
        report.with_headlines("no markers here", block)


def test_token_parity_refuses_a_ratio(common):
    same = common.token_parity({"ours-2w": 5000, "trl-bs": 5000, "trl-2p": 4990}, {"trl-2p": 10})
    assert same["ok"] and same["differences"] == {"ours-2w": 0, "trl-bs": 0, "trl-2p": -10}
    off = common.token_parity({"ours-2w": 5000, "trl-bs": 5011}, {"trl-bs": 10})
    assert not off["ok"] and off["beyond_allowed"] == {"trl-bs": 11}
    ours = {"name": "ours-2w", "tps": 300.0}
    peer = {"name": "trl-bs", "tps": 200.0}
    h = common.headline("x", ours, peer, "tps", "tokens/s", off["ok"], goal=1.3)
    assert h["ratio"] is None and h["why_none"] == "token parity failed"
    h = common.headline("x", ours, peer, "tps", "tokens/s", True, goal=1.3)
    assert h["ratio"] == 1.5 and h["met"] is True


def test_console_headline_is_the_readme_sentence(common, report, capsys):
    ours, peer = {"name": "ours-2w", "tps": 16434.0}, {"name": "trl-2p-bs1-gas", "tps": 13043.0}
    h = common.headline("dSFT tokens/s", ours, peer, "tps", "tokens/s", True, goal=1.3)
    common.print_headlines([h], {"ok": True})
    line = capsys.readouterr().out.strip()
    assert line == "dSFT tokens/s: 1.26x (ours-2w 16434 vs trl-2p-bs1-gas 13043 tokens/s; goal >= 1.3x not met)"
    assert report.ratio_text(h) == line.replace("1.26x", "**1.26x**")  # the README's line, ratio in bold


def test_process_groups_and_the_simultaneous_training_peak(common):
    group = common.TreeSampler.group
    assert group("sft_throughput.py", root=True, trainer=True) == "train"  # a 1-process peer trains in the root
    assert group("python", root=True, trainer=False) == "driver"  # torchrun, or our side's driver
    assert group("ray::RayTrainWorker", root=False, trainer=True) == "train"
    assert group("ray::MapBatches(tokenize)", root=False, trainer=False) == "ray_workers"
    assert group("raylet", root=False, trainer=False) == "ray_daemons"
    sampler = common.TreeSampler(os.getpid(), is_trainer=lambda label: label.startswith("ray::RayTrainWorker"))
    mb = common.MB
    sampler.labels = {11: "ray::RayTrainWorker", 12: "ray::RayTrainWorker", 13: "raylet"}
    sampler.peak_rss_by_pid = {11: 100 * mb, 12: 50 * mb, 13: 10 * mb}
    # the two workers peaked at different times: together they never held 150 MB, only 140
    sampler.peak_group_rss = {"train": 140 * mb, "ray_daemons": 10 * mb}
    memory = sampler.memory()
    assert memory["train_processes"] == 2 and memory["largest_train_rss_mb"] == 100
    assert memory["train_sum_rss_mb"] == 140


def test_fastest_peer_and_memory_goal(common):
    summary = {
        "ours-2w": {"name": "ours-2w", "side": "ours", "tps": 10.0, "train_processes": 2, "train_sum_rss_mb": 2400.0},
        "trl-bs": {"name": "trl-bs", "side": "trl", "tps": 7.0, "train_processes": 1, "train_sum_rss_mb": 2000.0},
        "trl-2p": {"name": "trl-2p", "side": "trl", "tps": 8.0, "train_processes": 2, "train_sum_rss_mb": 4000.0},
    }
    assert common.fastest(summary, "trl", "tps")["name"] == "trl-2p"
    goals = {g["peer"]: g for g in common.memory_goal(summary, "ours-2w", 0.7)}
    assert goals["trl-2p"]["ratio"] == pytest.approx(0.6) and goals["trl-2p"]["met"]
    assert goals["trl-bs"]["ratio"] == pytest.approx(1.2) and not goals["trl-bs"]["met"]


def test_every_result_carries_its_provenance(common, report, tmp_path):
    """envelope + write_result: command, commit, machine (the bench's own machine figures merged in, not replacing
    cores / CPU model / load), package versions; and report.py publishes it unless it is a smoke run."""
    env = common.envelope("dpo_throughput", quick=False)
    out = tmp_path / "results" / "dpo_throughput.json"
    common.write_result(out, env, {"machine": {"matmul_fp32_peak_flops": 5e10}, "headline": []})
    r = json.loads(out.read_text())
    assert r["bench"] == "dpo_throughput" and r["quick"] is False and r["command"]
    assert len(r["git"]["commit"]) == 40
    m = r["machine"]
    assert m["cores"] >= 1 and m["cpu_model"] and len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert m["matmul_fp32_peak_flops"] == 5e10
    assert r["packages"]["torch"] and "trl" in r["packages"]
    results, skipped = report.load_results(tmp_path / "results")
    assert [x["bench"] for x in results] == ["dpo_throughput"] and skipped == []


def test_trl_gets_the_models_chatml_template_with_generation_markers_and_the_same_text():
    """SmolLM2's ChatML template has no {% generation %} markers, which TRL's assistant_only_loss needs: the bench
    marks the assistant's answer (content + <|im_end|>) and renders the very same text."""
    from jinja2 import Environment, nodes
    from jinja2.ext import Extension

    sft = _load("sft_throughput")

    class Generation(Extension):  # what transformers' renderer does with the markers: keep the text
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    plain = ("{% for message in messages %}" + sft.CHATML_LINE + "{% endfor %}")
    marked = sft.training_template(plain)
    assert "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}" in marked
    assert sft.training_template(marked) == marked  # already marked: unchanged
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    env = Environment(extensions=[Generation])
    assert env.from_string(marked).render(messages=msgs) == env.from_string(plain).render(messages=msgs) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    with pytest.raises(SystemExit, match="no \\{% generation %\\} markers"):
        sft.training_template("{{ messages[0]['content'] }}")
