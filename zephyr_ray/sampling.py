"""Sampling parameters: a config section (``sampling:``) and the argument of every generation backend.

It lives at the bottom of the package (standard library only) so the config schemas can use it without
importing ``zephyr_ray.generation``; ``zephyr_ray.generation.types`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    # 0 = greedy decoding.
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # Generation ends at the first of these strings; the returned text excludes it.
    stop: list[str] = field(default_factory=list)
    # Seeds sampling so a rerun of the same prompt with the same params gives the same text.
    seed: int = 0
    # Completions per conversation.
    n: int = 1

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for values no backend can honour: checked when a config loads and by every
        engine before it generates (``generation.check_params``)."""
        out = []
        if self.n < 1:
            out.append(("n", "must be >= 1"))
        if self.max_new_tokens < 1:
            out.append(("max_new_tokens", "must be >= 1"))
        if self.temperature < 0:
            out.append(("temperature", "must be >= 0 (0 = greedy)"))
        if not 0 < self.top_p <= 1:
            out.append(("top_p", "must be in (0, 1]"))
        if any(not isinstance(s, str) or not s for s in self.stop):
            out.append(("stop", "must be non-empty strings"))
        return out
