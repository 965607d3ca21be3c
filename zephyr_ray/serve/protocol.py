"""The OpenAI chat-completions wire format: request validation, responses, stream chunks, error bodies.

Validation is written out by hand (not FastAPI's pydantic models) so that every refusal is an HTTP 400 with
OpenAI's error body ``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` whose
``param`` names the exact field (``messages[2].role``, ``max_tokens``), never FastAPI's 422.

Accepted: ``model``, ``messages`` (``system``/``developer``/``user``/``assistant``; content a string or a
list of ``{"type": "text", "text": ...}`` parts), ``temperature`` [0, 2], ``top_p`` (0, 1], ``max_tokens``
or ``max_completion_tokens`` (>= 1), ``stop`` (a string or up to 4 strings), ``seed``, ``n``, ``stream``,
``stream_options.include_usage``. Refused when set to something we cannot honour: ``tools``/``functions``,
``logprobs``, ``logit_bias``, non-zero penalties, a ``response_format`` other than text. Other fields
(``user``, ``metadata``, ...) are ignored.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zephyr_ray.generation.types import Completion, Conversation, SamplingParams

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role; the chat template gets "system".
ROLE_ALIASES = {"developer": "system"}
MAX_STOP = 4
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "top_logprobs", "audio",
               "prediction", "modalities")


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True)
class Limits:
    """What one server accepts (from ``ServeConfig`` and the model)."""

    model_name: str
    max_model_len: int
    max_prompt_length: int
    max_tokens_limit: int
    default_max_tokens: int | None
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    max_n: int = 8
    # LoRA adapters served beside the base: a request's model may name one of them.
    adapters: tuple[str, ...] = ()


@dataclass
class ChatRequest:
    """A validated request: the conversation, its prompt token ids and the engine's sampling params."""

    conversation: Conversation
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    # The model the request named: the base's name or an adapter's (echoed in the response).
    model: str = ""
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


# ------------------------------------------------------------------------------------------------ parsing


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    return body


def parse_messages(messages: Any) -> Conversation:
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be a list of message objects, got {type(messages).__name__}", "messages",
                  "invalid_type")
    if not messages:
        raise bad("'messages' must contain at least one message", "messages", "empty_array")
    out: Conversation = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}", where,
                      "invalid_type")
        role = m.get("role")
        if role is None:
            raise bad(f"{where} has no 'role'", f"{where}.role", "missing_required_parameter")
        if not isinstance(role, str) or ROLE_ALIASES.get(role, role) not in ROLES:
            raise bad(f"{where}.role {role!r} is not supported; use one of {[*ROLES, *ROLE_ALIASES]}",
                      f"{where}.role", "invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"{where}: tool and function calls are not supported", f"{where}.tool_calls", "unsupported")
        content = m.get("content")
        if content is None:
            raise bad(f"{where} has no 'content'", f"{where}.content", "missing_required_parameter")
        if isinstance(content, list):
            parts = []
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{k}] must be a text part {{'type': 'text', 'text': ...}}; other "
                              "content types are not supported", f"{where}.content[{k}]", "invalid_value")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
                      f"{where}.content", "invalid_type")
        out.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    return out


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad(f"'{name}' must be a number, got {json.dumps(value)}", name, "invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{name}' must be in {interval}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad(f"'{name}' must be an integer, got {json.dumps(value)}", name, "invalid_type")
    return int(value)


def parse_sampling(body: dict[str, Any], limits: Limits, prompt_tokens: int | None = None) -> tuple[SamplingParams, dict]:
    """Sampling params of a request; ``prompt_tokens`` (when known) bounds ``max_tokens`` by the context."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported")
    if body.get("logprobs") not in (None, False):
        raise bad("'logprobs' is not supported by this server", "logprobs", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or value != 0):
            raise bad(f"'{name}' is not supported by this server (only 0)", name, "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("'response_format' other than {'type': 'text'} is not supported", "response_format", "unsupported")

    temperature = _number(body, "temperature", limits.default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", limits.default_top_p, 0.0, 1.0, lo_open=True)

    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad(f"'{name}' must be at least 1, got {max_tokens}", name)
        if max_tokens > limits.max_tokens_limit:
            raise bad(f"'{name}' is too large: {max_tokens}; this server allows at most {limits.max_tokens_limit}",
                      name)

    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= limits.max_n:
        raise bad(f"'n' must be between 1 and {limits.max_n}, got {n}", "n")

    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad(f"'stop' must be a string or a list of strings, got {json.dumps(stop)}", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("'stop' strings must not be empty", "stop")

    seed = _integer(body, "seed")
    if seed is None:
        seed = secrets.randbits(63)  # OpenAI: no seed = a fresh draw every request

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"'stream' must be a boolean, got {json.dumps(stream)}", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("'stream_options.include_usage' must be a boolean", "stream_options.include_usage",
                      "invalid_type")

    if prompt_tokens is not None:
        room = limits.max_model_len - prompt_tokens
        if max_tokens is None:
            max_tokens = min(room, limits.max_tokens_limit, limits.default_max_tokens or room)
        elif max_tokens > room:
            raise bad(f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
                      f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                      f"completion). Please reduce the length of the messages or completion.", name,
                      "context_length_exceeded")
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens or 1, stop=stops,
                            seed=seed, n=n)
    return params, {"stream": bool(stream), "include_usage": include_usage}


def parse_chat_request(body: dict[str, Any], limits: Limits, tokenize) -> ChatRequest:
    """Validate ``body``; ``tokenize(conversation) -> prompt ids`` applies the model's chat template."""
    model = body.get("model")
    if model is None:
        raise bad("'model' is required", "model", "missing_required_parameter")
    if model != limits.model_name and model not in limits.adapters:
        served = ", ".join(repr(m) for m in (limits.model_name, *limits.adapters))
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served}", "model",
                       "model_not_found")
    conversation = parse_messages(body.get("messages"))
    parse_sampling(body, limits)  # every parameter error before the (costlier) chat template
    try:
        prompt_ids = list(tokenize(conversation))
    except Exception as exc:  # the template refused the conversation (e.g. roles out of order)
        raise bad(f"the chat template cannot render these messages: {exc}", "messages") from None
    longest = min(limits.max_prompt_length, limits.max_model_len - 1)
    if len(prompt_ids) > longest:
        raise bad(f"This model's maximum context length is {limits.max_model_len} tokens and prompts may have at "
                  f"most {longest}. However, your messages resulted in {len(prompt_ids)} tokens. Please reduce the "
                  "length of the messages.", "messages", "context_length_exceeded")
    params, flags = parse_sampling(body, limits, len(prompt_ids))
    return ChatRequest(conversation, prompt_ids, params, model=model, **flags)


# ------------------------------------------------------------------------------------------------ responses


def usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    """OpenAI's usage: the prompt once, the completion tokens of every choice."""
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(req: ChatRequest, model: str, completions: list[Completion]) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": req.created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(completions)],
        "usage": usage(len(req.prompt_ids), completions),
    }


def chunk(req: ChatRequest, model: str, choices: list[dict[str, Any]], usage_: dict | None = None) -> str:
    """One SSE event of a stream (``data: {...}`` and a blank line)."""
    body: dict[str, Any] = {"id": req.request_id, "object": "chat.completion.chunk", "created": req.created,
                            "model": model, "system_fingerprint": None, "choices": choices}
    if req.include_usage:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def delta_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


DONE = "data: [DONE]\n\n"


def models_response(model: str, created: int, max_model_len: int, adapters: Sequence[str] = ()) -> dict[str, Any]:
    """The base model's card, then one per LoRA adapter (``parent``: the base, as vLLM lists adapters)."""
    return {"object": "list", "data": [model_card(model, created, max_model_len),
                                       *(model_card(a, created, max_model_len, model) for a in adapters)]}


def model_card(model: str, created: int, max_model_len: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": created, "owned_by": "zephyr-ray",
            "max_model_len": max_model_len}
    if parent is not None:
        card["parent"] = parent
    return card
