"""The one stop/EOS rule (``generation/stopping.py``) on hand-built token sequences: a toy vocabulary whose
decode is the concatenation of the tokens' strings, so every count and cut below is checkable by eye."""

from __future__ import annotations

import pytest

from zephyr_ray.generation.stopping import LENGTH, STOP, Ending, StopRule, cut_at_stop, stop_hold

EOS = 0
VOCAB = {EOS: "</s>", 1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "!", 6: "\n\n", 7: "Q:"}


def decode(ids: list[int]) -> str:
    # Like a tokenizer whose EOS is *not* a special token: it is decoded as text unless the rule drops it.
    return "".join(VOCAB[t] for t in ids)


def rule(*stops: str) -> StopRule:
    return StopRule({EOS}, list(stops), decode)


def first_stop(r: StopRule, tokens: list[int]) -> int | None:
    """What a step-by-step decoder does: after each new token, look for a stop string in the latest
    ``window`` tokens; the number of tokens generated at the first hit (None: no hit)."""
    for n in range(1, len(tokens) + 1):
        if r.is_eos(tokens[n - 1]):
            return None
        if r.stop_in(decode(tokens[max(0, n - r.window):n])):
            return n
    return None


def test_stop_string_split_across_tokens_counts_the_completing_token_and_cuts_the_text():
    r = rule("o w")  # "lo" + " wo": the string starts in token 2 and is completed by token 3
    generated = [1, 2, 3, 4, 5]  # a batched decoder kept feeding this row until the batch ended
    assert first_stop(r, generated) == 3
    assert r.end(generated, stopped_at=3) == Ending("Hell", 3, STOP)
    # A batcher row ends at the completing token: the same ending from its own tokens.
    assert r.end(generated[:3], stopped_at=3) == Ending("Hell", 3, STOP)


def test_eos_first_is_counted_never_decoded_and_padding_behind_it_is_not_counted():
    r = rule()
    assert r.end([EOS, EOS, EOS]) == Ending("", 1, STOP)  # EOS, then the batch's padding (also EOS ids)
    assert r.end([1, 2, EOS, 5, 5]) == Ending("Hello", 3, STOP)
    assert "</s>" not in r.end([1, EOS]).text


def test_eos_and_stop_string_whichever_comes_first():
    r = rule("lo")
    # The EOS (token 2) comes before the token that would complete the stop string (token 3): EOS wins.
    assert r.end([1, EOS, 2, 3], stopped_at=3) == Ending("Hel", 2, STOP)
    # The stop string is completed by token 2, before the EOS: it wins; the EOS is not counted.
    assert first_stop(r, [1, 2, EOS]) == 2
    assert r.end([1, 2, EOS], stopped_at=2) == Ending("Hel", 2, STOP)


def test_max_tokens_reached_is_length_and_counts_every_token():
    r = rule("Q:")
    assert first_stop(r, [1, 2, 5]) is None
    assert r.end([1, 2, 5]) == Ending("Hello!", 3, LENGTH)
    # The last allowed token completed a stop string: the text is cut and the reason is stop, not length.
    assert rule(" wo").end([1, 2, 3]) == Ending("Hello", 3, STOP)


def test_earliest_of_several_stops_cuts_and_window_covers_the_longest():
    r = rule("\n\nQ:", "!")
    tokens = [1, 2, 5, 6, 7]
    assert first_stop(r, tokens) == 3  # "!" is completed first
    assert r.end(tokens, stopped_at=3) == Ending("Hello", 3, STOP)
    assert r.window == 4 + 8 and rule("é!").window == 3 + 8  # bytes, not characters
    assert rule().window == 8 and not rule().stop_in("anything")


def test_hold_back_and_cut_helpers():
    assert stop_hold("hello wor", ["world"]) == 3
    assert stop_hold("hello", ["xyz"]) == 0
    assert stop_hold("ab", ["abc", "b"]) == 2
    assert rule("world").hold("hello wor") == 3 and rule().hold("hello wor") == 0
    assert cut_at_stop("one two three", ["three", "two"]) == 4
    assert cut_at_stop("one", ["x"]) is None


@pytest.mark.parametrize("stopped_at", [None, 2])
def test_empty_generation(stopped_at):
    assert rule("x").end([], stopped_at) == Ending("", 0, STOP if stopped_at else LENGTH)
