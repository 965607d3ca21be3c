"""The DeepSpeed engine every training stage runs on: config, model, optimizer, schedule, export.

The DeepSpeed JSON owns ZeRO settings; the recipe owns batch sizes, clipping and precision, which it
fills in wherever the JSON says ``"auto"`` (a conflicting concrete value is an error, not a surprise).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from zephyr_ray.config import DeepSpeedConfig, ModelConfig, TrainConfig, resolve_path
from zephyr_ray.models import DTYPES, load_model
from zephyr_ray.train.lora import add_adapters, peft_model, quantization_config, save_merged


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (HF's warmup+decay shapes, with an lr floor)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def _fill(node: dict[str, Any], key: str, value: Any, where: str) -> None:
    current = node.get(key, "auto")
    if current != "auto" and current != value:
        raise ValueError(f"{where}: {key}={current!r} conflicts with the recipe's {value!r}; set it to \"auto\"")
    node[key] = value


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The JSON at ``ds.config`` with the recipe's batch, clipping, precision and offload filled in."""
    path = resolve_path(ds.config)
    cfg = json.loads(Path(path).read_text())
    _fill(cfg, "train_micro_batch_size_per_gpu", train.micro_batch_size, path)
    _fill(cfg, "gradient_accumulation_steps", train.gradient_accumulation_steps, path)
    _fill(cfg, "train_batch_size", train.micro_batch_size * train.gradient_accumulation_steps * world_size, path)
    _fill(cfg, "gradient_clipping", train.max_grad_norm, path)
    _fill(cfg.setdefault("bf16", {}), "enabled", train.precision == "bf16", f"{path} bf16")
    cfg.pop("optimizer", None)  # the client AdamW is used (a JSON optimizer JIT-builds FusedAdam)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if ds.offload_optimizer:
        if zero.get("stage", 0) == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        if zero.get("stage", 0) != 3:
            raise ValueError("deepspeed.offload_params needs ZeRO stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return cfg


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases or norms), as is standard for transformers. Empty groups are
    left out (LoRA trains matrices only): ZeRO drops them, and the lr schedule must see the same groups."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions hide the real shape
            (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model_path: str, train: TrainConfig, ds_cfg: dict[str, Any], total_steps: int,
                 model_cfg: ModelConfig | None = None, model: Any = None) -> Any:
    """A DeepSpeed engine around the model at ``model_path`` (or a given ``model``; ``model_cfg``: attention,
    revision, remote code, LoRA), with AdamW and the configured schedule. Under ZeRO-3 the weights load straight
    into partitions (never whole per rank). With ``model_cfg.lora.enabled`` the model gets adapters first
    (``train/lora.py``; ZeRO-3 partitions them at ``deepspeed.initialize``) and only they reach the optimizer."""
    # Only training workers build engines: DeepSpeed (~1 s to import, and an accelerator probe that logs) stays
    # out of the driver and of everything else that imports this module.
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    model_cfg = model_cfg or ModelConfig()
    lora = model_cfg.lora
    deepspeed.init_distributed()  # adopts Ray Train's process group; HfDeepSpeedConfig needs the world size
    keep_alive = HfDeepSpeedConfig(copy.deepcopy(ds_cfg)) if zero_stage(ds_cfg) == 3 else None  # noqa: F841
    if model is None:
        dtype = getattr(torch, DTYPES[train.precision])
        model = load_model(model_path, dtype=dtype, attn_implementation=model_cfg.attn_implementation,
                           revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                           quantization_config=quantization_config(lora, dtype))
    # Training never decodes; without a cache transformers honours packed position_ids.
    model.config.use_cache = False
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        model = add_adapters(model, lora, train.seed, train.gradient_checkpointing, model_cfg.revision)
    groups = param_groups(model, train.weight_decay)
    betas = (train.adam_beta1, train.adam_beta2)
    if "offload_optimizer" in ds_cfg.get("zero_optimization", {}):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # with deepspeed above

        optimizer = DeepSpeedCPUAdam(groups, lr=train.lr, betas=betas, eps=train.adam_eps)
    else:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=betas, eps=train.adam_eps)
    warmup = math.ceil(train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, train.lr_scheduler, train.min_lr_ratio)
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def export_hf(engine: Any, tokenizer: Any, out_dir: str | Path, is_rank0: bool) -> None:
    """Write a ``save_pretrained`` folder (safetensors); ZeRO-3 shards are gathered first. All ranks call.
    With LoRA only the adapters are kept, and the folder holds them merged into the base
    (``lora.save_merged``; the adapters alone in ``adapter/``)."""
    lora = peft_model(engine) is not None
    if engine.zero_optimization_stage() == 3:
        # collective; the full dict (LoRA: the adapters) lands on rank 0
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
    else:
        state = engine.module_state_dict(exclude_frozen_parameters=lora) if is_rank0 else None
    if is_rank0:
        module = engine.module
        if lora:
            save_merged(module, state, out_dir, torch.bfloat16 if engine.bfloat16_enabled() else torch.float32)
        else:
            module.config.use_cache = True
            module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        # The chat template in tokenizer_config.json (not chat_template.jinja): read by every transformers version,
        # vLLM and TGI, so the exported model carries the template it was trained with (model.chat_template).
        tokenizer.save_pretrained(out_dir, save_jinja_files=False)
