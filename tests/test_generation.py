"""Generation engines: the transformers engine against plain single-prompt ``generate`` (token-exact), token
accounting, stop strings, seeded sampling, option probabilities; the OpenAI engine against a local HTTP server
(retries, Retry-After, key header, bounded concurrency, no retry on 400); the vLLM backend's missing-module error."""

from __future__ import annotations

import functools
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from zephyr_ray.config import ConfigError, EngineConfig, validate
from zephyr_ray.generation import Completion, SamplingParams, ScoringEngine, make_engine, option_sequences
from zephyr_ray.generation.hf import HFEngine, processor_classes
from zephyr_ray.generation.openai_engine import EndpointError, OpenAIEngine

# Conversations of clearly different prompt lengths (one and two turns, with and without system prompts).
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Sort these numbers: 31, 23, 38, 58, 59. Then tell me which is the largest one "
                                 "and which is the smallest one, and explain how you found them."}],
    [{"role": "user", "content": "Reverse the word 'garden'."}, {"role": "assistant", "content": "'nedrag'."},
     {"role": "user", "content": "Now in upper case."}],
    [{"role": "user", "content": "Name a river."}],
    [{"role": "system", "content": "You are a careful tutor who explains each step."},
     {"role": "user", "content": "Write a Python function named add_pair that can add two numbers."},
     {"role": "assistant", "content": "def add_pair(a, b):\n    return a + b"},
     {"role": "user", "content": "What does add_pair(3, 4) return?"}],
    [{"role": "user", "content": "How many characters are in 'meadow'?"}],
]


@pytest.fixture(scope="module")
def model(tiny_model):
    from zephyr_ray.models import load_model

    return load_model(tiny_model).eval()


def engine_for(tiny_model, tokenizer, model, **cfg) -> HFEngine:
    return HFEngine(EngineConfig(**{"batch_size": 3, **cfg}), tiny_model, model=model, tokenizer=tokenizer)


def alone(engine: HFEngine, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy ``generate`` on one unpadded prompt: the reference a batched row must equal."""
    with torch.inference_mode():
        model = engine.model  # the class's generate: never a spy set on the instance
        out = type(model).generate(model, torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)
    return out[0, len(ids):].tolist()


def expected(tokenizer, ref: list[int], max_new_tokens: int, eos_ids) -> tuple[str, int, str]:
    """(text, completion_tokens, finish_reason) of a reference token list: cut after the first EOS, which is
    counted but not text; without one it must have run to ``max_new_tokens``."""
    k = next((i for i, t in enumerate(ref) if t in set(eos_ids)), None)
    if k is not None:
        return tokenizer.decode(ref[:k], skip_special_tokens=True), k + 1, "stop"
    assert len(ref) == max_new_tokens
    return tokenizer.decode(ref, skip_special_tokens=True), max_new_tokens, "length"


def spy_generate(engine: HFEngine, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Records (input_ids, attention_mask, output) of every ``model.generate`` call the engine makes."""
    calls = []
    original = engine.model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs["input_ids"], kwargs["attention_mask"], out))
        return out

    monkeypatch.setattr(engine.model, "generate", spy)
    return calls


# ------------------------------------------------------------------------------------------ transformers


def test_greedy_batched_rows_equal_each_prompt_alone(tiny_model, tokenizer, model, monkeypatch):
    engine = engine_for(tiny_model, tokenizer, model, batch_size=3)
    calls = spy_generate(engine, monkeypatch)
    params = SamplingParams(max_new_tokens=20)
    out = engine.generate(CONVERSATIONS, params)

    prompts = engine.prompt_ids(CONVERSATIONS)
    lengths = sorted({len(p) for p in prompts})
    assert len(lengths) >= 5, lengths  # really different lengths
    assert len(calls) == 3  # 7 rows in buckets of 3
    # Batches are bucketed by length (longest first) and at least one is left-padded.
    widths = [ids.shape[1] for ids, _, _ in calls]
    assert widths == sorted(widths, reverse=True)
    assert any((mask == 0).any() for _, mask, _ in calls)

    # Every row of every batch, unpadded, generated alone gives the same tokens.
    batched: dict[tuple[int, ...], list[int]] = {}
    for ids, mask, gen in calls:
        width = ids.shape[1]
        for r in range(ids.shape[0]):
            batched[tuple(ids[r][mask[r].bool()].tolist())] = gen[r, width:].tolist()
    assert len(batched) == len(CONVERSATIONS)
    for i, ids in enumerate(prompts):
        ref = alone(engine, ids, 20)
        assert batched[tuple(ids)][:len(ref)] == ref, f"conversation {i}"
        # ... and the completion returned for conversation i (input order) is that text and count.
        (c,) = out[i]
        assert c.prompt_tokens == len(ids)
        assert (c.text, c.completion_tokens, c.finish_reason) == expected(tokenizer, ref, 20, engine.eos_ids)
    assert sum(c.completion_tokens for (c,) in out) > 100  # the rows really decoded (random weights: no EOS)

    stats = engine.stats.as_dict()
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts)
    assert stats["prompt_slots"] == sum(ids.numel() for ids, _, _ in calls)
    assert 0 < stats["prompt_padding"] < 0.5


def test_eos_counts_exact_tokens_and_excludes_padding(tiny_model, tokenizer):
    """A row that ends with EOS counts its tokens up to and including the EOS, not the padding behind it."""
    from zephyr_ray.models import load_model

    probe = engine_for(tiny_model, tokenizer, load_model(tiny_model).eval())
    refs = [alone(probe, ids, 16) for ids in probe.prompt_ids(CONVERSATIONS)]
    # A token that conversation 0 emits at step >= 3 and some other conversation never emits: as an extra EOS
    # id (models can have several, e.g. Llama 3), it ends rows at different steps while others run to length.
    eos = next(t for t in refs[0][2:] if any(t not in r for r in refs[1:]) and t not in refs[0][:2])
    model = load_model(tiny_model).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, eos]
    engine = engine_for(tiny_model, tokenizer, model, batch_size=4)
    out = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=16))
    assert engine.eos_ids == sorted({tokenizer.eos_token_id, eos})
    for ref, (c,) in zip(refs, out):
        # Counted up to and including the EOS; the EOS is not text (it is an ordinary token here).
        assert (c.text, c.completion_tokens, c.finish_reason) == expected(tokenizer, ref, 16, engine.eos_ids)
    assert out[0][0].finish_reason == "stop" and out[0][0].completion_tokens >= 3
    assert {c.finish_reason for (c,) in out} == {"stop", "length"}
    assert engine.stats.completion_tokens == sum(c.completion_tokens for (c,) in out)
    assert engine.stats.completion_tokens < engine.stats.decode_slots  # padding computed, not counted


def test_stop_strings_cut_text_and_count_tokens(tiny_model, tokenizer, model):
    engine = engine_for(tiny_model, tokenizer, model, batch_size=4)
    prompts = engine.prompt_ids(CONVERSATIONS)
    refs = [alone(engine, ids, 24) for ids in prompts]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in refs]
    # A stop string from the middle of conversation 2's text that conversation 0 never writes.
    stop = next(s for k in range(6, 16)
                if (s := tokenizer.decode(refs[2][k:k + 2], skip_special_tokens=True)).strip()
                and "\ufffd" not in s and s not in texts[0])
    out = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=24, stop=["zz-never-zz", stop]))
    stopped = 0
    for ref, text, (c,) in zip(refs, texts, out):
        if stop in text:
            stopped += 1
            # Tokens up to and including the one that completed the stop string.
            k = next(k for k in range(1, len(ref) + 1) if stop in tokenizer.decode(ref[:k], skip_special_tokens=True))
            assert c.text == text[:text.index(stop)]
            assert (c.completion_tokens, c.finish_reason) == (k, "stop")
        else:
            assert (c.text, c.completion_tokens, c.finish_reason) == (text, 24, "length")
    assert stopped >= 1 and out[2][0].finish_reason == "stop" and out[0][0].finish_reason == "length"
    assert stop not in out[2][0].text


def test_prompts_are_cut_from_the_left(tiny_model, tokenizer, model):
    engine = engine_for(tiny_model, tokenizer, model, max_prompt_length=12)
    full = engine_for(tiny_model, tokenizer, model).prompt_ids(CONVERSATIONS)
    assert engine.prompt_ids(CONVERSATIONS) == [p[-12:] for p in full]
    out = engine.generate(CONVERSATIONS[:3], SamplingParams(max_new_tokens=8))
    assert [c.prompt_tokens for (c,) in out] == [min(12, len(p)) for p in full[:3]]
    assert out[2][0].text == tokenizer.decode(alone(engine, full[2][-12:], 8), skip_special_tokens=True)


def test_sampling_n_and_seed(tiny_model, tokenizer, model):
    engine = engine_for(tiny_model, tokenizer, model, batch_size=4)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7, n=3)
    first = engine.generate(CONVERSATIONS, params)
    assert [len(c) for c in first] == [3] * len(CONVERSATIONS)
    texts = [[c.text for c in cs] for cs in first]
    # Same inputs + params -> same outputs; the n samples are different draws; another seed differs.
    assert [[c.text for c in cs] for cs in engine.generate(CONVERSATIONS, params)] == texts
    assert all(len(set(t)) == 3 for t in texts)
    other = engine.generate(CONVERSATIONS[:3], SamplingParams(**{**params.__dict__, "seed": 8}))
    assert sum(a != b for t, o in zip(texts, other) for a, b in zip(t, (c.text for c in o))) >= 8
    # Per-row generators: a prompt's samples do not depend on the rest of the call, its order or batch size.
    single = engine_for(tiny_model, tokenizer, model, batch_size=1)
    assert [c.text for c in single.generate([CONVERSATIONS[4]], params)[0]] == texts[4]
    shuffled = engine_for(tiny_model, tokenizer, model, batch_size=5).generate(CONVERSATIONS[::-1], params)
    assert [[c.text for c in cs] for cs in shuffled[::-1]] == texts
    # Completions from sampling are still counted like greedy ones.
    assert all(c.prompt_tokens == len(p) and 1 <= c.completion_tokens <= 8
               for cs, p in zip(first, engine.prompt_ids(CONVERSATIONS)) for c in cs)


def test_greedy_n_copies_and_tiny_top_p_is_greedy(tiny_model, tokenizer, model):
    engine = engine_for(tiny_model, tokenizer, model)
    greedy = engine.generate(CONVERSATIONS, SamplingParams(max_new_tokens=10, n=2))
    assert all(len(cs) == 2 and cs[0] == cs[1] and cs[0] is not cs[1] for cs in greedy)
    # A nucleus smaller than the top token's probability keeps only the argmax: sampling equals greedy.
    nucleus = engine.generate(CONVERSATIONS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=3))
    assert [cs[0].text for cs in nucleus] == [cs[0].text for cs in greedy]


def test_seeded_sampler_draws_from_tempered_nucleus():
    sampler_cls, _ = processor_classes()
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log() * 2.0  # temperature 2 brings back `probs`
    draws = 4000

    def freq(top_p: float) -> torch.Tensor:
        sampler = sampler_cls([123], temperature=2.0, top_p=top_p)
        counts = torch.zeros(4)
        for _ in range(draws):
            out = sampler(torch.zeros(1, 1, dtype=torch.long), logits.clone())
            assert torch.isfinite(out).sum() == 1
            counts[out[0].argmax()] += 1
        return counts / draws

    assert torch.allclose(freq(1.0), probs[0], atol=0.03)
    # top_p 0.6: tokens 0 and 1 (0.5 + 0.3 reaches it), renormalised.
    assert torch.allclose(freq(0.6), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03)


def test_option_probs_match_manual_softmax(tiny_model, tokenizer, model):
    engine = engine_for(tiny_model, tokenizer, model, batch_size=3)
    assert isinstance(engine, ScoringEngine)
    options = ["1", "2", "3", "4", "5"]
    got = engine.option_probs(CONVERSATIONS, options, prefix="Rating:")
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in options]
    prefix = tokenizer("Rating:", add_special_tokens=False)["input_ids"]
    assert option_sequences(tokenizer, options, "Rating:") == (prefix, [[i] for i in ids])
    for conv, p in zip(CONVERSATIONS, got):
        prompt = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"] + prefix
        with torch.inference_mode():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        want = torch.softmax(logits[ids], dim=-1)
        assert sum(p) == pytest.approx(1.0, abs=1e-6)
        assert p == pytest.approx(want.tolist(), abs=1e-5)
    assert len({tuple(round(x, 4) for x in p) for p in got}) == len(CONVERSATIONS)  # they depend on the prompt
    # "Rating: " + "5" merges into one "Ġ5" token: the prompt keeps the prefix's own tokens (its "Ġ" included) and
    # the option is its standalone token (AIF's expected ratings have always been scored so).
    spaced, seqs = option_sequences(tokenizer, ["5"], "Rating: ")
    assert tokenizer.convert_ids_to_tokens(spaced)[-1] == "Ġ" and seqs == [[ids[4]]]
    with pytest.raises(ValueError, match="at least one option"):
        engine.option_probs(CONVERSATIONS[:1], [])


def _brute_force(model, tokenizer, conv, prefix_ids, seqs):
    """Renormalised P(option) with one full unpadded forward per (conversation, option): the reference."""
    prompt = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"] + prefix_ids
    logps = []
    for seq in seqs:
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([prompt + seq])).logits[0].float(), dim=-1)
        logps.append(sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(seq)))
    return torch.softmax(torch.tensor(logps, dtype=torch.float64), dim=0).tolist()


def test_multi_token_options_equal_a_full_forward_per_option(tiny_model, tokenizer, model, monkeypatch):
    engine = engine_for(tiny_model, tokenizer, model, batch_size=2)
    convs = CONVERSATIONS[1:4]  # 3 conversations of different lengths: batches of 2 (left padded) and 1
    tokens = lambda seq: tokenizer.convert_ids_to_tokens(seq)  # noqa: E731
    # The MT-Bench judge's options: each rating with its closing marker; on the tiny tokenizer every one is three
    # tokens ("1", "]", "]"), and "10" is one token, so "1]]" and "10]]" differ in their first token already.
    ratings = [str(k) for k in range(1, 11)]
    prefix_ids, seqs = option_sequences(tokenizer, ratings, "Rating: [[", "]]")
    assert tokens(prefix_ids)[-3:] == ["Ġ", "[", "["] and tokens(seqs[0]) == ["1", "]", "]"]
    assert tokens(seqs[9]) == ["10", "]", "]"]
    # The boundary: tokenizing the prefill and the option together gives the same tokens (no merge across "[[").
    for r, seq in zip(ratings, seqs):
        assert tokenizer(f"Rating: [[{r}]]", add_special_tokens=False)["input_ids"] == prefix_ids + seq
    # Options of unequal lengths without a marker: "7" one token, "yes" two, "seventeen" six, and "427", which
    # BPE merges with the prefix's space ("Ġ42", "7"): it is then scored as tokenized alone ("42", "7").
    mixed = ["7", "yes", "427", "seventeen"]
    spaced, mixed_seqs = option_sequences(tokenizer, mixed, "Answer: ")
    assert tokens(spaced)[-1] == "Ġ" and [tokens(s) for s in mixed_seqs[:3]] == [["7"], ["y", "es"], ["42", "7"]]
    assert len(mixed_seqs[3]) == 6
    calls = []
    forward = type(engine.model).forward

    @functools.wraps(forward)
    def spy(self, *args, **kwargs):
        cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        calls.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1], cached))
        return forward(self, *args, **kwargs)

    for options, prefix, suffix in ((ratings, "Rating: [[", "]]"), (mixed, "Answer: ", "")):
        with monkeypatch.context() as m:
            m.setattr(type(engine.model), "forward", spy)
            got = engine.option_probs(convs, options, prefix=prefix, suffix=suffix)
        prefix_ids, seqs = option_sequences(tokenizer, options, prefix, suffix)
        for conv, p in zip(convs, got):
            assert sum(p) == pytest.approx(1.0, abs=1e-6)
            assert p == pytest.approx(_brute_force(model, tokenizer, conv, prefix_ids, seqs), abs=1e-5)
        # Per batch: the prompt forward once, then one forward of len - 1 tokens over its cache per multi-token
        # option; never a prompt forward per option.
        prompts = [c for c in calls if not c[2]]
        assert [rows for rows, _, _ in prompts] == [2, 1]
        per_batch = [len(s) - 1 for s in seqs if len(s) > 1]
        assert [(width, cached) for _, width, cached in calls] == [
            x for rows, width, _ in prompts for x in [(width, False), *((n, True) for n in per_batch)]]
        calls.clear()


@pytest.mark.parametrize("options, suffix, match", [
    (["1", "10"], "", "'1' is a prefix of option '10'"),  # P("1") would swallow "10"
    (["A", "A"], "]]", "'A' is a prefix of option 'A'"),
])
def test_options_that_cannot_be_told_apart_are_refused(tokenizer, options, suffix, match):
    with pytest.raises(ValueError, match=match):
        option_sequences(tokenizer, options, "[[", suffix)
    # With the closing marker "1" and "10" are told apart.
    assert len(option_sequences(tokenizer, ["1", "10"], "[[", "]]")[1]) == 2


def test_make_engine_and_param_checks(tiny_model, tmp_path):
    engine = make_engine(EngineConfig(path=tiny_model), tmp_path)
    assert isinstance(engine, HFEngine) and isinstance(engine, ScoringEngine)
    for bad, match in ((dict(n=0), "n must"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(stop=[""]), "stop")):
        with pytest.raises(ValueError, match=match):
            engine.generate(CONVERSATIONS[:1], SamplingParams(**bad))
    assert engine.generate([], SamplingParams()) == []


def test_vllm_missing_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable, even where it is installed
    with pytest.raises(ImportError, match=r"pip install 'zephyr-ray\[gpu\]'"):
        make_engine(EngineConfig(backend="vllm"), tmp_path)
    assert not (tmp_path / "tiny-base").exists()  # failed before building anything



def test_vllm_option_probs_sum_the_options_prompt_logprobs(tiny_model, tokenizer, model, monkeypatch):
    """The vLLM engine's scoring on a stand-in ``vllm`` whose ``prompt_logprobs`` come from the tiny model (one
    full forward per prompt, as vLLM returns them): the same probabilities as the transformers engine."""
    import types

    class LLM:
        def __init__(self, **kwargs):
            self.prompts = []

        def generate(self, inputs, sampling, use_tqdm=False):
            assert sampling.kwargs == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            out = []
            for item in inputs:
                ids = item["prompt_token_ids"]
                self.prompts.append(ids)
                with torch.inference_mode():
                    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                scored = [None] + [{t: types.SimpleNamespace(logprob=lp[j - 1, t].item())} for j, t in
                                   enumerate(ids) if j]
                out.append(types.SimpleNamespace(prompt_logprobs=scored))
            return out

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: types.SimpleNamespace(kwargs=kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from zephyr_ray.generation.vllm_engine import VLLMEngine

    engine = VLLMEngine(EngineConfig(backend="vllm"), tiny_model)
    convs = CONVERSATIONS[:2]
    got = engine.option_probs(convs, ["A", "B", "C"], prefix="[[", suffix="]]")
    want = engine_for(tiny_model, tokenizer, model).option_probs(convs, ["A", "B", "C"], prefix="[[", suffix="]]")
    assert len(engine.llm.prompts) == 2 * 3 and all(sum(p) == pytest.approx(1.0) for p in got)
    for p, q in zip(got, want):
        assert p == pytest.approx(q, abs=1e-5)


# ------------------------------------------------------------------------------------------------ openai


class FakeOpenAI(ThreadingHTTPServer):
    """A chat completions endpoint on 127.0.0.1: answers scripted statuses first, then echoes the last user
    turn; records every request and the most requests ever in flight at once."""

    daemon_threads = True

    def __init__(self, script=(), delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = list(script)  # (status, headers) answered in order before any success
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.inflight = self.max_inflight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        srv: FakeOpenAI = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                                 "t": time.monotonic()})
            status, headers = srv.script.pop(0) if srv.script else (200, {})
        time.sleep(srv.delay)
        if status == 200:
            last = body["messages"][-1]["content"]
            reply = f"echo {last} seed {body['seed']}"
            payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                    "finish_reason": "length" if body["max_tokens"] < 5 else "stop"}],
                       "usage": {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                                 "completion_tokens": len(reply.split())}}
        else:
            payload = {"error": {"message": f"scripted {status}", "type": "test"}}
        data = json.dumps(payload).encode()
        with srv.lock:
            srv.inflight -= 1  # before answering: the client cannot start its next request before this
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(script=(), delay=0.0) -> FakeOpenAI:
        srv = FakeOpenAI(script, delay)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def openai_engine(url: str, **cfg) -> OpenAIEngine:
    cfg = {"backend": "openai", "path": "judge-model", "base_url": url, "api_key_env": "ZR_TEST_KEY", **cfg}
    return OpenAIEngine(EngineConfig(**cfg), backoff_s=0.01)


def test_openai_retries_429_then_500_then_succeeds(serve, monkeypatch):
    monkeypatch.setenv("ZR_TEST_KEY", "sk-test-123")
    srv = serve([(429, {"Retry-After": "0"}), (500, {})])
    engine = openai_engine(srv.base_url, max_retries=3)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate this answer"}]
    params = SamplingParams(temperature=0.5, top_p=0.9, max_new_tokens=64, stop=["\n\n"], seed=11)
    (out,) = engine.generate([conv], params)
    assert out == [Completion(text="echo Rate this answer seed 11", prompt_tokens=5, completion_tokens=6,
                              finish_reason="stop")]
    assert len(srv.requests) == 3 and engine.stats["retries"] == 2 and engine.stats["requests"] == 3
    req = srv.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test-123"
    assert req["body"] == {"model": "judge-model", "messages": conv, "n": 1, "temperature": 0.5, "top_p": 0.9,
                           "max_tokens": 64, "seed": 11, "stop": ["\n\n"]}
    engine.close()


def test_openai_honours_retry_after(serve, monkeypatch):
    monkeypatch.setenv("ZR_TEST_KEY", "k")
    srv = serve([(429, {"Retry-After": "1"})])
    engine = openai_engine(srv.base_url, max_retries=1)
    engine.generate([[{"role": "user", "content": "x"}]], SamplingParams(max_new_tokens=2))
    assert len(srv.requests) == 2
    assert srv.requests[1]["t"] - srv.requests[0]["t"] >= 0.95  # backoff alone would be <= 0.01 s


def test_openai_concurrency_is_bounded_and_order_kept(serve, monkeypatch):
    monkeypatch.setenv("ZR_TEST_KEY", "k")
    srv = serve(delay=0.15)
    engine = openai_engine(srv.base_url, max_concurrency=3)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    out = engine.generate(convs, SamplingParams(temperature=1.0, n=2, seed=5, max_new_tokens=3))
    assert len(srv.requests) == 16
    assert srv.max_inflight == 3  # never above the bound, and the bound is used
    assert [[c.text for c in cs] for cs in out] == [[f"echo q{i} seed 5", f"echo q{i} seed 6"] for i in range(8)]
    assert all(c.finish_reason == "length" and c.prompt_tokens == 1 and c.completion_tokens == 4
               for cs in out for c in cs)


def test_openai_400_is_not_retried(serve, monkeypatch):
    monkeypatch.setenv("ZR_TEST_KEY", "k")
    srv = serve([(400, {})])
    engine = openai_engine(srv.base_url, max_retries=5)
    with pytest.raises(EndpointError, match=r"conversation 0 sample 0 .*judge-model.*HTTP 400.*scripted 400.*not retried"):
        engine.generate([[{"role": "user", "content": "x"}]], SamplingParams())
    assert len(srv.requests) == 1 and engine.stats["retries"] == 0


def test_openai_gives_up_after_max_retries(serve, monkeypatch):
    monkeypatch.setenv("ZR_TEST_KEY", "k")
    srv = serve([(503, {})] * 10)
    engine = openai_engine(srv.base_url, max_retries=2)
    with pytest.raises(EndpointError, match=r"conversation 0 sample 0.*failed after 3 attempts.*HTTP 503"):
        engine.generate([[{"role": "user", "content": "x"}]], SamplingParams())
    assert len(srv.requests) == 3


def test_openai_connection_errors_are_retried(monkeypatch):
    monkeypatch.setenv("ZR_TEST_KEY", "k")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = openai_engine(f"http://127.0.0.1:{port}/v1", max_retries=2)
    with pytest.raises(EndpointError, match="failed after 3 attempts.*ConnectError"):
        engine.generate([[{"role": "user", "content": "x"}]], SamplingParams())
    assert engine.stats["requests"] == 3


def test_openai_key_required_unless_local(serve, monkeypatch):
    monkeypatch.delenv("ZR_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="ZR_TEST_KEY"):
        openai_engine("https://api.openai.com/v1")
    with pytest.raises(ConfigError, match="^path=None: must name the model for the openai backend"):
        validate(EngineConfig(backend="openai", base_url="http://127.0.0.1:1/v1"))  # a config rule, checked at load
    srv = serve()
    engine = openai_engine(srv.base_url)  # local: no key needed, none sent
    engine.generate([[{"role": "user", "content": "x"}]], SamplingParams(n=2))  # greedy: one request, copied
    assert len(srv.requests) == 1 and srv.requests[0]["auth"] is None
