"""Every supported base-model family (Mistral, Llama, Falcon, MPT, GPT-NeoX, Qwen2, Gemma) through the same code.

Per family, without Ray (a tiny random model of the family's real config class): the loss path of dSFT and
dDPO (``label_logits`` with ``logits_to_keep`` as a mask, packed rows equal to unpacked rows token by token,
preference loss + backward) and greedy generation through ``HFEngine`` equal to a plain unbatched
``generate``. The real Ray stages (``run_sft`` then ``run_dpo`` on its output, packed, the precomputed
reference) cost ~15 s of TorchTrainer overhead per fit on 2 cores, so they run for three representative
families only: MPT (ALiBi, no position_ids: the block-mask fallback, no SDPA: eager), Falcon (multi-query
attention, parallel blocks) and Gemma (tied embeddings, head_dim != hidden / heads). Mistral's stages are
covered by test_sft_train.py and test_dpo.py; the others share every code path with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zephyr_ray.attention import allows_one_row
from zephyr_ray.config import ConfigError, DPORecipe, SFTRecipe, load_config
from zephyr_ray.data.io import write_jsonl
from zephyr_ray.data.packing import collate, pack_sequences
from zephyr_ray.data.preference import tokenize_pair, validate_pair
from zephyr_ray.data.samples import sample_dialogues, sample_preferences
from zephyr_ray.data.tokenize import tokenize_messages
from zephyr_ray.generation.hf import HFEngine
from zephyr_ray.generation.types import SamplingParams
from zephyr_ray.models import (
    TEMPLATE_FOLDED,
    TEMPLATE_OWN,
    TEMPLATE_ZEPHYR,
    TINY_FAMILY_NAMES,
    build_tiny,
    chat_template_source,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from zephyr_ray.train.losses import label_logits, packed_inputs, preference_loss
from zephyr_ray.train.objectives import collate_pairs, forward_logps

from .conftest import ROOT
from .test_generation import CONVERSATIONS, alone, expected, spy_generate

CLASSES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "falcon": "FalconForCausalLM",
           "mpt": "MptForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "gemma": "GemmaForCausalLM"}


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def _per_sample_nll(model, rows, pad_id, one_row=False) -> dict[str, list[float]]:
    """Per-token next-token NLL of every sample of ``rows`` (packed or not), through ``label_logits``."""
    batch = collate(_columns(rows), pad_id, one_row=one_row)
    with torch.no_grad():
        logits, targets, keep = label_logits(model, batch)
    nll = F.cross_entropy(logits.float(), targets, reduction="none").tolist()
    seq_in_row = (batch["position_ids"] == 0).cumsum(-1) - 1
    out: dict[str, list[float]] = {}
    for j, (r, c) in enumerate(keep.nonzero().tolist()):
        out.setdefault(batch["sample_ids"][r][seq_in_row[r, c]], []).append(nll[j])
    return out


@pytest.mark.parametrize("arch", TINY_FAMILY_NAMES)
def test_family_builds_and_its_sft_and_dpo_losses_are_the_same_packed_or_not(arch, family_dir):
    path = family_dir(arch)
    model, tok = load_model(path).eval(), load_tokenizer(path)
    assert type(model).__name__ == CLASSES[arch]
    assert model.config.vocab_size == len(tok) and 1e5 < sum(p.numel() for p in model.parameters()) < 5e6
    assert chat_template_source(path) == TEMPLATE_OWN  # the tiny tokenizer carries Zephyr's template

    # dSFT: packed rows (several dialogues per row; all in one row where the attention allows it, as in
    # training) give every sample the same per-token losses as one dialogue per right-padded row.
    seqs = [{**tokenize_messages(tok, d["messages"], max_length=96), "sample_id": str(i)}
            for i, d in enumerate(sample_dialogues(6, seed=3))]
    packed_rows = pack_sequences(seqs, 256)
    assert len(packed_rows) < len(seqs)  # really packed
    plain_rows = [{"input_ids": s["input_ids"], "labels": s["labels"], "position_ids": list(range(len(s["input_ids"]))),
                   "sample_ids": [s["sample_id"]]} for s in seqs]
    flat = allows_one_row(model)
    assert flat == (arch not in ("falcon", "mpt"))
    packed, plain = (_per_sample_nll(model, packed_rows, tok.pad_token_id, flat),
                     _per_sample_nll(model, plain_rows, tok.pad_token_id))
    assert sorted(packed) == sorted(plain) == [str(i) for i in range(6)]
    for sid in plain:
        assert packed[sid] == pytest.approx(plain[sid], abs=1e-4), f"sample {sid}"

    # dDPO: packed (the micro-batch in one row, or one row per pair) and as two padded rows give the same
    # log-probs; policy == reference
    # gives log 2, and the loss backpropagates into every weight.
    pairs = [{**tokenize_pair(tok, validate_pair(row)), "sample_ids": [str(i)]}
             for i, row in enumerate(sample_preferences(4, seed=5))]
    batch = _columns(pairs)
    with torch.no_grad():
        ref = forward_logps(model, collate_pairs(batch, tok.pad_token_id, packing=False))[0]
    model.train()
    logps = forward_logps(model, collate_pairs(batch, tok.pad_token_id, packing=True, one_row=flat))[0]
    assert logps.tolist() == pytest.approx(ref.tolist(), abs=1e-4)
    losses, _, _ = preference_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1)
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-5)
    losses.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("arch", TINY_FAMILY_NAMES)
def test_family_greedy_generation_batched_equals_each_prompt_alone(arch, family_dir, monkeypatch):
    from zephyr_ray.config import EngineConfig

    path = family_dir(arch)
    engine = HFEngine(EngineConfig(batch_size=3, tiny_arch=arch), path)  # loads as a served model would
    calls = spy_generate(engine, monkeypatch)
    out = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=8))
    assert any((mask == 0).any() for _, mask, _ in calls)  # left padding really happened
    prompts = engine.prompt_ids(CONVERSATIONS)
    for i, ids in enumerate(prompts):
        ref = alone(engine, ids, 8)
        (c,) = out[i]
        assert (c.text, c.completion_tokens, c.finish_reason) == expected(engine.tokenizer, ref, 8, engine.eos_ids), i
    batched = {tuple(ids[r][mask[r].bool()].tolist()): gen[r, ids.shape[1]:].tolist()
               for ids, mask, gen in calls for r in range(ids.shape[0])}
    for ids in prompts:
        ref = alone(engine, ids, 8)
        assert batched[tuple(ids)][:len(ref)] == ref


def test_tiny_arch_config_field_and_model_paths(tmp_path):
    cfg = load_config(ROOT / "configs/tiny/sft.yaml", ["model.tiny_arch=gpt_neox"], SFTRecipe)
    assert cfg.model.tiny_arch == "gpt_neox"
    with pytest.raises(ConfigError, match="tiny_arch"):
        load_config(ROOT / "configs/tiny/sft.yaml", ["model.tiny_arch=bloom"], SFTRecipe)
    built = resolve_model_path(None, tmp_path, seed=0, arch="qwen2")
    assert built == str(tmp_path / "tiny-base-qwen2")
    assert load_model(built).config.model_type == "qwen2"
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_tiny(tmp_path / "x", arch="bloom")


# Gemma's official template: no system role (it raises), user/model turns.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def _with_template(src: str, dst: Path, template: str | None) -> str:
    """A copy of the model at ``src`` whose tokenizer has ``template`` (None: no template)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = template
    tok.save_pretrained(dst)
    if template is None:
        (dst / "chat_template.jinja").unlink(missing_ok=True)
    return str(dst)


def test_templates_without_a_system_role_get_it_folded_into_the_first_user_turn(family_dir, tmp_path):
    from transformers import AutoTokenizer

    path = _with_template(family_dir("gemma"), tmp_path / "gemma", GEMMA_TEMPLATE)
    raw = AutoTokenizer.from_pretrained(path)
    with pytest.raises(Exception, match="System role not supported"):
        raw.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False)
    tok = load_tokenizer(path)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    folded = [{"role": "user", "content": "Be brief.\n\nHi"}, *convo[2:]]
    for gen in (False, True):
        got = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
        assert got == raw.apply_chat_template(folded, tokenize=False, add_generation_prompt=gen)
        # Without a system message the template is exactly the family's own.
        assert (tok.apply_chat_template(convo[1:], tokenize=False, add_generation_prompt=gen)
                == raw.apply_chat_template(convo[1:], tokenize=False, add_generation_prompt=gen))
    assert tok.apply_chat_template(convo[:1], tokenize=False) == raw.apply_chat_template(
        [{"role": "user", "content": "Be brief."}], tokenize=False)  # a lone system message becomes the user turn
    assert chat_template_source(path) == chat_template_source(raw) == TEMPLATE_FOLDED
    assert raw.chat_template == GEMMA_TEMPLATE  # asking about a tokenizer leaves it as it was
    # The engines render through the same tokenizer: a system prompt reaches a Gemma-style model.
    from zephyr_ray.config import EngineConfig

    engine = HFEngine(EngineConfig(), path)
    want = raw.apply_chat_template(folded[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert engine.prompt_ids([convo[:2]])[0] == list(want)

    # Templates that fail for another reason keep their own error; no template gets Zephyr's, visibly.
    broken = _with_template(family_dir("gemma"), tmp_path / "broken", "{{ raise_exception('always') }}")
    assert chat_template_source(broken) == TEMPLATE_OWN
    with pytest.raises(Exception, match="always"):
        load_tokenizer(broken).apply_chat_template(convo[1:2], tokenize=False)
    bare = _with_template(family_dir("gemma"), tmp_path / "bare", None)
    assert chat_template_source(bare) == TEMPLATE_ZEPHYR


def test_models_without_position_ids_or_logits_to_keep_get_the_same_losses(family_dir):
    """The fallbacks, on a model that hides both arguments (as older remote-code models do): an explicit
    block mask and full logits then selected give the per-token losses of the direct path."""
    path = family_dir("llama")
    model, tok = load_model(path).eval(), load_tokenizer(path)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    seqs = [{**tokenize_messages(tok, d["messages"], max_length=64), "sample_id": str(i)}
            for i, d in enumerate(sample_dialogues(5, seed=7))]
    rows = pack_sequences(seqs, 200)
    assert len(rows) < len(seqs)
    direct, plain = _per_sample_nll(model, rows, tok.pad_token_id), _per_sample_nll(Plain(), rows, tok.pad_token_id)
    assert sorted(direct) == sorted(plain)
    for sid in direct:
        assert plain[sid] == pytest.approx(direct[sid], abs=1e-4)


def test_a_family_with_no_way_to_separate_packed_sequences_is_refused():
    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, use_cache=None, logits_to_keep=0):
            raise AssertionError("never called")

    packed = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(ConfigError, match="data.packing=false"):
        packed_inputs(NoPositions(), packed, torch.float32)
    assert packed_inputs(NoPositions(), torch.arange(5)[None], torch.float32) == {}  # unpacked rows are fine


def test_manifest_records_the_chat_template_of_each_training_stage(tmp_path, monkeypatch):
    from zephyr_ray import pipeline
    from zephyr_ray.config import PipelineRecipe
    from zephyr_ray.train import dpo, sft
    from zephyr_ray.train.launch import StageResult

    def fake(template):
        return lambda cfg: StageResult(Path(cfg.run.output_dir), Path(cfg.run.output_dir) / "model", 1, {}, template)

    monkeypatch.setattr(sft, "run_sft", fake(TEMPLATE_ZEPHYR))
    monkeypatch.setattr(dpo, "run_dpo", fake(TEMPLATE_OWN))
    cfg = load_config(ROOT / "configs/tiny/pipeline.yaml", [], PipelineRecipe)
    m = pipeline.Manifest(tmp_path / "manifest.json", {"stages": {"sft": {"artifacts": {"model": "/m/sft"}},
                                                                  "aif": {"artifacts": {"pairs": "/p.jsonl"}}}})
    assert pipeline._stage_sft(cfg, tmp_path, m)["chat_template"] == TEMPLATE_ZEPHYR
    assert pipeline._stage_dpo(cfg, tmp_path, m)["chat_template"] == TEMPLATE_OWN


# ------------------------------------------------------------------------------------------------ Ray stages


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("family-data")
    return (write_jsonl(sample_dialogues(24, seed=4), d / "sft.jsonl"),
            write_jsonl(sample_preferences(12, seed=6), d / "prefs.jsonl"))


ONE_WORKER = ["wandb.enabled=false", "scaling.num_workers=1", "train.max_steps=2", "data.packing=true",
              "train.micro_batch_size=2"]


@pytest.mark.ray
@pytest.mark.slow
# One family through Ray + DeepSpeed (the suite's time budget): MPT, the one whose packed rows need the explicit
# block mask, given a base tokenizer without a chat template (as MPT-7B's and Falcon-7B's), which gets Zephyr's.
# The other families' per-token losses, log-probs and generation are checked in-process above.
@pytest.mark.parametrize("arch", ["mpt"])
def test_family_runs_the_real_sft_then_dpo_stages(ray_cluster, family_data, family_dir, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from zephyr_ray.tracking import read_metrics
    from zephyr_ray.train.dpo import run_dpo
    from zephyr_ray.train.sft import run_sft

    sft_data, pref_data = family_data
    base, template = [f"model.path={_with_template(family_dir(arch), tmp_path / 'base', None)}"], TEMPLATE_ZEPHYR
    sft = run_sft(load_config(ROOT / "configs/tiny/sft.yaml",
                              [*base, f"run.output_dir={tmp_path / 'sft'}", f"data.path={sft_data}", *ONE_WORKER],
                              SFTRecipe))
    ms = read_metrics(sft.output_dir)
    assert [m["step"] for m in ms] == [1, 2] and all(math.isfinite(m["loss"]) for m in ms)
    assert sft.chat_template == template
    assert type(AutoModelForCausalLM.from_pretrained(sft.model_dir)).__name__ == CLASSES[arch]

    dpo = run_dpo(load_config(ROOT / "configs/tiny/dpo.yaml",
                              [f"model.path={sft.model_dir}", f"run.output_dir={tmp_path / 'dpo'}",
                               f"data.path={pref_data}", *ONE_WORKER], DPORecipe))
    md = read_metrics(dpo.output_dir)
    assert [m["step"] for m in md] == [1, 2]
    # Step 1: the policy (training under DeepSpeed) equals the precomputed reference (Ray Data actor).
    assert md[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert md[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert dpo.chat_template == TEMPLATE_OWN  # the dSFT model carries the template it was trained with
    assert type(AutoModelForCausalLM.from_pretrained(dpo.model_dir)).__name__ == CLASSES[arch]
