"""The serve recipe: an OpenAI-compatible chat endpoint on Ray Serve."""

from __future__ import annotations

from dataclasses import dataclass, field

from zephyr_ray.config.common import EngineConfig, RunConfig
from zephyr_ray.config.loader import choice


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the chat replicas (replaces ``serve.num_replicas`` when enabled)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    # None = min_replicas.
    initial_replicas: int | None = None
    # Replicas are added when the requests in flight per replica (running + queued in it) exceed this.
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        if self.enabled and not 0 <= self.min_replicas <= self.max_replicas:
            return [("min_replicas", f"needs 0 <= min_replicas <= max_replicas (max_replicas={self.max_replicas})")]
        return []


@dataclass
class ServeConfig:
    """The OpenAI-compatible chat endpoint (``zephyr_ray/serve``)."""

    # Where `zephyr-ray serve` starts the Ray Serve HTTP proxy (a Serve config YAML sets its own http_options).
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "zephyr"
    # The model id of /v1/models, which requests must name; None = engine.name.
    model_name: str | None = None
    # Fixed replica count; ignored when autoscaling.enabled.
    num_replicas: int = 1
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # Requests one replica takes at once (running + waiting for a batch); >= max_batch_size to fill batches.
    max_ongoing_requests: int = 64
    # Requests waiting in Serve for a replica before it answers 503; -1 = unbounded.
    max_queued_requests: int = -1
    # Resources per replica.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    # torch intra-op threads in a replica; None keeps Ray's (OMP_NUM_THREADS = whole CPUs of the replica).
    torch_threads: int | None = None
    # Name of the env var holding the bearer key clients must send; None = no key. Read where the app is built.
    api_key_env: str | None = None
    # Rows (requests x samples) generated together in one batch. Before a batch starts, the batcher waits for as
    # many rows as were in flight when the last batch ended (at most 1/4 of that batch's time, and at most this
    # long between two arrivals); a lone client never waits.
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # A stream sends at most one SSE event per this many seconds (the first token and the end go at once; what
    # comes in between is merged); 0 = an event per token. Each event costs a Ray object between replica and proxy.
    stream_interval_s: float = 0.02
    # All streams of a replica together send about this many SSE events a second at most (each stream's interval
    # grows to live streams / this when that is longer); 0 = no cap.
    stream_events_per_s: float = 200.0
    # Context length (prompt + completion); None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Largest max_tokens a request may ask for, and what a request without one gets (capped by the context).
    max_tokens_limit: int = 4096
    default_max_tokens: int | None = 512
    # OpenAI's defaults for requests that omit them.
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    max_n: int = 8
    # vllm backend: ray.serve.llm's OpenAI app (serve_llm), our ingress around the vLLM engine (ingress; has
    # our validation and API key), or auto = serve_llm when ray.serve.llm imports and no API key (nor
    # engine.chat_template) is set.
    vllm_app: str = choice("auto", "serve_llm", "ingress")
    # LoRA adapters served beside the base model (engine.path), name -> peft adapter folder (a LoRA stage's
    # model/adapter, or the exported model folder holding it): a request's `model` names an adapter or the base,
    # /v1/models lists them all. Checked against the base when a replica starts. vllm (serve_llm only): cloud URIs
    # <prefix>/<name> under one prefix (Ray Serve LLM's dynamic LoRA loading; requests name <model_name>:<name>).
    adapters: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no choice list can judge: checked at load time."""
        out = [(key, "must be >= 1") for key in ("max_batch_size", "max_n", "max_tokens_limit", "max_ongoing_requests")
               if getattr(self, key) < 1]
        if not self.autoscaling.enabled and self.num_replicas < 1:
            out.append(("num_replicas", "must be >= 1"))
        if not self.route_prefix.startswith("/"):
            out.append(("route_prefix", "must start with '/'"))
        if self.vllm_app == "serve_llm" and self.api_key_env:
            out.append(("vllm_app", "serve_llm has no API key check; use serve.vllm_app=ingress (or auto) with "
                                    "serve.api_key_env, or put an authenticating gateway in front"))
        for name, folder in self.adapters.items():
            if not name.strip() or name != name.strip():
                out.append(("adapters", f"adapter name {name!r}: names must be non-empty, without surrounding spaces"))
            elif not isinstance(folder, str) or not folder.strip():
                out.append(("adapters", f"adapter {name!r} has no folder"))
        return out


@dataclass
class ServeRecipe:
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(name="zephyr"))
    serve: ServeConfig = field(default_factory=ServeConfig)
    # output_dir holds the tiny model built when engine.path is empty.
    run: RunConfig = field(default_factory=lambda: RunConfig(name="serve", output_dir="runs/serve"))

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) between sections: checked at load time."""
        if self.engine.backend == "openai":
            return [("engine.backend", "cannot be served (it is a client); use transformers or vllm")]
        if self.serve.vllm_app == "serve_llm" and self.engine.chat_template:
            return [("engine.chat_template", "serve.vllm_app=serve_llm prompts with the model's own chat template; "
                                             "an override needs serve.vllm_app=ingress (or auto)")]
        base = self.serve.model_name or self.engine.name
        if base in self.serve.adapters:
            return [(f"serve.adapters.{base}", "an adapter may not have the base model's name "
                     f"({'serve.model_name' if self.serve.model_name else 'engine.name'}={base!r})")]
        return []
