"""How a generated sequence ends: EOS ids, stop strings, ``finish_reason`` and the count of generated tokens.

One rule for every local decoder (``HFEngine.generate`` and the serving batcher, which gets it from the engine
through ``HFEngine.stop_rule``), so a request served by the batcher gets exactly the completion the engine
writes:

* a sequence stops at its first EOS or at the token that completes a stop string, whichever comes first;
  otherwise it runs to its token limit (``length``);
* ``completion_tokens`` counts the generated tokens up to and including that EOS or that token (never the
  padding a batched decoder feeds a finished row);
* the text is the decode of those tokens without the EOS (even when the EOS is not a special token), cut
  before the first stop string; ``finish_reason`` is ``stop`` (EOS or stop string) or ``length``.

Pure: tokens are ints and ``decode`` is any ``list[int] -> str`` (a tokenizer's decode with
``skip_special_tokens=True``), so the rule is tested on hand-built token sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

STOP, LENGTH = "stop", "length"


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (a stream holds them back)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text`` (None when there is none)."""
    cuts = [k for k in (text.find(s) for s in stops) if k >= 0]
    return min(cuts) if cuts else None


@dataclass(frozen=True)
class Ending:
    """How one sequence ended: its text, its generated-token count and why it stopped."""

    text: str
    completion_tokens: int
    finish_reason: str


class StopRule:
    """The ending rule of one sequence: the engine's EOS ids and the request's stop strings."""

    def __init__(self, eos_ids: Collection[int], stops: Sequence[str], decode: Callable[[list[int]], str]):
        self.eos_ids = frozenset(eos_ids)
        self.stops = list(stops)
        self.decode = decode
        # A stop string newly completed ends in the newest token and every token is >= 1 byte: this many of the
        # latest tokens always hold it (what a decoder that re-decodes a tail per step must look at).
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 8

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def stop_in(self, text: str) -> bool:
        """Whether ``text`` holds a stop string."""
        return bool(self.stops) and cut_at_stop(text, self.stops) is not None

    def hold(self, text: str) -> int:
        """Trailing characters of ``text`` a stream must hold back (they may start a stop string)."""
        return stop_hold(text, self.stops) if self.stops else 0

    def end(self, tokens: Sequence[int], stopped_at: int | None = None) -> Ending:
        """The ending of ``tokens`` (what was generated for the sequence, possibly with padding behind its end).

        ``stopped_at``: the number of tokens generated when a decoder saw a stop string complete (the token that
        completed it included), None when it saw none. The first EOS wins when it comes before that token;
        without either the sequence ran to its limit (``length``), and all of ``tokens`` count.
        """
        tokens = list(tokens)
        eos_at = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        if eos_at is not None and (stopped_at is None or eos_at < stopped_at):
            count, reason = eos_at + 1, STOP
        elif stopped_at is not None:
            count, reason = min(stopped_at, len(tokens)), STOP
        else:
            count, reason = len(tokens), LENGTH
        # The EOS itself is counted but never part of the text (even when it is not a special token).
        kept = tokens[:count - 1] if count and tokens[count - 1] in self.eos_ids else tokens[:count]
        text = self.decode(kept)
        cut = cut_at_stop(text, self.stops) if self.stops else None
        if cut is not None:
            text, reason = text[:cut], STOP
        return Ending(text, count, reason)
