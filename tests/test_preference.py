import json

import pytest

from zephyr_ray.config import DataConfig
from zephyr_ray.data.preference import Pair, preference_examples, tokenize_pair, truncate_pair, validate_pair
from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE
from zephyr_ray.data.schema import BadRowError, RowProblem

U = {"role": "user", "content": "Write code."}
S = {"role": "system", "content": "Be brief."}


def _a(text):
    return {"role": "assistant", "content": text}


def test_message_lists_and_strings():
    pair = validate_pair({"prompt": "Write code.", "chosen": [S, U, _a("good")], "rejected": [S, U, _a("bad")]})
    assert pair == Pair([S, U], "good", "bad")
    assert validate_pair({"prompt": "Write code.", "chosen": "good", "rejected": "bad"}) == Pair([U], "good", "bad")


@pytest.mark.parametrize(("row", "field", "reason"), [
    ({"prompt": "q", "chosen": [U, _a("x")], "rejected": [U, _a("x")]}, "rejected", "identical to chosen"),
    ({"chosen": [U, _a("x")], "rejected": [S, U, _a("y")]}, "rejected", "prompt turns differ"),
    ({"chosen": [U, {"role": "bot", "content": "x"}], "rejected": [U, _a("y")]}, "chosen[1].role", "unknown role"),
    ({"chosen": [U, _a("x")], "rejected": [U, _a("")]}, "rejected[1].content", "empty turn"),
    ({"chosen": "x", "rejected": "y"}, "prompt", "non-empty string"),
    ({"prompt": "q", "chosen": [U, _a("x")]}, "rejected", "non-empty list"),
])
def test_bad_pairs_name_the_field(row, field, reason):
    with pytest.raises(RowProblem) as err:
        validate_pair(row)
    assert err.value.field == field and reason in err.value.reason


def test_prompt_ids_shared_where_concatenation_would_remerge(tokenizer):
    pair = Pair([U], "    return a + b", "Here")
    ids = tokenize_pair(tokenizer, pair)
    expected_prompt = tokenizer.apply_chat_template([U], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids["prompt_ids"] == list(expected_prompt)
    assert tokenizer.decode(ids["chosen_ids"]) == "    return a + b</s>"
    assert tokenizer.decode(ids["rejected_ids"]) == "Here</s>"
    # Rendering the whole string and tokenizing merges "\n" + "   " across the boundary: the naive
    # chosen sequence would not start with the prompt ids, so its "prompt" would differ from rejected's.
    text = tokenizer.apply_chat_template([U], tokenize=False, add_generation_prompt=True)
    naive = tokenizer(text + pair.chosen + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert naive[: len(ids["prompt_ids"])] != ids["prompt_ids"]


def test_truncation_cuts_prompt_left_and_responses_right():
    ids = {"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [6, 7, 8, 9], "rejected_ids": [10, 11]}
    out, cut = truncate_pair(ids, max_length=6, max_prompt_length=3)
    assert out == {"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7, 8], "rejected_ids": [10, 11]} and cut
    assert truncate_pair(ids, 20, 10) == (ids, False)


def _raw(rows):
    return [{SOURCE: "p.jsonl", ROW: i + 1, RAW_JSON: json.dumps(r)} for i, r in enumerate(rows)]


def test_examples_count_skips_and_truncation(tokenizer):
    good = {"prompt": "Write code.", "chosen": [U, _a("fine answer")], "rejected": [U, _a("bad")]}
    same = {"prompt": "q", "chosen": [U, _a("x")], "rejected": [U, _a("x")]}
    long = {"prompt": "q", "chosen": [U, _a("word " * 100)], "rejected": [U, _a("no")]}
    rows, report = preference_examples(_raw([good, same, long]), tokenizer, DataConfig(on_bad_row="skip", max_length=32), 16)
    assert (report.rows, report.used, report.truncated) == (3, 2, 1)
    assert dict(report.skipped) == {"rejected: identical to chosen": 1}
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 32 for r in rows)
    assert [r["sample_ids"] for r in rows] == [["p.jsonl#3"], ["p.jsonl#1"]]  # longest first (group_by_length)
    with pytest.raises(BadRowError, match="p.jsonl line 2: field rejected: identical to chosen"):
        preference_examples(_raw([good, same]), tokenizer, DataConfig(max_length=32), 16)
    with pytest.raises(BadRowError, match="line 1: field prompt: .* longer than the length limits"):
        preference_examples(_raw([long]), tokenizer, DataConfig(max_length=32, overlong="error"), 16)


def test_unpacked_pairs_go_out_longest_first_unless_disabled(tokenizer):
    rows = [{"prompt": "q", "chosen": [U, _a("a " * n)], "rejected": [U, _a("b")]} for n in (3, 9, 1, 6)]
    grouped, _ = preference_examples(_raw(rows), tokenizer, DataConfig(packing=False, max_length=64), 16)
    assert [r["sample_ids"] for r in grouped] == [["p.jsonl#2"], ["p.jsonl#4"], ["p.jsonl#1"], ["p.jsonl#3"]]
    longest = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in grouped]
    assert longest == sorted(longest, reverse=True)
    plain, _ = preference_examples(_raw(rows), tokenizer, DataConfig(packing=False, group_by_length=False,
                                                                     max_length=64), 16)
    assert [r["sample_ids"][0][-1] for r in plain] == ["1", "2", "3", "4"]
