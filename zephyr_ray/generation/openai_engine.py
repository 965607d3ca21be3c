"""Any OpenAI-compatible ``/chat/completions`` endpoint: GPT-4 as a judge or teacher, or our own Ray Serve app.

* **Key**: read from the environment variable ``cfg.api_key_env`` (the config names the variable, never the
  key) and sent as ``Authorization: Bearer <key>``. A missing variable is an error at construction, unless
  ``base_url`` points at this machine (127.0.0.0/8, ``localhost``, ``::1``): local servers usually need no
  key, so the request then goes without the header.
* **Requests**: one per (conversation, sample), ``n=1``: ``usage`` is per request, so each completion gets
  its exact ``prompt_tokens`` / ``completion_tokens`` and ``finish_reason``, endpoints that ignore ``n``
  work, and a retry redoes one sample. The price is the prompt billed once per sample. Sample ``j`` sends
  ``seed + j`` (distinct, reproducible draws); greedy (``temperature == 0``) sends one request and copies
  it ``n`` times. ``temperature``, ``top_p``, ``max_tokens`` (= ``max_new_tokens``), ``stop`` and ``seed``
  are mapped as named.
* **Concurrency**: at most ``cfg.max_concurrency`` requests in flight (a thread pool of that size over one
  pooled ``httpx.Client``).
* **Retries**: 408, 409, 429 and 5xx responses and connection/timeout errors are retried up to
  ``cfg.max_retries`` times with exponential backoff and full jitter, waiting at least what a
  ``Retry-After`` header asks (capped at ``max_backoff_s``). Other 4xx (a bad request, a wrong key) are
  not retried. The error after the last try names the request (conversation, sample, model, URL), the
  status and the start of the response body; the first failure cancels the requests not yet started.
* ``finish_reason`` is the endpoint's (``stop``, ``length``; anything else, e.g. ``content_filter``, is
  passed through).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx

from zephyr_ray.generation import check_params
from zephyr_ray.generation.types import Completion, Conversation, SamplingParams

if TYPE_CHECKING:
    from zephyr_ray.config import EngineConfig

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})


class EndpointError(RuntimeError):
    """A chat completion request that failed for good (not retryable, or out of retries)."""


def is_local(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after_s(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None when absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIEngine:
    """``Engine`` over HTTP. ``stats`` counts requests, retries and tokens (thread-safe)."""

    def __init__(self, cfg: EngineConfig, *, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        self.cfg = cfg
        self.model = cfg.path
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif not is_local(cfg.base_url):
            raise ValueError(f"the environment variable {cfg.api_key_env} (engine.api_key_env) is not set; it must "
                             f"hold the API key for {cfg.base_url}")
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self.client = httpx.Client(headers=headers, timeout=cfg.timeout_s, limits=limits)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def close(self) -> None:
        self.client.close()

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self.stats[k] += v

    def _body(self, conversation: Conversation, params: SamplingParams, sample: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
            "n": 1,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": params.seed + sample,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _post(self, body: dict[str, Any], what: str) -> dict[str, Any]:
        """One request with retries; the parsed JSON of the first success."""
        for attempt in range(self.cfg.max_retries + 1):
            wait_s: float | None = None
            try:
                self._count(requests=1)
                resp = self.client.post(self.url, json=body)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 300:
                    try:
                        return resp.json()
                    except ValueError:
                        raise EndpointError(f"{what}: {self.url} answered {resp.status_code} with a body that is not "
                                            f"JSON: {resp.text[:300]!r}") from None
                problem = f"HTTP {resp.status_code}: {resp.text[:300]!r}"
                if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                    raise EndpointError(f"{what}: {self.url} refused the request ({problem}); not retried")
                wait_s = retry_after_s(resp.headers.get("retry-after"))
            if attempt == self.cfg.max_retries:
                break
            backoff = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
            delay = min(self.max_backoff_s, max(backoff, wait_s or 0.0))
            log.warning("%s: %s; retry %d/%d in %.2fs", what, problem, attempt + 1, self.cfg.max_retries, delay)
            self._count(retries=1)
            time.sleep(delay)
        raise EndpointError(f"{what}: {self.url} failed after {self.cfg.max_retries + 1} attempts; last: {problem}")

    def _complete(self, index: int, sample: int, conversation: Conversation, params: SamplingParams) -> Completion:
        what = f"chat completion for conversation {index} sample {sample} (model {self.model!r})"
        data = self._post(self._body(conversation, params, sample), what)
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            completion = Completion(text=(choice.get("message") or {}).get("content") or "",
                                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                    completion_tokens=int(usage.get("completion_tokens", 0)),
                                    finish_reason=choice.get("finish_reason") or "stop")
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise EndpointError(f"{what}: unexpected response from {self.url}: {str(data)[:300]}") from exc
        self._count(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
        return completion

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[list[Completion]]:
        check_params(params)
        samples = params.n if params.temperature > 0 else 1
        jobs = [(i, j) for i in range(len(conversations)) for j in range(samples)]
        results: dict[tuple[int, int], Completion] = {}
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="openai") as pool:
            futures = {pool.submit(self._complete, i, j, conversations[i], params): (i, j) for i, j in jobs}
            finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                # Report the earliest request that failed (deterministic across runs).
                raise min(failed, key=lambda f: futures[f]).exception()
            for f in finished:
                results[futures[f]] = f.result()
        return [[replace(results[(i, j if samples > 1 else 0)]) for j in range(params.n)]
                for i in range(len(conversations))]
