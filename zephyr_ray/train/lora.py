"""LoRA / QLoRA (peft) for the training stages: low-rank adapters train, the base model stays frozen.

A full 7B fine-tune keeps fp32 master weights, gradients and Adam moments for every weight; with adapters
those exist for the adapters only, and QLoRA also stores the frozen base in 4 bits. The export stays a plain
HF folder (adapters merged into the base), so evaluation and serving never need peft; the adapters are saved
on their own next to it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from zephyr_ray.config import ConfigError, LoRAConfig
from zephyr_ray.models import load_model

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # under the exported model folder: peft's adapter_config.json + adapter_model.safetensors


def quantization_config(lora: LoRAConfig, dtype: torch.dtype) -> Any:
    """bitsandbytes settings for loading the frozen base, or None for full precision. 4bit is QLoRA's (NF4,
    double quantization, compute in the training dtype); its packed weights are stored in that dtype too, so
    ZeRO-3 partitions them like any other parameter."""
    if lora.quantize == "none":
        return None
    key = f"model.lora.quantize={lora.quantize}"
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} needs a CUDA GPU in every training worker (bitsandbytes kernels) and this worker "
                          "has none: train on GPU workers (scaling.use_gpu=true) or set model.lora.quantize=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key} needs bitsandbytes: pip install 'zephyr-ray[gpu]', or set model.lora.quantize=none")
    if lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def add_adapters(model: Any, lora: LoRAConfig, seed: int, gradient_checkpointing: bool, revision: str | None = None
                 ) -> Any:
    """``model`` wrapped by peft with fresh adapters; every base weight frozen.

    The adapters are initialised under ``seed`` on every rank (the loop seeds ranks differently), so all
    workers start alike. They take the base's dtype (no peft fp32 upcast): DeepSpeed keeps fp32 master
    weights itself and expects one dtype in the module. With gradient checkpointing the embeddings' output
    is made to require grad, as transformers does for its own peft models: a reentrant checkpoint only
    back-propagates into a block whose input needs grad, and the frozen embeddings give none.
    """
    # peft takes ~6 s to import: only where adapters are made or read, never by the driver or the maths tests
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules="all-linear" if targets == ["all-linear"] else list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, config, autocast_adapter_dtype=False, revision=revision)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %d of %d parameters train (%.2f%%)", lora.r, lora.alpha, targets,
             trainable, total, 100 * trainable / total)
    return model


def peft_model(model: Any) -> Any:
    """The peft model inside ``model`` (itself, or a DeepSpeed engine's ``.module``), or None without LoRA."""
    from peft import PeftModel  # ~6 s to import (see add_adapters)

    module = getattr(model, "module", model)
    return module if isinstance(module, PeftModel) else None


@contextlib.contextmanager
def without_adapters(model: Any) -> Iterator[None]:
    """Run ``model`` (peft, or an engine around it) as the frozen base it started from: adapters off, eval
    mode, no autograd. dDPO's reference under LoRA, without a second model in memory."""
    peft = peft_model(model)
    training = peft.training
    peft.eval()
    try:
        with peft.disable_adapter(), torch.no_grad():
            yield
    finally:
        peft.train(training)


def save_merged(model: Any, adapter_state: dict[str, torch.Tensor], out_dir: str | Path, dtype: torch.dtype) -> None:
    """Rank 0 of the export: the adapters as peft saves them (``out_dir/adapter``), then merged into a fresh
    copy of the base in ``dtype`` and written as a plain ``save_pretrained`` folder at ``out_dir``.

    A fresh base rather than the trained module: under ZeRO-3 the module holds only this rank's slices, under
    QLoRA 4-bit weights (merging into the full-precision base is the usual QLoRA export); the base itself never
    changes in training. ``adapter_state`` holds (at least) the adapters' weights under the module's names.
    """
    from peft import PeftModel  # ~6 s to import (see add_adapters)

    out = Path(out_dir)
    model.save_pretrained(out / ADAPTER_DIR, state_dict=adapter_state, safe_serialization=True)
    peft_cfg = model.peft_config["default"]  # the base's path and revision, as add_adapters recorded them
    # A base with its own modelling code (config auto_map) trained only because remote code was trusted.
    remote = bool(getattr(model.get_base_model().config, "auto_map", None))
    base = load_model(peft_cfg.base_model_name_or_path, dtype=dtype, revision=peft_cfg.revision,
                      trust_remote_code=remote)
    merged = PeftModel.from_pretrained(base, out / ADAPTER_DIR).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)
