"""The package's layers, checked on the source (AST, every import, function-level ones included): lower layers
never import higher ones, so config loads without torch, Ray or any stage code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PKG = ROOT / "zephyr_ray"
STAGES = ("zephyr_ray.train", "zephyr_ray.feedback", "zephyr_ray.eval", "zephyr_ray.serve", "zephyr_ray.pipeline")
# module files -> packages/modules they must never import
RULES: list[tuple[str, list[Path], tuple[str, ...]]] = [
    ("config", sorted((PKG / "config").glob("*.py")), ("zephyr_ray.generation", *STAGES)),
    ("models", [PKG / "models.py"], ("zephyr_ray.data", *STAGES)),
    ("data", sorted((PKG / "data").glob("*.py")), STAGES),
    ("sampling/synthetic", [PKG / "sampling.py", PKG / "synthetic.py"], ("zephyr_ray.",)),
]


def imported_modules(source: str) -> set[str]:
    """Every module an import statement anywhere in ``source`` names (``from zephyr_ray import pipeline`` names
    ``zephyr_ray.pipeline``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def forbidden(source: str, banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(source) for b in banned
                  if m == b.rstrip(".") or m.startswith(b if b.endswith(".") else b + "."))


def test_the_checker_sees_every_import_form():
    src = ("import zephyr_ray.train.loop\nfrom zephyr_ray import pipeline\n"
           "def f():\n    from zephyr_ray.eval.run import run_eval\n")
    assert forbidden(src, STAGES) == ["zephyr_ray.eval.run", "zephyr_ray.eval.run.run_eval", "zephyr_ray.pipeline",
                                      "zephyr_ray.train.loop"]
    assert forbidden("from zephyr_ray.pipelines import x\nimport zephyr_ray.config\n", STAGES) == []
    assert forbidden("from zephyr_ray.data.samples import sample_dialogues\n", ("zephyr_ray.data",)) == [
        "zephyr_ray.data.samples", "zephyr_ray.data.samples.sample_dialogues"]


@pytest.mark.parametrize(("layer", "files", "banned"), RULES, ids=[r[0] for r in RULES])
def test_lower_layers_do_not_import_higher_ones(layer, files, banned):
    assert files, f"no files for layer {layer}"
    bad = {str(f.relative_to(ROOT)): found for f in files if (found := forbidden(f.read_text(encoding="utf-8"), banned))}
    assert not bad, f"{layer} imports from a higher layer: {bad}"
