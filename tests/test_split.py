"""The held-out split (data.split): by prompt, from (seed, prompt text) alone; its config keys."""

import json
import random

import pytest

from zephyr_ray.config import ConfigError, DPORecipe, SFTRecipe, load_config
from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE
from zephyr_ray.data.samples import sample_dialogues, sample_preferences
from zephyr_ray.data.split import held_out, prompt_text

from .conftest import ROOT


def _dialogue(question: str, answer: str = "ok", system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                         {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "done"}]}


def _side(rows, seed=0, fraction=0.3):
    return [held_out(prompt_text(r), seed, fraction) for r in rows]


def test_prompt_text_of_dialogues_and_pairs():
    assert prompt_text(_dialogue("What is 2+2?", system="Be brief.")) == "What is 2+2?"
    pair = sample_preferences(1, seed=4)[0]
    assert prompt_text(pair) == pair["prompt"] == pair["chosen"][0]["content"]
    no_string = {k: v for k, v in pair.items() if k != "prompt"}  # the turns before the answer
    assert prompt_text(no_string) == pair["prompt"]
    assert prompt_text({"prompt": "Q?", "chosen": "a", "rejected": "b"}) == "Q?"
    # Raw JSONL lines (the readers' columns) are parsed; what has no prompt gives None.
    assert prompt_text({SOURCE: "f", ROW: 1, RAW_JSON: json.dumps(_dialogue("Hi there"))}) == "Hi there"
    assert prompt_text({SOURCE: "f", ROW: 2, RAW_JSON: "{not json"}) is None
    assert prompt_text({"messages": [{"role": "assistant", "content": "x"}]}) is None
    assert held_out(None, 0, 0.99) is False


def test_split_is_by_prompt_deterministic_and_order_free():
    rows = [_dialogue(f"Question {i}?", answer=f"answer {k}") for i in range(200) for k in range(3)]
    # Another answer, system turn, case or spacing of the same question: the same side.
    rows += [_dialogue(f"  question   {i}? ", system="Be kind.") for i in range(200)]
    sides = _side(rows)
    by_prompt: dict[str, set[bool]] = {}
    for row, side in zip(rows, sides, strict=True):
        by_prompt.setdefault(prompt_text(row).split()[1].rstrip("?"), set()).add(side)
    assert len(by_prompt) == 200 and all(len(s) == 1 for s in by_prompt.values())
    shuffled = list(range(len(rows)))
    random.Random(1).shuffle(shuffled)
    assert [_side([rows[i]])[0] for i in shuffled] == [sides[i] for i in shuffled]  # row by row, any order
    assert _side(rows) == sides  # and again
    assert _side(rows, seed=1) != sides  # the seed picks another set
    # A larger fraction keeps every held-out prompt held out (one hash, one threshold).
    assert all(b for a, b in zip(sides, _side(rows, fraction=0.6), strict=True) if a)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5])
def test_fraction_is_honoured_on_1000_prompts(fraction):
    rows = [{"prompt": f"Prompt number {i}: say something", "chosen": "a", "rejected": "b"} for i in range(1000)]
    share = sum(_side(rows, seed=7, fraction=fraction)) / 1000
    sd = (fraction * (1 - fraction) / 1000) ** 0.5
    assert abs(share - fraction) < 4 * sd, share
    assert sum(_side(rows, fraction=0.0)) == 0


def test_eval_keys_are_checked_at_load():
    sft = ROOT / "configs/tiny/sft.yaml"
    cfg = load_config(sft, ["data.eval_fraction=0.2", "train.eval_every=3"])
    assert (cfg.data.eval_fraction, cfg.train.eval_every) == (0.2, 3)
    with pytest.raises(ConfigError, match="data.eval_fraction=0.1: .*data.eval_path='held.jsonl' is set too"):
        load_config(sft, ["data.eval_fraction=0.1", "data.eval_path=held.jsonl"])
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"data.eval_fraction=.*within \[0, 1\)"):
            load_config(ROOT / "configs/tiny/dpo.yaml", [f"data.eval_fraction={bad}"], DPORecipe)
    with pytest.raises(ConfigError, match="train.eval_every=0: must be >= 1"):
        load_config(sft, ["train.eval_every=0"], SFTRecipe)


@pytest.mark.ray
def test_ray_filter_splits_a_file_exactly_as_the_rows_say(ray_cluster, tmp_path):
    from zephyr_ray.data.io import write_jsonl
    from zephyr_ray.data.readers import read_rows
    from zephyr_ray.data.split import split_held_out

    dialogues = sample_dialogues(120, seed=3)
    path = write_jsonl(dialogues, tmp_path / "d.jsonl")
    train, held = split_held_out(read_rows(str(path)).repartition(7), 5, 0.25)
    got_train = sorted(r[ROW] for r in train.take_all())
    got_held = sorted(r[ROW] for r in held.take_all())
    expected = {i + 1 for i, d in enumerate(dialogues) if held_out(prompt_text(d), 5, 0.25)}
    assert set(got_held) == expected and 0 < len(expected) < 60
    assert sorted(got_train + got_held) == list(range(1, 121))
