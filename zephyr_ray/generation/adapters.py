"""Several LoRA adapters served on one base model (``serve.adapters``): finding a training run's adapter, checking
that it fits the base, and loading them all onto one model with peft so that one batch can mix them.

Mixed batches use peft's ``adapter_names`` argument of ``generate``/``forward``: every adapted layer runs the base
weights once for the whole batch, then each adapter's low-rank update on its own rows only (rows named
``BASE`` get none). The selection holds for every step of ``generate``, so each row's KV cache holds its own
adapter's keys and values. Chosen over one ``generate`` per adapter group: on the tiny model (CPU, one thread,
12 rows over two adapters and the base, 16 new tokens) the mixed batch took 0.12-0.14 s against 0.25-0.27 s
grouped, and its greedy tokens equal each adapter's merged model run alone (tests/test_multilora.py).

peft names adapters internally ``serve_<i>``: a served name may hold characters peft's module dicts refuse
(".") or be a substring of peft's ``lora_`` prefix ("a"), which peft mishandles when loading.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zephyr_ray.config import ConfigError

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch
CONFIG_FILE = "adapter_config.json"
EXPORT_SUBDIR = "adapter"  # a LoRA stage's exported model keeps its adapter here (train/lora.py: ADAPTER_DIR)


def adapter_dir(name: str, folder: str) -> Path:
    """The folder holding the adapter's ``adapter_config.json``: ``folder`` itself, or ``folder/adapter`` when
    ``folder`` is a LoRA stage's exported model (the merged model with its adapter beside it)."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ConfigError(f"serve.adapters.{name}: no such folder {folder!r} (on this replica's machine)")
    for candidate in (path, path / EXPORT_SUBDIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise ConfigError(f"serve.adapters.{name}: {folder!r} holds no {CONFIG_FILE} (nor {EXPORT_SUBDIR}/{CONFIG_FILE}): "
                      "give a peft adapter folder, e.g. a LoRA run's model/adapter")


def _is_local(path: str) -> bool:
    return "://" not in path and Path(path).expanduser().exists()


def check_adapter(name: str, folder: str, base_path: str, module_names: Iterable[str]) -> Path:
    """The adapter's folder, after checking what can be checked before peft loads it: a LoRA adapter, trained on
    this base (when its recorded base and ``base_path`` are both local folders, they must be the same folder;
    otherwise differing names only log a warning: a hub id and a local copy may be one model), whose listed target modules all exist in the base (``module_names``)."""
    path = adapter_dir(name, folder)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"serve.adapters.{name}: cannot read {path / CONFIG_FILE}: {exc}") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"serve.adapters.{name}: {path} is a {kind!r} adapter; only LoRA adapters can be served")
    recorded = config.get("base_model_name_or_path")
    if recorded:
        local = _is_local(recorded), _is_local(base_path)
        if all(local) and not os.path.samefile(Path(recorded).expanduser(), Path(base_path).expanduser()):
            raise ConfigError(f"serve.adapters.{name}: {path} was trained on {recorded!r}, but the served base "
                              f"(engine.path) is {base_path!r}: serve it on its own base model")
        if not all(local) and recorded != base_path:  # a hub id, or a folder this machine does not have
            log.warning("serve.adapters.%s: trained on %r, served on %r: cannot tell whether they are the same model",
                        name, recorded, base_path)
    targets = config.get("target_modules")
    if isinstance(targets, list):  # a string is a regex or "all-linear": peft resolves it against the model
        names = list(module_names)
        missing = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in names)]
        if missing:
            raise ConfigError(f"serve.adapters.{name}: {path} adapts modules {missing} that the base model "
                              f"{base_path!r} does not have: it was trained on another architecture")
    return path


def load_adapters(model: Any, adapters: Mapping[str, str], base_path: str) -> tuple[Any, dict[str, str]]:
    """``model`` wrapped by peft with every adapter of ``adapters`` (served name -> folder) loaded, and the map
    served name -> peft's internal name. Each adapter is checked first (``check_adapter``); a load that still
    fails (e.g. weight shapes of another model size) is a ``ConfigError`` naming the adapter."""
    from peft import PeftModel  # peft loads only where adapters are served

    modules = [n for n, _ in model.named_modules()]
    folders = {name: check_adapter(name, folder, base_path, modules) for name, folder in adapters.items()}
    internal = {name: f"serve_{i}" for i, name in enumerate(folders)}
    peft_model = None
    for name, path in folders.items():
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=internal[name],
                                                       is_trainable=False)
            else:
                peft_model.load_adapter(str(path), adapter_name=internal[name], is_trainable=False)
        except Exception as exc:
            raise ConfigError(f"serve.adapters.{name}: {path} does not load onto {base_path!r}: {exc}") from exc
        log.info("adapter %s loaded from %s", name, path)
    return peft_model if peft_model is not None else model, internal
