"""``attention.sdpa_varlen``: SDPA per packed sequence, a drop-in for ``sdpa`` (no Ray).

Checked against independent references: each sequence run alone, and transformers' eager attention (which
builds its masks itself), for packed rows, sliding windows, padded batches and KV-cache decoding; gradients
too. And that a packed row really is split (no row-sized mask reaches SDPA)."""

from __future__ import annotations

import json

import pytest
import torch

from zephyr_ray import attention
from zephyr_ray.attention import VARLEN_SDPA, allows_one_row
from zephyr_ray.models import TINY_FAMILY_NAMES, load_model

# What load_model gives each family asked for "sdpa": the varlen SDPA where transformers' attention interface
# exists; Falcon keeps its own SDPA code, MPT has none (eager).
EXPECTED = {"falcon": "sdpa", "mpt": "eager"}
LENGTHS = [5, 9, 3, 12]


def _packed(lengths, vocab=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(10, vocab, (n,), generator=g) for n in lengths]
    return seqs, torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.mark.parametrize("arch", [a for a in TINY_FAMILY_NAMES if a not in EXPECTED])
def test_packed_row_equals_each_sequence_alone(arch, family_dir):
    model = load_model(family_dir(arch)).eval()
    assert model.config._attn_implementation == VARLEN_SDPA and allows_one_row(model)
    seqs, ids, pos = _packed(LENGTHS)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    assert (packed - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_families_without_the_attention_interface_keep_their_own(arch, family_dir):
    model = load_model(family_dir(arch))
    assert model.config._attn_implementation == EXPECTED[arch] and not allows_one_row(model)


def test_sdpa_is_called_once_per_sequence_without_a_mask(family_dir, monkeypatch):
    from transformers.integrations import sdpa_attention

    model = load_model(family_dir("mistral")).eval()
    seen = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, mask, **kw):
        seen.append((query.shape[2], mask))
        return real(module, query, key, value, mask, **kw)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    _, ids, pos = _packed(LENGTHS)
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=False)
    layers = model.config.num_hidden_layers
    assert [n for n, _ in seen] == LENGTHS * layers and all(m is None for _, m in seen)


def _windowed(path, attn, window):
    model = load_model(path, attn_implementation=attn).eval()
    model.config.sliding_window = window
    for m in model.modules():
        if hasattr(m, "sliding_window"):
            m.sliding_window = window
    return model


def test_sliding_window_matches_eager_packed_or_not(family_dir):
    varlen, eager = _windowed(family_dir("mistral"), "sdpa", 4), _windowed(family_dir("mistral"), "eager", 4)
    assert varlen.config._attn_implementation == VARLEN_SDPA
    seqs, ids, pos = _packed([20, 7, 11])
    with torch.no_grad():
        ref = torch.cat([eager(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        full = _windowed(family_dir("mistral"), "eager", None)(input_ids=seqs[0][None], use_cache=False).logits[0]
        assert (full - ref[:20]).abs().max().item() > 1e-3  # the window really changes the result
        assert (varlen(input_ids=seqs[0][None], use_cache=False).logits[0] - ref[:20]).abs().max().item() < 1e-5
        packed = varlen(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    assert (packed - ref).abs().max().item() < 1e-5


def test_gradients_of_a_packed_row_equal_those_of_separate_rows(family_dir):
    model = load_model(family_dir("llama"))
    seqs, ids, pos = _packed(LENGTHS)
    sum(model(input_ids=s[None], use_cache=False).logits.logsumexp(-1).sum() for s in seqs).backward()
    alone = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(input_ids=ids, position_ids=pos, use_cache=False).logits.logsumexp(-1).sum().backward()
    for a, p in zip(alone, model.parameters()):
        assert torch.allclose(p.grad, a, atol=1e-5, rtol=1e-4)


def test_padded_batches_and_cached_decoding_equal_eager(family_dir):
    """Generation: left padding (a padding mask) and one-token decode steps (a KV cache) take plain SDPA."""
    path = family_dir("qwen2")
    varlen, eager = load_model(path).eval(), load_model(path, attn_implementation="eager").eval()
    ids = torch.tensor([[0, 0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27]])
    mask = (ids != 0).long()
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert varlen.generate(ids, **kw).tolist() == eager.generate(ids, **kw).tolist()
        a = varlen(input_ids=ids, attention_mask=mask).logits
        b = eager(input_ids=ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() < 1e-5


def test_an_exported_model_does_not_name_the_custom_attention(family_dir, tmp_path):
    """The switch happens after loading: a saved model loads anywhere, with any attention."""
    model = load_model(family_dir("mistral"))
    model.save_pretrained(tmp_path)
    assert "sdpa_varlen" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    attention.register()  # idempotent
    assert load_model(str(tmp_path)).config._attn_implementation == VARLEN_SDPA
