import json

import pytest

from zephyr_ray.config import DataConfig
from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE
from zephyr_ray.data.schema import BadRowError, RowProblem, validate_messages
from zephyr_ray.data.sft import sft_examples

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
S = {"role": "system", "content": "s"}


def test_valid_shapes():
    assert validate_messages([U, A]) == [U, A]
    assert validate_messages([S, U, A, U, A]) == [S, U, A, U, A]


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        ([], "messages", "non-empty list"),
        ("hello", "messages", "non-empty list"),
        ([U, {"role": "bot", "content": "a"}], "messages[1].role", "unknown role 'bot'"),
        ([A, U], "messages[0].role", "expected 'user'"),
        ([U, U], "messages[1].role", "expected 'assistant'"),
        ([U, A, S], "messages[2].role", "expected 'user'"),
        ([S, S, U, A], "messages[1].role", "expected 'user'"),
        ([U, {"role": "assistant", "content": "  \n"}], "messages[1].content", "empty turn"),
        ([U, {"role": "assistant", "content": 3}], "messages[1].content", "expected a string"),
        ([U, A, U], "messages[2].role", "last turn must be the assistant"),
        ([U, "a"], "messages[1]", "expected an object"),
    ],
)
def test_bad_dialogues_name_the_field(messages, field, reason):
    with pytest.raises(RowProblem) as err:
        validate_messages(messages)
    assert err.value.field == field
    assert reason in err.value.reason


def _raw(lines):
    return [{SOURCE: "data/x.jsonl", ROW: i + 1, RAW_JSON: line} for i, line in enumerate(lines)]


GOOD = json.dumps({"messages": [U, A]})
ROWS = [GOOD, "{not json", json.dumps({"messages": [U, {"role": "assistant", "content": ""}]}), json.dumps([1]),
        json.dumps({"prompt": "no messages"}), GOOD]


def test_error_mode_names_file_line_and_field(tokenizer):
    with pytest.raises(BadRowError) as err:
        sft_examples(_raw(ROWS), tokenizer, DataConfig(on_bad_row="error"))
    assert str(err.value).startswith("data/x.jsonl line 2: field <json>: malformed JSON")
    with pytest.raises(BadRowError, match=r"data/x.jsonl line 2: field messages\[1\].content: empty turn"):
        sft_examples(_raw([GOOD, ROWS[2]]), tokenizer, DataConfig(on_bad_row="error"))


def test_skip_mode_counts_every_reason(tokenizer, caplog):
    rows, report = sft_examples(_raw(ROWS), tokenizer, DataConfig(on_bad_row="skip", packing=False))
    assert report.rows == 6 and report.used == 2 and len(rows) == 2
    assert dict(report.skipped) == {
        "<json>: malformed JSON (Expecting property name enclosed in double quotes at column 2)": 1,
        "messages[*].content: empty turn": 1,
        "<json>: expected an object, got list": 1,
        "messages: expected a non-empty list of {role, content}, got NoneType": 1,
    }
    assert "data/x.jsonl line 3" in caplog.text
    assert [r["sample_ids"] for r in rows] == [["data/x.jsonl#1"], ["data/x.jsonl#6"]]


def test_overlong_policies(tokenizer):
    long = json.dumps({"messages": [U, {"role": "assistant", "content": "word " * 200}]})
    rows, report = sft_examples(_raw([long, GOOD]), tokenizer, DataConfig(max_length=64, overlong="truncate", packing=False))
    assert report.truncated == 1 and len(rows[0]["input_ids"]) == 64 == len(rows[0]["labels"])
    rows, report = sft_examples(_raw([long, GOOD]), tokenizer, DataConfig(max_length=64, overlong="skip"))
    assert report.used == 1 and sum(report.skipped.values()) == 1
    with pytest.raises(BadRowError, match="line 1: field messages: .* longer than data.max_length=64"):
        sft_examples(_raw([long]), tokenizer, DataConfig(max_length=64, overlong="error"))
    # Truncated before any assistant token: nothing to learn, counted as a skip.
    sys_heavy = json.dumps({"messages": [{"role": "user", "content": "q " * 100}, A]})
    rows, report = sft_examples(_raw([sys_heavy]), tokenizer, DataConfig(max_length=16))
    assert rows == [] and list(report.skipped) == ["messages: no assistant token within data.max_length"]
