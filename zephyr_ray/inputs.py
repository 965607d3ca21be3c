"""User errors read as one line: input paths checked before Ray starts, and any config or input error (also a bad
row found on the cluster) reported as what is wrong and what to set, with the full trace in a log file."""

from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from zephyr_ray.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    EngineConfig,
    LeaderboardTaskConfig,
    MixtureSource,
    ModelConfig,
    PromptsConfig,
    ReferenceConfig,
    resolve_path,
)
from zephyr_ray.gguf_import import EMBEDDED_MODELS, GGUFImportError, embedded_gguf, is_gguf

# Node types whose ``path`` names a model folder (or hub id), and those whose ``path`` names a data file.
_MODEL_NODES = (ModelConfig, EngineConfig, ReferenceConfig)
_DATA_NODES = (DataConfig, PromptsConfig, LeaderboardTaskConfig, MixtureSource)
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def _looks_local(path: str) -> bool:
    """A path the user meant on this machine (not a hub id such as ``HuggingFaceH4/zephyr-7b-beta``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith(_DATA_SUFFIXES) or "\\" in path


def _check_model(key: str, path: str) -> str | None:
    found = Path(resolve_path(path))
    if is_gguf(path):
        return None if found.is_file() else f"{key}={path}: no such GGUF file; set {key} to an existing .gguf file"
    if path in EMBEDDED_MODELS and not found.exists():
        try:
            embedded_gguf(path)
        except GGUFImportError as exc:
            return f"{key}={path}: {exc}"
        return None
    if found.is_dir():
        if not (found / "config.json").exists():
            return f"{key}={path}: the folder has no config.json (not a Hugging Face model folder); set {key} to one"
        return None
    if found.exists():
        return f"{key}={path}: a file, not a model folder; set {key} to a model folder, a .gguf file or a hub id"
    if _looks_local(path):
        return f"{key}={path}: no such model folder; set {key} to an existing folder or a hub id"
    return None


def _check_data(key: str, path: str, fmt: str) -> str | None:
    if fmt == "hf_hub" or "://" in path:
        return None
    if not Path(resolve_path(path)).exists() and (_looks_local(path) or fmt != "auto"):
        return f"{key}={path}: no such file or folder (looked in the working directory and the project root)"
    return None


def _names_model(node: Any, name: str) -> bool:
    if name == "teacher":
        return isinstance(node, DistillConfig)
    return name == "path" and isinstance(node, _MODEL_NODES) and getattr(node, "backend", "") != "openai"


def path_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every input path of a recipe (any stage's, or the pipeline's sections) that cannot be read: data and
    prompt files, model, reference, teacher and judge folders, pre-generated completions. No Ray needed."""
    found: list[str] = []
    if not dataclasses.is_dataclass(cfg):
        return found
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if isinstance(value, list):
            for i, item in enumerate(value):
                found += path_problems(item, f"{key}.{i}.")
        elif dataclasses.is_dataclass(value):
            found += path_problems(value, f"{key}.")
        elif not isinstance(value, str) or not value:
            continue
        elif _names_model(cfg, f.name):
            found.append(_check_model(key, value))
        elif f.name == "path" and isinstance(cfg, _DATA_NODES):
            found.append(_check_data(key, value, getattr(cfg, "format", "auto")))
        elif f.name == "completions":
            found.append(_check_data(key, value, "auto"))
    return [p for p in found if p]


def check_paths(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming every unreadable input path of ``cfg``."""
    problems = path_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a config or input error (a bad row is found inside a Ray task and arrives wrapped
    in Ray's error); None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, ConfigError):  # before importing data.rows, which imports Ray (its readers)
        return f"config error: {exc}"
    from zephyr_ray.data.rows import BadRowError, raise_bad_row

    if isinstance(exc, BadRowError):
        return f"bad input row: {str(exc).splitlines()[0]}"
    try:
        raise_bad_row(exc)
    except BadRowError as bad:
        return f"bad input row: {str(bad).splitlines()[0]}"
    return None


def write_trace(exc: BaseException, folder: str | Path | None) -> Path:
    """The full traceback in ``folder/error.log`` (the run folder), or a temporary file before one exists."""
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n" + "".join(traceback.format_exception(exc))
    if folder is not None:
        try:
            path = Path(folder) / "error.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(text + "\n")
            return path
        except OSError:
            pass
    with tempfile.NamedTemporaryFile("w", prefix="zephyr-ray-error-", suffix=".log", delete=False) as f:
        f.write(text)
    return Path(f.name)


def pipeline_path_problems(cfg: Any) -> list[str]:
    """``path_problems`` of each stage as the pipeline will run it: paths it chains from an earlier stage's
    output (the dSFT model, the AIF pairs, the dDPO model) are left out, they do not exist yet."""
    from zephyr_ray import pipeline as p

    run, later = Path("<run>"), "<earlier stage output>"  # not local-looking: never reported
    stages = {"sft": p.sft_config(cfg, run), "aif": p.aif_config(cfg, run, later),
              "dpo": p.dpo_config(cfg, run, later, later), "eval": p.eval_config(cfg, run, later, later),
              "serve": p.serve_config(cfg, run, later)}
    if not cfg.pipeline.serve:
        del stages["serve"]
    return [problem for name, stage in stages.items() for problem in path_problems(stage, f"{name}.")]
