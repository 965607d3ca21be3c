"""The one interface every generation backend implements (transformers, vLLM, OpenAI-compatible HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from zephyr_ray.sampling import SamplingParams

__all__ = ["Completion", "Conversation", "Engine", "Message", "SamplingParams", "ScoringEngine"]

Message = dict[str, str]
Conversation = list[Message]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop" (EOS or a stop string) or "length" (hit max_new_tokens).
    finish_reason: str


@runtime_checkable
class Engine(Protocol):
    """Chat generation: one list of ``params.n`` completions per input conversation, in input order."""

    def generate(self, conversations: list[Conversation], params: SamplingParams) -> list[list[Completion]]: ...


@runtime_checkable
class ScoringEngine(Engine, Protocol):
    """A local engine that also exposes next-token probabilities (judges score without parsing text)."""

    def option_probs(self, conversations: list[Conversation], options: list[str], prefix: str = "",
                     suffix: str = "") -> list[list[float]]:
        """P(option | conversation + generation prompt + ``prefix``) for each option, renormalised over
        ``options``; one list per conversation. An option is scored as its whole token sequence (``option +
        suffix``, tokenized by ``generation.option_sequences``): the sum of its tokens' log-probs. ``suffix`` is
        a closing marker that tells options apart when one's text starts another's ("1]]" vs "10]]")."""
        ...
