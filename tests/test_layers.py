"""The package's layers, checked on the source (AST, every import, function-level ones included): lower layers
never import higher ones, so config loads without torch, Ray or any stage code. And imports sit at the top of
files: a function-level import is either on the allow-list below, with its reason, or a defect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PKG = ROOT / "zephyr_ray"
STAGES = ("zephyr_ray.train", "zephyr_ray.feedback", "zephyr_ray.eval", "zephyr_ray.serve", "zephyr_ray.pipeline")


def _py(package: str) -> list[Path]:
    return sorted((PKG / package).rglob("*.py"))


# module files -> packages/modules they must never import
RULES: list[tuple[str, list[Path], tuple[str, ...]]] = [
    ("config", _py("config"), ("zephyr_ray.generation", *STAGES)),
    ("models", [PKG / "models.py"], ("zephyr_ray.data", *STAGES)),
    ("data", _py("data"), STAGES),
    ("generation", _py("generation"), STAGES),
    ("judging", _py("judging"), ("zephyr_ray.feedback", "zephyr_ray.eval")),
    ("feedback", _py("feedback"), ("zephyr_ray.eval",)),
    ("eval", _py("eval"), ("zephyr_ray.feedback",)),
    ("train", _py("train"), ("zephyr_ray.feedback", "zephyr_ray.eval", "zephyr_ray.serve", "zephyr_ray.pipeline")),
    ("sampling/synthetic", [PKG / "sampling.py", PKG / "synthetic.py"], ("zephyr_ray.",)),
]

# Function-level imports that stay, (file, imported module or its prefix): why. Everything else is imported at the
# top of its file, where a reader sees the module's dependencies.
_STARTUP = "imported by the CLI before a stage runs (tests/test_cli.py: --help and config errors load no torch/Ray)"
_STAGE = "a stage's module loads only when it runs (cli.py/pipeline.py; config and path errors come first)"
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    # cli.py / pipeline.py: stage modules (torch, Ray) only when their stage runs
    **{("zephyr_ray/cli.py", m): _STAGE for m in (
        "zephyr_ray.train", "zephyr_ray.feedback", "zephyr_ray.eval", "zephyr_ray.serve", "zephyr_ray.pipeline",
        "zephyr_ray.generation.run", "zephyr_ray.generation.chat")},
    **{("zephyr_ray/pipeline.py", m): _STAGE + "; inputs.py imports this module to check a recipe's paths" for m in (
        "zephyr_ray.train", "zephyr_ray.feedback", "zephyr_ray.eval", "zephyr_ray.serve")},
    ("zephyr_ray/inputs.py", "zephyr_ray.pipeline"): "the top layer, loaded only to check a pipeline recipe's paths",
    ("zephyr_ray/inputs.py", "zephyr_ray.data.rows"): _STARTUP + "; data.rows imports Ray (its readers)",
    # start-up modules (config, inputs, publish, cluster and what they import): heavy packages on first use
    ("zephyr_ray/cluster.py", "ray"): _STARTUP,
    ("zephyr_ray/models.py", "torch"): _STARTUP + " (config imports TINY_FAMILY_NAMES)",
    ("zephyr_ray/models.py", "transformers"): _STARTUP,
    ("zephyr_ray/models.py", "tokenizers"): _STARTUP,
    ("zephyr_ray/models.py", "zephyr_ray.attention"): _STARTUP + "; attention.py imports torch",
    ("zephyr_ray/gguf_import.py", "gguf"): _STARTUP + " (models.py imports this module)",
    ("zephyr_ray/gguf_import.py", "torch"): _STARTUP,
    ("zephyr_ray/gguf_import.py", "transformers"): _STARTUP,
    ("zephyr_ray/config/loader.py", "omegaconf"): "the config dataclasses alone need only the standard library "
                                                  "(bench/gpu_train_step.py on a bare GPU box)",
    # optional or slow dependencies, imported where they are needed
    ("zephyr_ray/publish.py", "huggingface_hub"): "only a push needs it; importing it fixes HF_ENDPOINT",
    ("zephyr_ray/tracking.py", "wandb"): "only with W&B on (slow import)",
    ("zephyr_ray/generation/vllm_engine.py", "vllm"): "optional (the gpu extra); a clear error when missing",
    ("zephyr_ray/serve/app.py", "ray.serve.llm"): "needs vllm (optional)",
    ("zephyr_ray/eval/leaderboard_run.py", "lm_eval"): "optional (the leaderboard extra); a clear error when missing",
    ("zephyr_ray/generation/adapters.py", "peft"): "slow import, only where adapters are served",
    ("zephyr_ray/data/readers.py", "datasets"): "slow import (seconds), only for `datasets` folders and hub ids",
    ("zephyr_ray/data/mixture.py", "datasets"): "slow import (seconds), only for `datasets` folders and hub ids",
    # engine modules: the package imports its engines on demand
    **{("zephyr_ray/generation/__init__.py", m): "import circle (an engine imports this package's helpers); "
       "each engine's heavy dependency (torch, vllm, httpx) loads only when that backend is used" for m in (
        "zephyr_ray.generation.hf", "zephyr_ray.generation.vllm_engine", "zephyr_ray.generation.openai_engine")},
    # torch where the module's importers run without it
    ("zephyr_ray/generation/pool.py", "torch"): "only inside the actor (threads_per_actor): the stage drivers "
                                                "that import the pool never load torch",
    ("zephyr_ray/data/packing.py", "torch"): "only collate (training workers) needs it; packing rows runs in Ray "
                                             "Data tasks and data tests without torch",
    ("zephyr_ray/train/engine.py", "deepspeed"): "~1 s and an accelerator probe that logs; only training workers",
    ("zephyr_ray/train/engine.py", "transformers.integrations.HfDeepSpeedConfig"): "imports deepspeed (above)",
    ("zephyr_ray/train/lora.py", "peft"): "slow import (~6 s), only for LoRA runs",
    ("zephyr_ray/attention.py", "transformers"): "train/ imports this module for trains_one_row without "
                                                 "loading transformers (seconds); the functions run on a loaded model",
}
# Not checked yet: data/pipeline.py and data/sft.py (the shuffle) are being changed in the benchmarks work.
EXEMPT: tuple[str, ...] = ()


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


def function_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement inside a function or method (``from m import a`` gives
    ``m.a``); module-level ones, ``if TYPE_CHECKING:`` blocks included, are not listed."""
    found: list[tuple[int, str]] = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return sorted(set(found))  # a nested function's import is seen from each enclosing one


def _allowed(path: str, module: str) -> tuple[str, str] | None:
    return next(((p, m) for p, m in LAZY_IMPORTS if p == path and (module == m or module.startswith(m + "."))), None)


def test_the_import_lister_sees_functions_and_methods_only():
    src = ("import os\nif TYPE_CHECKING:\n    import torch\n"
           "def f():\n    import json\n    def g():\n        from a.b import c, d\n"
           "class C:\n    def m(self):\n        from . import x\n")
    assert function_imports(src) == [(5, "json"), (7, "a.b.c"), (7, "a.b.d"), (10, "..x")]
    assert _allowed("zephyr_ray/cluster.py", "ray") and _allowed("zephyr_ray/cluster.py", "ray.data")
    assert not _allowed("zephyr_ray/cluster.py", "rayx") and not _allowed("zephyr_ray/models.py", "ray")


def test_library_imports_are_at_the_top():
    files = [f for f in sorted(PKG.rglob("*.py")) if not str(f.relative_to(ROOT)).startswith(EXEMPT)]
    assert len(files) > 50
    bad, used = [], set()
    for f in files:
        path = str(f.relative_to(ROOT))
        for line, module in function_imports(f.read_text(encoding="utf-8")):
            entry = _allowed(path, module)
            if entry is None:
                bad.append(f"{path}:{line}: {module}")
            used.add(entry)
    assert not bad, "imports inside functions (move them to the top, or allow-list them with a reason):\n" + "\n".join(bad)
    assert not set(LAZY_IMPORTS) - used, f"allow-list entries no file needs any more: {sorted(set(LAZY_IMPORTS) - used)}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle_between_modules_even_inside_functions():
    """A circle hidden in a function-level import is still a circle (a module's own package, which Python
    imports first anyway, does not count)."""
    modules = {_module_name(f): f for f in PKG.rglob("*.py")}
    edges = {}
    for name, f in modules.items():
        targets = {m for m in imported_modules(f.read_text(encoding="utf-8")) if m in modules and m != name}
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, set())})
    assert not cycles, f"modules importing each other: {cycles}"
