import filecmp

import pytest

from zephyr_ray.models import ROLE_TOKENS, build_tiny, load_model, load_tokenizer, resolve_model_path


def test_build_tiny_is_byte_reproducible_and_reloads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = build_tiny(tmp_path / "a", seed=0), build_tiny(tmp_path / "b", seed=0)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    c = build_tiny(tmp_path / "c", seed=1)
    assert not filecmp.cmp(f"{a}/model.safetensors", f"{c}/model.safetensors", shallow=False)

    model, tok = load_model(a), load_tokenizer(a)
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 < n < 5e6
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in ROLE_TOKENS)
    # Byte-level BPE: any unicode round-trips.
    text = "naïve 東京 🙂 ```code```\n\tλ"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("mistralai/Mistral-7B-v0.1", tmp_path) == "mistralai/Mistral-7B-v0.1"
    built = resolve_model_path(None, tmp_path)
    assert built == str(tmp_path / "tiny-base") and (tmp_path / "tiny-base" / "config.json").exists()


def test_base_tokenizer_without_template_gets_zephyrs(tmp_path):
    path = build_tiny(tmp_path / "m")
    tok = load_tokenizer(path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    again = load_tokenizer(str(tmp_path / "plain"))
    assert "{% generation %}" in again.chat_template
    with pytest.raises(OSError):
        load_tokenizer(str(tmp_path / "missing"))


def test_base_tokenizer_gets_zephyr_template_without_growing_vocab(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from zephyr_ray.models import ZEPHYR_CHAT_TEMPLATE

    base = AutoTokenizer.from_pretrained(tiny_model)
    base.chat_template = None
    base.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template == ZEPHYR_CHAT_TEMPLATE
    assert len(tok) == len(base)  # the model's embeddings still cover every id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
