"""The Ray Serve chat endpoint, through the official openai client: chat, streaming, /v1/models, bad requests,
API key, concurrency; plus the batcher and the config files without Ray."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from zephyr_ray.cluster import free_port
from zephyr_ray.config import EngineConfig, ServeRecipe, load_config
from zephyr_ray.generation.types import Completion, SamplingParams

from .conftest import ROOT

KEY_ENV = "ZEPHYR_SERVE_TEST_KEY"
KEY = "sk-zephyr-test-0123456789"
MODEL = "zephyr-tiny-test"
# Small limits so the context checks are cheap to hit.
MAX_MODEL_LEN = 512
MAX_TOKENS_LIMIT = 256
USER = [{"role": "user", "content": "What is the capital of France?"}]


def recipe(tiny_model: str, port: int, *extra: str) -> ServeRecipe:
    return load_config(ROOT / "configs/tiny/serve.yaml", [
        f"engine.path={tiny_model}", f"engine.name={MODEL}", f"engine.max_prompt_length={MAX_MODEL_LEN}",
        f"serve.port={port}", f"serve.api_key_env={KEY_ENV}", f"serve.max_model_len={MAX_MODEL_LEN}",
        f"serve.max_tokens_limit={MAX_TOKENS_LIMIT}", "serve.num_cpus=0.5", "serve.torch_threads=1",
        "serve.max_batch_size=16", "serve.stream_interval_s=0", "serve.stream_events_per_s=0", *extra], ServeRecipe)


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model):
    """The app on the session's Ray cluster, on a free port, with an API key; Serve shut down at the end."""
    from ray import serve

    from zephyr_ray.serve.app import build_app

    port = free_port()
    os.environ[KEY_ENV] = KEY
    try:
        app = build_app(recipe(tiny_model, port))
    finally:
        del os.environ[KEY_ENV]  # read where the app is built; replicas only get its hash
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="zephyr-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The same generation in-process (HFEngine, one torch thread like the replica)."""
    import torch

    from zephyr_ray.generation.hf import HFEngine

    engine = HFEngine(EngineConfig(max_prompt_length=MAX_MODEL_LEN), tiny_model)
    threads = torch.get_num_threads()

    def generate(conversations, **params):
        torch.set_num_threads(1)
        try:
            return engine.generate(conversations, SamplingParams(**params))
        finally:
            torch.set_num_threads(threads)

    generate.engine = engine
    return generate


def chat(client, messages=USER, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


# ------------------------------------------------------------------------------------------------ endpoint


def test_models_and_health(server, client):
    import httpx

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server}/health", timeout=30)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == MODEL


def test_chat_equals_in_process_engine_with_exact_usage(client, reference, tokenizer):
    conversations = [USER, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]]
    expected = reference(conversations, max_new_tokens=12)
    for messages, [ref] in zip(conversations, expected):
        out = chat(client, messages, max_tokens=12)
        [choice] = out.choices
        assert out.model == MODEL and out.object == "chat.completion" and out.id.startswith("chatcmpl-")
        assert choice.message.role == "assistant"
        assert choice.message.content == ref.text
        assert choice.finish_reason == ref.finish_reason
        prompt_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        assert out.usage.prompt_tokens == len(prompt_ids) == ref.prompt_tokens
        assert out.usage.completion_tokens == ref.completion_tokens
        assert out.usage.total_tokens == len(prompt_ids) + ref.completion_tokens
        if ref.finish_reason == "length":
            assert out.usage.completion_tokens == 12
    # max_tokens reached -> "length" with exactly that many tokens (the random model does not stop at 1 token).
    one = chat(client, max_tokens=1)
    assert (one.choices[0].finish_reason, one.usage.completion_tokens) == ("length", 1)


def test_stream_joins_to_the_non_streamed_text(server, client):
    import httpx

    full = chat(client, max_tokens=24)
    stream = chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) > 12  # token by token (stream_interval_s=0 here), not one blob
    assert "".join(pieces) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1

    # The wire format: SSE events, the last one data: [DONE]; n=2 greedy streams the same text twice.
    body = {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0, "stream": True, "n": 2}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    texts = ["", ""]
    for e in events[:-1]:
        for c in json.loads(e[6:])["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    short = chat(client, max_tokens=8)
    assert texts == [short.choices[0].message.content] * 2


def test_sampling_seed_n_and_stop(client, reference):
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 5}
    out = chat(client, max_tokens=10, n=3, **params)
    expected = reference([USER], max_new_tokens=10, n=3, **params)[0]
    assert [c.message.content for c in out.choices] == [c.text for c in expected]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == sum(c.completion_tokens for c in expected)
    assert len({c.message.content for c in out.choices}) > 1  # different draws
    again = chat(client, max_tokens=10, n=3, **params)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]

    greedy = chat(client, max_tokens=16).choices[0].message.content
    stop = greedy[5:7]
    cut = greedy.find(stop)
    out = chat(client, max_tokens=16, stop=[stop, "\x00never"])
    assert out.choices[0].message.content == greedy[:cut]
    assert out.choices[0].finish_reason == "stop"
    ref = reference([USER], max_new_tokens=16, stop=[stop, "\x00never"])[0][0]
    assert (out.choices[0].message.content, out.usage.completion_tokens) == (ref.text, ref.completion_tokens)
    streamed = chat(client, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == greedy[:cut]


LONG = "word " * 700  # > MAX_MODEL_LEN tokens
MEDIUM = "word " * 400  # fits alone, not with 200 more tokens
BAD_REQUESTS = {
    "empty messages": ({"messages": []}, "messages", "empty_array"),
    "messages not a list": ({"messages": "hi"}, "messages", "invalid_type"),
    "message not an object": ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    "missing role": ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
    "missing content": ({"messages": [*USER, {"role": "user"}]}, "messages[1].content", "missing_required_parameter"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                      "messages[0].content[0]", "invalid_value"),
    "negative max_tokens": ({"max_tokens": -1}, "max_tokens", "invalid_value"),
    "zero max_tokens": ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    "too large max_tokens": ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens", "invalid_value"),
    "too large max_completion_tokens": ({"max_completion_tokens": 10**9}, "max_completion_tokens", "invalid_value"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": LONG}]}, "messages",
                                       "context_length_exceeded"),
    "prompt + max_tokens over the context": ({"messages": [{"role": "user", "content": MEDIUM}], "max_tokens": 200},
                                             "max_tokens", "context_length_exceeded"),
    "negative temperature": ({"temperature": -0.5}, "temperature", "invalid_value"),
    "top_p zero": ({"top_p": 0}, "top_p", "invalid_value"),
    "n zero": ({"n": 0}, "n", "invalid_value"),
    "n too large": ({"n": 9}, "n", "invalid_value"),
    "empty stop": ({"stop": [""]}, "stop", "invalid_value"),
    "five stops": ({"stop": list("abcde")}, "stop", "invalid_value"),
    "string seed": ({"seed": "x"}, "seed", "invalid_type"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported"),
    "logprobs": ({"logprobs": True}, "logprobs", "unsupported"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=lambda c: c.replace(" ", "-"))
def test_bad_request_is_400_and_server_keeps_serving(client, case):
    import openai

    fields, param, code = BAD_REQUESTS[case]
    body = {"messages": USER, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=body.pop("messages"), extra_body=body)
    assert err.value.status_code == 400
    assert (err.value.param, err.value.code, err.value.type) == (param, code, "invalid_request_error")
    assert chat(client, max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_malformed_body_unknown_model_and_route(server, client):
    import httpx
    import openai

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw, code in ((b"{not json", "invalid_json"), (b"[1, 2]", "invalid_type")):
        r = httpx.post(f"{server}/v1/chat/completions", content=raw, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == code
        assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert (err.value.param, err.value.code) == ("model", "model_not_found")
    r = httpx.get(f"{server}/v1/nothing", headers=headers, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert chat(client, max_tokens=2).usage.completion_tokens >= 1


def test_api_key(server, client):
    import httpx
    import openai
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError) as err:
        OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(model=MODEL,
                                                                                                   messages=USER)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
        r = httpx.request(method, f"{server}{path}", json={"model": MODEL, "messages": USER}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert chat(client, max_tokens=2).choices


def test_32_concurrent_requests_are_batched(server, reference):
    import httpx
    from openai import AsyncOpenAI

    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(32)]
    before = httpx.get(f"{server}/health", timeout=30).json()["batching"]

    async def ask(aclient, i, messages):
        kw = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
        if i % 4:
            return (await aclient.chat.completions.create(**kw)).choices[0].message.content
        stream = await aclient.chat.completions.create(stream=True, **kw)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run():
        async with AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*[ask(aclient, i, p) for i, p in enumerate(prompts)])

    texts = asyncio.run(run())
    # Every answer (a quarter of them streamed) equals the in-process engine's: greedy is token-exact in any batch.
    assert texts == [e[0].text for e in reference(prompts, max_new_tokens=8)]
    after = httpx.get(f"{server}/health", timeout=30).json()["batching"]
    batches, requests = after["batches"] - before["batches"], after["requests"] - before["requests"]
    assert requests == 32 and batches < 32 and after["max_rows"] > 1


def test_client_that_goes_away_mid_stream(server, client):
    import httpx

    body = {"model": MODEL, "messages": USER, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        next(r.iter_lines())
    assert chat(client, max_tokens=4).usage.completion_tokens == 4


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow  # starts its own Ray in a subprocess
def test_cli_serves_until_ctrl_c(tiny_model, tmp_path):
    import httpx

    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "zephyr_ray.cli", "serve", "--config", "configs/tiny/serve.yaml", f"serve.port={port}",
         f"run.output_dir={tmp_path}", "serve.num_cpus=0.5", "serve.torch_threads=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops it" in line or proc.poll() is not None:
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1], "".join(lines[-20:])
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "zephyr-tiny", "messages": USER, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert (tmp_path / "tiny-base" / "config.json").exists()  # no engine.path: the tiny model was built
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


# ------------------------------------------------------------------------------------------------ no Ray


def test_serve_config_yamls_build_their_recipes():
    from zephyr_ray.serve import app as serve_app

    files = sorted((ROOT / "configs/serve").glob("*.yaml"))
    assert {f.name for f in files} >= {"tiny_app.yaml", "zephyr-7b-beta_app.yaml"}
    for f in files:
        spec = yaml.safe_load(f.read_text())
        [application] = spec["applications"]
        module, attr = application["import_path"].split(":")
        assert module == "zephyr_ray.serve.app" and callable(getattr(serve_app, attr))
        args = application["args"]
        load_config(ROOT / args["config"], args.get("overrides", []), ServeRecipe)  # validates
    with pytest.raises(ValueError, match="unknown application args"):
        serve_app.app_builder({"config": "configs/tiny/serve.yaml", "bogus": 1})


def test_deployment_options_from_config():
    from zephyr_ray.serve.app import deployment_options, llm_config

    cfg = load_config(ROOT / "configs/zephyr-7b-beta/serve.yaml", ["serve.resources={node_type_gpu: 1}",
                                                                   "serve.accelerator_type=H100"], ServeRecipe)
    opts = deployment_options(cfg)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 32.0, "upscale_delay_s": 30.0,
                                          "downscale_delay_s": 600.0}
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (128, 512)
    assert opts["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"node_type_gpu": 1.0},
                                         "accelerator_type": "H100"}
    tiny = deployment_options(load_config(ROOT / "configs/tiny/serve.yaml", ["serve.num_replicas=2"], ServeRecipe))
    assert tiny["num_replicas"] == 2 and "autoscaling_config" not in tiny
    llm = llm_config(cfg)
    assert llm["model_loading_config"] == {"model_id": "zephyr-7b-beta", "model_source": cfg.engine.path}
    assert llm["engine_kwargs"]["dtype"] == "bfloat16" and llm["engine_kwargs"]["max_model_len"] == 8192
    assert llm["deployment_config"]["autoscaling_config"] == opts["autoscaling_config"]


def test_missing_key_variable_and_unservable_backend_fail_before_deploying(tiny_model):
    from zephyr_ray.config import ConfigError
    from zephyr_ray.serve.app import build_app

    os.environ.pop(KEY_ENV, None)
    with pytest.raises(ConfigError, match=KEY_ENV):
        build_app(recipe(tiny_model, 1))
    with pytest.raises(ConfigError, match=r"^engine.backend='openai': cannot be served"):
        recipe(tiny_model, 1, "engine.backend=openai", "engine.path=gpt-4")  # at load, before any deploying


@pytest.mark.parametrize(("override", "message"), [
    ("serve.max_batch_size=0", r"^serve.max_batch_size=0: must be >= 1"),
    ("serve.max_ongoing_requests=0", r"^serve.max_ongoing_requests=0: must be >= 1"),
    ("serve.num_replicas=0", r"^serve.num_replicas=0: must be >= 1"),
    ("serve.route_prefix=v1", r"^serve.route_prefix='v1': must start with '/'"),
    ("serve.vllm_app=serve_llm", r"^serve.vllm_app='serve_llm': serve_llm has no API key check"),
])
def test_serve_rules_fail_when_the_config_loads(override, message):
    from zephyr_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny/serve.yaml", [f"serve.api_key_env={KEY_ENV}", override], ServeRecipe)
    base = ["serve.autoscaling.enabled=true", "serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"]
    with pytest.raises(ConfigError, match=r"^serve.autoscaling.min_replicas=3: needs 0 <= min_replicas <= max_replicas"):
        load_config(ROOT / "configs/tiny/serve.yaml", base, ServeRecipe)
    # With autoscaling on, num_replicas is ignored, so 0 is no error.
    load_config(ROOT / "configs/tiny/serve.yaml", [*base[:1], "serve.num_replicas=0"], ServeRecipe)


def _job(params: SamplingParams, loop, stream: bool = False):
    from zephyr_ray.serve.batching import Job

    return Job([{"role": "user", "content": "x"}], [1, 2, 3], params, stream, loop=loop)


def test_batcher_groups_rows_and_survives_a_failed_batch():
    from zephyr_ray.serve.batching import Batcher

    batches: list[list[int]] = []

    def run_batch(jobs):
        batches.append([j.rows for j in jobs])
        if any(j.params.seed == 666 for j in jobs):
            raise RuntimeError("boom")
        for j in jobs:
            for i in range(j.params.n):
                j.finish(i, Completion("ok", 3, 1, "stop"))

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher(run_batch, max_rows=4, wait_s=0.05)
        jobs = [_job(SamplingParams(temperature=0.5, n=3, seed=i), loop) for i in range(2)]
        jobs += [_job(SamplingParams(n=5), loop)]  # greedy: one row, copied to 5 choices
        bad = _job(SamplingParams(seed=666), loop)
        for j in [*jobs, bad]:
            b.submit(j)
        events = [await asyncio.wait_for(j.events.get(), 10) for j in [*jobs, bad]]
        later = _job(SamplingParams(), loop)
        b.submit(later)
        events.append(await asyncio.wait_for(later.events.get(), 10))

        async def counted():  # the batch's bookkeeping runs once its executor call returns, after the events
            while b.stats.batches < 4:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(counted(), 10)
        await b.close()
        return events, b.stats

    events, stats = asyncio.run(main())
    # Two 3-row jobs cannot share a 4-row batch; the greedy n=5 job is one row; the failing batch fails alone.
    assert batches == [[3], [3, 1], [1], [1]]
    assert [e[0] for e in events] == ["finish", "finish", "finish", "error", "finish"]
    assert stats.failed_batches == 1 and stats.batches == 4


def test_stop_holdback_helpers():
    from zephyr_ray.generation.stopping import cut_at_stop, stop_hold

    assert stop_hold("hello wor", ["world"]) == 3
    assert stop_hold("hello", ["xyz"]) == 0
    assert stop_hold("ab", ["abc", "b"]) == 2
    assert cut_at_stop("one two three", ["three", "two"]) == 4
    assert cut_at_stop("one", ["x"]) is None


def test_stream_events_are_merged_per_interval():
    async def main():
        loop = asyncio.get_running_loop()
        job = _job(SamplingParams(), loop, stream=True)

        async def produce():
            for k in range(4):
                job.delta(0, str(k))
                await asyncio.sleep(0.01)
            job.finish(0, Completion("0123", 3, 4, "length"))

        task = asyncio.create_task(produce())
        batches = []
        async for events in job.event_batches(lambda: 5.0):  # nothing but the first event and the finish go early
            batches.append([e[0] + (e[2] if e[0] == "delta" else "") for e in events])
            if events[-1][0] == "finish":
                break
        await task
        return batches

    assert asyncio.run(main()) == [["delta0"], ["delta1", "delta2", "delta3", "finish"]]


def test_batcher_waits_for_the_clients_of_the_last_batch():
    """Closed-loop clients with a round trip: batches fill up instead of two half batches taking turns."""
    from zephyr_ray.serve.batching import Batcher

    sizes: list[int] = []

    def run_batch(jobs):
        sizes.append(len(jobs))
        time.sleep(0.03)
        for j in jobs:
            j.finish(0, Completion("x", 1, 1, "stop"))

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher(run_batch, max_rows=8, wait_s=0.02)

        async def client(i):
            await asyncio.sleep(0.002 * i)
            for _ in range(6):
                job = _job(SamplingParams(), loop)
                b.submit(job)
                await job.events.get()
                await asyncio.sleep(0.005)  # the response's way back and the next request's way in

        await asyncio.gather(*[client(i) for i in range(8)])
        await b.close()

    asyncio.run(main())
    assert sum(sizes) == 48 and max(sizes) == 8
    assert sizes.count(8) >= 3, sizes


def test_incremental_stream_text_joins_to_the_final_text(tiny_model):
    """Random token sequences (broken UTF-8 included), with and without stop strings: the deltas a streamed row
    sends join to exactly the text its finish reports (the full decode, as HFEngine writes it)."""
    import random

    from zephyr_ray.generation.hf import HFEngine
    from zephyr_ray.serve.batching import HFStreamingBackend, Row

    engine = HFEngine(EngineConfig(), tiny_model)
    backend = HFStreamingBackend(engine)
    vocab = len(engine.tokenizer)

    async def main():
        loop = asyncio.get_running_loop()
        for trial in range(120):
            rnd = random.Random(trial)
            tokens = [rnd.randrange(7, vocab) for _ in range(rnd.randint(1, 48))]
            stops = [engine.tokenizer.decode(tokens[len(tokens) // 2:][:1])[:2] or "x"] if trial % 2 else []
            row = Row(_job(SamplingParams(max_new_tokens=len(tokens), stop=stops), loop, stream=True), 0, [0], 0)
            out: list = []
            for t in tokens:
                if backend.step(row, t, out):
                    break
            if not row.done:
                backend.finish(row, "length", out)
            events = [e for _, e in out]
            [final] = [e[2] for e in events if e[0] == "finish"]
            assert "".join(e[2] for e in events if e[0] == "delta") == final.text, trial
            assert final.text == engine.tokenizer.decode(tokens[:final.completion_tokens],
                                                         skip_special_tokens=True)[:len(final.text)]

    asyncio.run(main())
