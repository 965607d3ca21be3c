"""LoRA / QLoRA (model.lora): config checks, the adapter-disabled dDPO reference, the merged export, and dDPO
with adapters through the real stage on ZeRO-2 and ZeRO-3."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from zephyr_ray.config import ConfigError, DPOConfig, LoRAConfig, PipelineRecipe, load_config
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.samples import sample_preferences
from zephyr_ray.models import load_model
from zephyr_ray.tracking import read_metrics
from zephyr_ray.train.lora import (
    ADAPTER_DIR,
    add_adapters,
    quantization_config,
    save_merged,
    without_adapters,
)
from zephyr_ray.train.objectives import DPOObjective, collate_pairs, forward_logps

from .conftest import ROOT
from .test_dpo import _cfg, _columns, _pairs

TINY_PIPELINE = ROOT / "configs" / "tiny" / "pipeline.yaml"

R = 8


@pytest.mark.parametrize(("override", "message"), [
    ("model.lora.r=0", "model.lora.r=0: must be >= 1"),
    ("model.lora.alpha=0", "model.lora.alpha=0: must be > 0"),
    ("model.lora.dropout=1.0", r"model.lora.dropout=1.0: must be within \[0, 1\)"),
    ("model.lora.target_modules=[all-linear,q_proj]", "model.lora.target_modules=.*all-linear.* alone"),
    ("model.lora.quantize=4bit", "model.lora.quantize='4bit': .*needs model.lora.enabled=true"),
    ("model.lora.quantize=2bit", r"model.lora.quantize='2bit' is not valid; choose one of \['none', '4bit', '8bit'\]"),
])
def test_bad_lora_settings_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_lora_keys_in_a_pipeline_are_named_with_their_stage():
    with pytest.raises(ConfigError, match="dpo.model.lora.r=-1"):
        load_config(TINY_PIPELINE, ["dpo.model.lora.r=-1"], PipelineRecipe)
    cfg = load_config(TINY_PIPELINE, ["sft.model.lora.enabled=true", "sft.model.lora.target_modules=[q_proj,v_proj]"],
                      PipelineRecipe)
    assert cfg.sft.model.lora.target_modules == ["q_proj", "v_proj"] and not cfg.dpo.model.lora.enabled


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_without_cuda_or_bitsandbytes_is_a_config_error(bits, monkeypatch):
    lora = LoRAConfig(enabled=True, quantize=bits)
    with pytest.raises(ConfigError, match=f"model.lora.quantize={bits} needs a CUDA GPU"):
        quantization_config(lora, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=f"model.lora.quantize={bits} needs bitsandbytes"):
        quantization_config(lora, torch.bfloat16)
    assert quantization_config(LoRAConfig(enabled=True), torch.bfloat16) is None


@pytest.fixture(scope="module")
def trained(tiny_model, tokenizer):
    """The tiny model with adapters after a few dDPO steps against its own adapter-disabled self, and a batch."""
    model = add_adapters(load_model(tiny_model), LoRAConfig(enabled=True, r=R, dropout=0.0), seed=0,
                         gradient_checkpointing=False)
    batch = collate_pairs(_columns(_pairs(tokenizer, 6)), tokenizer.pad_token_id, packing=False)
    objective = DPOObjective(tokenizer.pad_token_id, DPOConfig(), packing=False, adapter_ref=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        objective.loss(model, batch)[0].backward()
        optimizer.step()
    return model.eval(), batch


def test_only_the_adapters_train_and_the_base_is_untouched(tiny_model, trained):
    model, _ = trained
    base = load_model(tiny_model)
    # Every linear layer but the LM head gets A (r x in) and B (out x r), and nothing else trains.
    expected = sum(R * (m.in_features + m.out_features) for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(p.abs().max() > 0 for n, p in trainable.items() if ".lora_B." in n)  # B starts at 0: it trained
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
              for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen.keys() == dict(base.named_parameters()).keys()
    assert all(torch.equal(frozen[n], p) for n, p in base.named_parameters())


def test_adapter_disabled_reference_equals_a_frozen_copy_of_the_base(tiny_model, tokenizer, trained):
    model, batch = trained
    frozen = load_model(tiny_model).eval()
    with torch.no_grad():
        explicit = forward_logps(frozen, batch)[0]
        adapted = forward_logps(model, batch)[0]
    model.train()
    with without_adapters(model):
        assert not model.training
        reference = forward_logps(model, batch)[0]
    assert model.training  # restored, adapters back on
    assert reference.tolist() == pytest.approx(explicit.tolist(), abs=1e-5)
    assert (adapted - explicit).abs().max() > 1e-2  # the trained adapters do change the model
    # The dDPO loss and metrics are the same with either reference.
    cfg = DPOConfig()
    a = DPOObjective(tokenizer.pad_token_id, cfg, packing=False, adapter_ref=True).loss(model, batch)
    b = DPOObjective(tokenizer.pad_token_id, cfg, packing=False, ref_model=frozen).loss(model, batch)
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-5) and a[0].item() != pytest.approx(6 * math.log(2))
    assert {k: v.item() for k, v in a[1].items()} == pytest.approx({k: v.item() for k, v in b[1].items()}, abs=1e-5)
    model.eval()


def test_export_is_the_base_with_the_adapters_merged(trained, tmp_path):
    from safetensors import safe_open

    model, batch = trained
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_merged(model, adapters, tmp_path / "model", torch.float32)
    merged = load_model(str(tmp_path / "model")).eval()  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters()) and merged.config.use_cache
    ids = batch["input_ids"][:, :40]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    adapter = tmp_path / "model" / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["peft_type"]) == (R, "LORA")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(adapters) and all("lora_" in k for k in keys)


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_with_lora_zero2_precomputed_resumed_equals_zero3_adapter_reference(ray_cluster, tiny_model, tmp_path):
    """ZeRO-2 with the reference precomputed by actors from the base (a crash after step 3, resumed from step 2)
    and ZeRO-3 with the reference = the policy with adapters off (gradient checkpointing on) train the same."""
    from peft import PeftModel

    from zephyr_ray.train.dpo import run_dpo

    pairs = write_jsonl(sample_preferences(48, seed=2), tmp_path / "prefs.jsonl")
    common = [f"data.path={pairs}", "train.epochs=1", "train.micro_batch_size=4", "train.checkpoint_every=2",
              "train.lr=1e-2", "data.shuffle=false", "model.lora.enabled=true", f"model.lora.r={R}", "model.lora.dropout=0"]
    a = run_dpo(_cfg(tmp_path / "a", tiny_model, *common, "deepspeed.config=configs/deepspeed/zero2.json",
                     "data.packing=true", "train.inject_failure_at_step=3", "run.max_failures=1"))
    b = run_dpo(_cfg(tmp_path / "b", tiny_model, *common, "deepspeed.config=configs/deepspeed/zero3.json",
                     "dpo.ref.mode=online", "train.gradient_checkpointing=true", "data.packing=false"))
    ma, mb = read_metrics(a.output_dir), read_metrics(b.output_dir)
    assert len(ma) == len(mb) == 6
    assert ma[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at B = 0: policy == reference
    # Margins rise (pairs go out longest first, so the last steps hold the shortest answers: smaller margins).
    assert np.mean([m["rewards/margins"] for m in ma[-2:]]) > np.mean([m["rewards/margins"] for m in ma[:2]]) + 0.25
    restarts = [json.loads(line) for line in (a.output_dir / "restarts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in restarts] == [2]
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert [m[k] for m in ma] == pytest.approx([m[k] for m in mb], abs=2e-4), k
    # Both exports are the base with the adapters merged: plain HF folders, the adapters beside them.
    base = load_model(tiny_model).eval()
    ids = torch.tensor([list(range(3, 40))])
    for run in (a, b):
        merged = load_model(str(run.model_dir)).eval()
        adapted = PeftModel.from_pretrained(load_model(tiny_model), str(run.model_dir / ADAPTER_DIR)).eval()
        with torch.no_grad():
            logits = merged(input_ids=ids).logits
            assert torch.allclose(logits, adapted(input_ids=ids).logits, atol=1e-5)
            assert not torch.allclose(logits, base(input_ids=ids).logits, atol=1e-3)
    # Checkpoints hold the adapters, not the frozen base.
    states = sorted(a.output_dir.glob("ray/**/mp_rank_00_model_states.pt"))
    assert states
    module = torch.load(states[-1], map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module)
