"""The Ray Serve application: a FastAPI ingress deployment (``ChatServer``) serving OpenAI's chat API.

Routes (under ``serve.route_prefix``): ``POST /v1/chat/completions`` (JSON, or SSE when ``stream`` is true),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (no key needed; the replica's batching counters).

* **Backends** (``engine.backend``): ``transformers`` (default) runs ``HFEngine`` in each replica with the
  batching and token streaming of ``batching.py``; ``vllm`` is ray.serve.llm's OpenAI app (vLLM's continuous
  batching and validation) when ``ray.serve.llm`` imports, or, with ``serve.vllm_app: ingress`` or an API key,
  this ingress around ``VLLMEngine`` (our validation and key; static batches, one chunk per streamed choice).
* **LoRA adapters** (``serve.adapters``): every adapter is loaded onto the one base model of a replica; a
  request's ``model`` picks an adapter by name (the base's own name: the base), ``/v1/models`` lists the base and
  the adapters (``parent``: the base). Under ``transformers`` one batch mixes adapters (peft's mixed batch, see
  ``generation/adapters.py``); under ``vllm`` they map to ray.serve.llm's LoRA multiplexing (``lora_settings``).
* **Key**: with ``serve.api_key_env`` set, the variable is read where the app is built (the ``zephyr-ray serve``
  driver, a job's driver, or Serve's build task for ``serve run``/``serve deploy``) and only its SHA-256 reaches
  the replicas; requests without ``Authorization: Bearer <key>`` get 401.
* **Scale**: ``serve.num_replicas`` or ``serve.autoscaling``, ``max_ongoing_requests``, ``max_queued_requests``,
  ``num_cpus``/``num_gpus``/``resources``/``accelerator_type`` per replica (``deployment_options``).

``build_app(recipe)`` returns the application; ``app_builder`` is the ``import_path`` of a Serve config YAML
(``configs/serve/*.yaml``: ``args: {config: <recipe YAML>, overrides: [key=value, ...]}``).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotations of the routes.
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from zephyr_ray.config import ConfigError, ServeRecipe, from_dict, load_config, resolve_path, to_dict
from zephyr_ray.generation.hf import HFEngine
from zephyr_ray.generation.vllm_engine import VLLMEngine, import_vllm
from zephyr_ray.models import DTYPES, resolve_model_path
from zephyr_ray.serve import protocol
from zephyr_ray.serve.batching import Batcher, EngineBackend, HFStreamingBackend, Job
from zephyr_ray.serve.protocol import APIError, Limits

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")  # where ray.serve.llm loads LoRA adapters from

api = FastAPI(title="zephyr-ray chat", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSONResponse(protocol.error_body(str(first.get("msg", exc)), param=param, code="invalid_value"),
                        status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(protocol.error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(protocol.error_body(f"internal error: {exc!r}", "server_error"), status_code=500)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _vllm_context(llm: Any) -> int | None:
    """The context length a ``vllm.LLM`` was started with (its config has moved between vLLM versions)."""
    engine = getattr(llm, "llm_engine", None)
    for config in (getattr(engine, "model_config", None),
                   getattr(getattr(engine, "vllm_config", None), "model_config", None)):
        if getattr(config, "max_model_len", None):
            return int(config.max_model_len)
    return None


async def _collect(job: Job) -> list[Any]:
    """Wait for every choice of a non-streamed job."""
    n = job.params.n
    out: dict[int, Any] = {}
    while len(out) < n:
        kind, index, value = await job.events.get()
        if kind == "finish":
            out[index] = value
        elif kind == "error":
            raise RuntimeError(f"generation failed: {value!r}") from value
    return [out[i] for i in range(n)]


@serve.deployment(name="ChatServer")
@serve.ingress(api)
class ChatServer:
    """One replica: the engine, the batcher and the OpenAI routes."""

    def __init__(self, recipe: dict[str, Any], key_sha256: str | None = None):
        cfg: ServeRecipe = from_dict(recipe, ServeRecipe)
        self.cfg = cfg
        self.key_sha256 = key_sha256
        self.model_name = cfg.serve.model_name or cfg.engine.name
        self.created = int(time.time())
        threads = cfg.serve.torch_threads
        if threads:
            torch.set_num_threads(threads)
        if cfg.engine.backend == "transformers":
            self.engine = HFEngine(cfg.engine, cfg.engine.path, adapters=cfg.serve.adapters)
            run_batch = HFStreamingBackend(self.engine)
            context = getattr(self.engine.model.config, "max_position_embeddings", None)
        else:  # vllm inside this ingress
            self.engine = VLLMEngine(cfg.engine, cfg.engine.path)
            run_batch = EngineBackend(self.engine)
            context = _vllm_context(self.engine.llm)
        self.tokenizer = self.engine.tokenizer
        max_model_len = cfg.serve.max_model_len or context
        if not max_model_len:
            raise ConfigError("the model's context length is unknown: set serve.max_model_len")
        self.adapters = tuple(cfg.serve.adapters)
        self.limits = Limits(
            model_name=self.model_name, adapters=self.adapters, max_model_len=int(max_model_len),
            max_prompt_length=cfg.engine.max_prompt_length, max_tokens_limit=cfg.serve.max_tokens_limit,
            default_max_tokens=cfg.serve.default_max_tokens, default_temperature=cfg.serve.default_temperature,
            default_top_p=cfg.serve.default_top_p, max_n=cfg.serve.max_n)

        def thread_init() -> None:  # torch's thread count is per thread: set it where generation runs
            if threads:
                torch.set_num_threads(threads)

        self.batcher = Batcher(run_batch, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s, thread_init)
        self.live_streams = 0
        log.info("serving %s (%s) with context %d%s", self.model_name, cfg.engine.path, self.limits.max_model_len,
                 f" and adapters {list(self.adapters)}" if self.adapters else "")

    # -------------------------------------------------------------------------------------- helpers

    def _auth(self, request: Request) -> None:
        if self.key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", None, "invalid_api_key")
        if not hmac.compare_digest(key_digest(token.strip()), self.key_sha256):
            raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")

    def _tokenize(self, conversation: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]

    def stream_interval(self) -> float:
        """Seconds between two SSE events of one stream: ``stream_interval_s``, longer when the replica's live
        streams together would send more than ``stream_events_per_s`` events a second."""
        s = self.cfg.serve
        budget = self.live_streams / s.stream_events_per_s if s.stream_events_per_s > 0 else 0.0
        return max(s.stream_interval_s, budget)

    def check_health(self) -> None:
        """Ray Serve's health check: a dead batching loop restarts the replica."""
        if self.batcher.error is not None:
            raise RuntimeError(f"batching loop died: {self.batcher.error!r}")

    # -------------------------------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        self.check_health()
        return {"status": "ok", "model": self.model_name, "adapters": list(self.adapters),
                "queued": len(self.batcher.pending),
                "batching": asdict(self.batcher.stats)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return protocol.models_response(self.model_name, self.created, self.limits.max_model_len, self.adapters)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        if model_id != self.model_name and model_id not in self.adapters:
            raise APIError(404, f"The model {model_id!r} does not exist", "model", "model_not_found")
        return protocol.model_card(model_id, self.created, self.limits.max_model_len,
                                   None if model_id == self.model_name else self.model_name)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._auth(request)
        body = protocol.parse_json(await request.body())
        req = protocol.parse_chat_request(body, self.limits, self._tokenize)
        job = Job(req.conversation, req.prompt_ids, req.params, req.stream,
                  adapter=None if req.model == self.model_name else req.model)
        self.batcher.submit(job)
        if req.stream:
            return StreamingResponse(self._stream(req, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            completions = await _collect(job)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        return JSONResponse(protocol.completion_response(req, req.model, completions))

    async def _stream(self, req: protocol.ChatRequest, job: Job):
        """SSE: a role chunk, content chunks (what came in one ``stream_interval_s`` merged per choice), a finish
        chunk per choice, the usage chunk when asked for, ``data: [DONE]``."""
        n, model = req.params.n, req.model
        finished: dict[int, Any] = {}
        # The role chunk rides with the first content: every event sent costs a hop through Serve.
        role = protocol.chunk(req, model, [protocol.delta_choice(i, {"role": "assistant", "content": ""})
                                           for i in range(n)])
        self.live_streams += 1
        try:
            async for events in job.event_batches(self.stream_interval):
                texts: dict[int, str] = {}
                ends: list[str] = []
                failed = None
                for kind, index, value in events:
                    if kind == "delta":
                        texts[index] = texts.get(index, "") + value
                    elif kind == "finish":
                        finished[index] = value
                        ends.append(protocol.chunk(req, model, [protocol.delta_choice(index, {}, value.finish_reason)]))
                    else:
                        failed = value
                out = [role] if role else []
                role = ""
                out += [protocol.chunk(req, model, [protocol.delta_choice(i, {"content": t})]) for i, t in texts.items()]
                out += ends
                if failed is not None:
                    log.error("generation failed mid-stream: %r", failed)
                    error = protocol.error_body(f"generation failed: {failed!r}", "server_error")
                    out.append(f"data: {json.dumps(error)}\n\n")
                elif len(finished) == n and req.include_usage:
                    out.append(protocol.chunk(req, model, [], protocol.usage(len(req.prompt_ids),
                                                                             [finished[i] for i in range(n)])))
                if failed is not None or len(finished) == n:
                    out.append(protocol.DONE)
                yield "".join(out)
                if failed is not None or len(finished) == n:
                    break
        finally:
            self.live_streams -= 1
            if len(finished) < n:  # client gone (or failure): stop generating for it
                job.cancelled = True


# ------------------------------------------------------------------------------------------------ building


def deployment_options(cfg: ServeRecipe) -> dict[str, Any]:
    """``serve.deployment`` options of the chat replicas, from ``cfg.serve``."""
    s = cfg.serve
    opts: dict[str, Any] = {"max_ongoing_requests": s.max_ongoing_requests,
                            "max_queued_requests": s.max_queued_requests}
    if s.autoscaling.enabled:
        a = s.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    else:
        opts["num_replicas"] = s.num_replicas
    actor: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.resources:
        actor["resources"] = dict(s.resources)
    if s.accelerator_type:
        actor["accelerator_type"] = s.accelerator_type
    opts["ray_actor_options"] = actor
    return opts


def check_config(cfg: ServeRecipe) -> None:
    """Settings that work but serve badly (a warning), and rules that depend on what is installed here; the rest
    are ``ServeRecipe.problems``, checked at load."""
    s = cfg.serve
    if s.max_ongoing_requests < s.max_batch_size:
        log.warning("serve.max_ongoing_requests=%d < serve.max_batch_size=%d: batches can never fill",
                    s.max_ongoing_requests, s.max_batch_size)
    if s.adapters and cfg.engine.backend == "vllm" and not use_serve_llm(cfg):  # depends on what imports here
        raise ConfigError("serve.adapters with engine.backend=vllm need ray.serve.llm's LoRA multiplexing "
                          "(serve.vllm_app=serve_llm, no serve.api_key_env); this ingress serves no adapters on vllm")


def read_api_key(cfg: ServeRecipe) -> str | None:
    name = cfg.serve.api_key_env
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ConfigError(f"serve.api_key_env={name!r} names an unset or empty environment variable; export it, or "
                          "set serve.api_key_env=null to serve without a key")
    return key


def use_serve_llm(cfg: ServeRecipe) -> bool:
    """Whether the vllm backend goes through ray.serve.llm (see ``ServeConfig.vllm_app``)."""
    mode = cfg.serve.vllm_app
    if mode == "serve_llm":  # without serve.api_key_env: ServeConfig.problems
        return True
    if mode == "ingress" or cfg.serve.api_key_env or cfg.engine.chat_template:
        return False
    try:
        import ray.serve.llm  # noqa: F401  (needs vllm)
    except ImportError:
        return False
    return True


def llm_config(cfg: ServeRecipe) -> dict[str, Any]:
    """The ``ray.serve.llm.LLMConfig`` (as a dict) equivalent to ``cfg`` for the vllm backend."""
    e, s = cfg.engine, cfg.serve
    engine_kwargs: dict[str, Any] = {"dtype": DTYPES[e.precision], "tensor_parallel_size": e.tensor_parallel_size,
                                     "gpu_memory_utilization": e.gpu_memory_utilization,
                                     "trust_remote_code": e.trust_remote_code, "max_num_seqs": s.max_batch_size}
    if e.revision:
        engine_kwargs["revision"] = e.revision
    if s.max_model_len:
        engine_kwargs["max_model_len"] = s.max_model_len
    opts = deployment_options(cfg)
    deployment: dict[str, Any] = {k: opts[k] for k in ("max_ongoing_requests", "max_queued_requests")}
    for k in ("autoscaling_config", "num_replicas"):
        if k in opts:
            deployment[k] = opts[k]
    out: dict[str, Any] = {"model_loading_config": {"model_id": s.model_name or e.name, "model_source": e.path},
                           "engine_kwargs": engine_kwargs, "deployment_config": deployment}
    if s.accelerator_type:
        out["accelerator_type"] = s.accelerator_type
    if s.adapters:
        lora = lora_settings(s.adapters, s.max_batch_size)
        engine_kwargs.update(lora["engine_kwargs"])
        out["lora_config"] = lora["lora_config"]
    return out


def lora_settings(adapters: dict[str, str], max_batch_size: int) -> dict[str, Any]:
    """``serve.adapters`` as ray.serve.llm's LoRA multiplexing: ``lora_config`` (``dynamic_lora_loading_path``,
    ``max_num_adapters_per_replica``) and the vLLM ``engine_kwargs`` that enable LoRA.

    Ray Serve LLM loads adapters on demand from one cloud folder (s3://, gs://, abfss://, azure://) whose
    subfolders are the adapters, and serves adapter ``x`` as model ``<model_id>:x``. So every value of
    ``adapters`` must be ``<prefix>/<name>`` with one shared prefix. vLLM's ``max_lora_rank`` keeps its default
    (16, ``model.lora.r``'s default); adapters of a higher rank are refused by vLLM when they load.
    Not runnable here (vllm is not installed in this project's test environment): only this mapping is tested."""
    prefixes = set()
    for name, uri in adapters.items():
        if not uri.startswith(REMOTE_SCHEMES):
            raise ConfigError(f"serve.adapters.{name}={uri!r}: with engine.backend=vllm (ray.serve.llm) adapters load "
                              f"from cloud storage: give a URI starting with one of {list(REMOTE_SCHEMES)}")
        if ":" in name:
            raise ConfigError(f"serve.adapters.{name}: ray.serve.llm addresses adapters as <model>:<adapter>, so an "
                              "adapter name may not contain ':'")
        prefix, _, last = uri.rstrip("/").rpartition("/")
        if last != name:
            raise ConfigError(f"serve.adapters.{name}={uri!r}: ray.serve.llm names an adapter by its folder, so the "
                              f"URI must end in /{name}")
        prefixes.add(prefix)
    if len(prefixes) > 1:
        raise ConfigError(f"serve.adapters: ray.serve.llm loads adapters from one folder, but they lie under "
                          f"{sorted(prefixes)}: put them side by side under one prefix")
    count = len(adapters)
    return {"lora_config": {"dynamic_lora_loading_path": prefixes.pop(), "max_num_adapters_per_replica": count},
            "engine_kwargs": {"enable_lora": True, "max_loras": min(count, max_batch_size), "max_cpu_loras": count}}


def prepare(cfg: ServeRecipe) -> ServeRecipe:
    """Validate and resolve the model path (building the tiny model when ``engine.path`` is empty)."""
    check_config(cfg)
    if cfg.engine.backend == "vllm":
        import_vllm()  # a missing vllm fails here, before anything is deployed
    path = resolve_model_path(cfg.engine.path, cfg.run.output_dir, seed=cfg.engine.tiny_seed,
                              arch=cfg.engine.tiny_arch)
    if "://" not in path and Path(path).exists():
        path = str(Path(path).absolute())
    # Local adapter folders made absolute too: replicas may run in another working directory.
    adapters = {name: str(Path(folder).absolute()) if "://" not in folder and Path(folder).exists() else folder
                for name, folder in cfg.serve.adapters.items()}
    return replace(cfg, engine=replace(cfg.engine, path=path), serve=replace(cfg.serve, adapters=adapters))


def build_app(cfg: ServeRecipe, api_key: str | None | bool = True):
    """The Serve application for ``cfg``. ``api_key``: True reads ``serve.api_key_env`` here; a string or None
    sets it explicitly."""
    cfg = prepare(cfg)
    key = read_api_key(cfg) if api_key is True else api_key or None
    if cfg.engine.backend == "vllm" and use_serve_llm(cfg):
        from ray.serve.llm import build_openai_app

        return build_openai_app({"llm_configs": [llm_config(cfg)]})
    return ChatServer.options(**deployment_options(cfg)).bind(to_dict(cfg), key_digest(key) if key else None)


def app_builder(args: dict[str, Any]):
    """``import_path`` for ``serve run`` / ``serve deploy``: ``args: {config: FILE, overrides: [k=v, ...]}``."""
    args = dict(args or {})
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown application args {sorted(unknown)}; valid: config, overrides")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    config = args.get("config")
    return build_app(load_config(resolve_path(config) if config else None, list(overrides), ServeRecipe))


# ------------------------------------------------------------------------------------------------ running


def base_url(cfg: ServeRecipe) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}/v1"


def run_server(cfg: ServeRecipe, detach: bool = False, ready: Any = print) -> str:
    """Deploy ``cfg`` and, unless ``detach``, serve until interrupted (Ctrl-C or SIGTERM), then tear down
    what this call started: the whole local Ray (and Serve) when it started one, else only the application.
    Without ``RAY_ADDRESS`` a fresh local Ray is started (never someone else's running cluster)."""
    address = os.environ.get("RAY_ADDRESS") or "local"
    own_cluster = not ray.is_initialized() and address == "local"
    if detach and own_cluster:
        raise ConfigError("--detach needs a running cluster to leave the app on: set RAY_ADDRESS")
    app = build_app(cfg)  # config, key and model problems surface before Ray starts

    def _term(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a process started in the background inherits an ignored SIGINT.
    handlers = {sig: signal.signal(sig, _term) for sig in (signal.SIGINT, signal.SIGTERM)}
    deployed = False
    try:
        if not ray.is_initialized():
            ray.init(address=address, **({"include_dashboard": False} if own_cluster else {}))
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix)
        deployed = True
        url = base_url(cfg)
        ready(f"serving {cfg.serve.model_name or cfg.engine.name} at {url} (app {cfg.serve.app_name!r}); "
              + ("detached" if detach else "Ctrl-C stops it"))
        if detach:
            return url
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        ready("shutting down")
    finally:
        if not (detach and deployed):
            # A second Ctrl-C must not cut the teardown short (it would leave Serve's actors behind).
            for sig in handlers:
                signal.signal(sig, signal.SIG_IGN)
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    if own_cluster:
                        serve.shutdown()
                    elif deployed:
                        serve.delete(cfg.serve.app_name)
                if own_cluster:
                    ray.shutdown()
            ready("stopped")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return base_url(cfg)
