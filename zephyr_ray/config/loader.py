"""Loading a recipe: YAML plus ``key=value`` overrides over a schema's defaults, then validation.

Loading fails before any work starts on an unknown key, a wrong type, a value outside a field's choices or a
broken rule between fields (each section's ``problems()``), and the message names the key and what is valid."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_STAGES = ("sft", "aif", "dpo", "eval", "serve")

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe config that cannot be used as written."""


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to ``choices`` (checked at load time)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def _unknown_key(exc: Exception, schema: type) -> str:
    """Name the unknown key, the section it was looked up in and the keys valid there."""
    key = str(exc.full_key) if getattr(exc, "full_key", None) else str(exc)
    node = getattr(exc, "object_type", None)
    if not dataclasses.is_dataclass(node):
        node = schema
    parent = key.rsplit(".", 1)[0] if "." in key else ("<root>" if node is schema else node.__name__)
    valid = sorted(f.name for f in dataclasses.fields(node))
    return f"unknown key '{key}'; valid keys under {parent}: {', '.join(valid)}"


def _lookup(obj: Any, key: str) -> Any:
    """The value at a dotted key below ``obj`` (``alpaca_eval.reference``, ``models[1].name``, a mapping's key:
    ``serve.adapters.name``)."""
    for part in key.split("."):
        name, *indices = re.split(r"[\[\]]+", part.rstrip("]"))
        obj = obj[name] if isinstance(obj, dict) else getattr(obj, name)
        for index in indices:
            obj = obj[int(index)]
    return obj


def _problem(obj: Any, prefix: str, key: str, problem: str) -> ConfigError:
    """``key=value: problem``; a section or a list of sections is named without its value."""
    value = _lookup(obj, key)
    if dataclasses.is_dataclass(value) or (isinstance(value, list) and any(map(dataclasses.is_dataclass, value))):
        return ConfigError(f"{prefix}{key}: {problem}")
    return ConfigError(f"{prefix}{key}={value!r}: {problem}")


def validate(obj: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` at the first broken rule of recipe ``obj``, top down: each section's field
    choices, then its own ``problems()`` (rules between its fields, or between its subsections: the one place
    such rules live), then its subsections. A section with ``validation_view()`` has its subsections checked as
    that view gives them (a pipeline: its stage sections as the pipeline will run them)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name}={value!r} is not valid; choose one of {list(f.metadata['choices'])}")
        if "check" in f.metadata and value is not None and (problem := f.metadata["check"](value)):
            raise ConfigError(f"{prefix}{f.name}={value!r}: {problem}")  # a field's own rule (a name or a file)
    for key, problem in getattr(obj, "problems", list)():
        raise _problem(obj, prefix, key, problem)
    view = obj.validation_view() if hasattr(obj, "validation_view") else obj
    for f in dataclasses.fields(view):
        value = getattr(view, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, f"{prefix}{f.name}[{i}].")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...], schema: type[T] | T) -> T:
    """Load ``path`` (YAML) over ``schema``'s defaults, apply ``key=value`` overrides, :func:`validate`.
    ``schema`` is a config dataclass, or an instance of one whose values are the defaults (a benchmark's preset
    sizes with ``--set`` overrides). (``zephyr_ray.config.load_config`` is this with ``SFTRecipe`` as the default
    schema: the loader sits below the schemas.)"""
    # omegaconf is imported here, not at module level: the dataclasses alone (e.g. for
    # bench/gpu_train_step.py on a bare GPU box) need nothing beyond the standard library.
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    base = OmegaConf.structured(schema)
    OmegaConf.set_readonly(base, False)  # a frozen dataclass's defaults are still overridable here
    if not isinstance(schema, type):
        schema = type(schema)
    source = str(path) if path else "<defaults>"
    try:
        if path is not None:
            data = OmegaConf.load(path)
            for section, recipe in (data.get("recipes") or {}).items():
                if section not in PIPELINE_STAGES or section not in {f.name for f in dataclasses.fields(schema)}:
                    raise ConfigError(f"{path}: recipes.{section}: not a stage section of {schema.__name__}")
                source = f"{recipe} (recipes.{section} of {path})"
                if not Path(resolve_path(recipe)).is_file():
                    raise ConfigError(f"{path}: recipes.{section}: no such file {recipe!r}")
                base = OmegaConf.merge(base, {section: OmegaConf.load(resolve_path(recipe))})
            source = str(path)
            base = OmegaConf.merge(base, data)
        source = "command line"
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, value = item.split("=", 1)
            # update() (not a merged dotlist) so `candidates.0.name=x` reaches a list element.
            OmegaConf.update(base, key, OmegaConf.from_dotlist([f"value={value}"]).value, merge=True)
        obj = OmegaConf.to_object(base)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise ConfigError(f"{source}: {_unknown_key(exc, schema)}") from None
    except OmegaConfBaseException as exc:
        msg = str(getattr(exc, "msg", exc)).splitlines()[0]
        raise ConfigError(f"{source}: {getattr(exc, 'full_key', None) or '<root>'}: {msg}") from None
    validate(obj)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (for manifests, W&B and Ray task arguments)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], schema: type[T]) -> T:
    """``to_dict``'s inverse; not validated again: the dict came from a config that was."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))


def resolve_path(path: str) -> str:
    """A local file found from the cwd first, then the project root (made absolute so Ray workers with
    another cwd find it too); URLs and hub ids come back unchanged."""
    if "://" in path:
        return path
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.exists():
            return str(candidate.absolute())
    return path
