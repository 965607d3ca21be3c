"""AI feedback cores: rating parser, judge scoring (both modes), judge agreement, binarization, self-instruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zephyr_ray.data.preference import validate_pair
from zephyr_ray.data.schema import validate_messages
from zephyr_ray.feedback.binarize import (
    NO_LOWER,
    NO_SCORED,
    ONE_SCORED,
    binarize,
    group_by_prompt,
    stable_prompt_id,
)
from zephyr_ray.feedback.judge import combine_judges, score_batch, summarize_judging
from zephyr_ray.feedback.selfinstruct import (
    EMPTY_ANSWER,
    EMPTY_SEED,
    EMPTY_USER,
    NO_EXCHANGE,
    clean_user_turn,
    self_instruct,
)
from zephyr_ray.generation.types import Completion, SamplingParams
from zephyr_ray.judging import ASPECTS, expected_rating, judge_conversation, load_templates, parse_rating

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts"


class FakeEngine:
    """Deterministic stand-in for a generation engine: ``respond(content, params) -> text``; records calls."""

    def __init__(self, respond, probs=None):
        self.respond = respond
        self.probs = probs
        self.calls: list[tuple[int, SamplingParams]] = []
        self.seen: list[list[dict]] = []

    def generate(self, conversations, params):
        self.calls.append((len(conversations), params))
        self.seen += conversations
        out = []
        for conv in conversations:
            text = self.respond(conv[-1]["content"], params)
            finish = "length" if text.endswith("…") else "stop"
            out.append([Completion(text, 1, 1, finish)])
        return out


class FakeScoringEngine(FakeEngine):
    def option_probs(self, conversations, options, prefix="", suffix=""):
        self.calls.append((len(conversations), (tuple(options), prefix)))
        return [self.probs(conv[-1]["content"]) for conv in conversations]


# ---------------------------------------------------------------------------------------------------
# parse_rating
# ---------------------------------------------------------------------------------------------------

PARSE_CASES = [
    ("Rating: 4\nRationale: The text follows the instructions well.", 4),
    ("**Rating**: 4/5\n\n**Rationale**: Clear, with one small omission.", 4),
    ("I'd rate this a 3 out of 5 because it misses two of the requirements.", 3),
    ("Score - 5", 5),
    ("The response addresses 3 of the 4 requirements. Rating: 2", 2),
    ("Rating: 3\nRationale: It lists 5 steps, but step 2 is wrong.", 3),
    ("Rating: 2\nRationale: a perfect score of 5 would need sources.", 2),
    ("Final rating (1-5): [[3]]", 3),
    ("Rating on a scale of 1 to 5: 2", 2),
    ("Honesty rating: 5\nRationale: Confident and correct.", 5),
    ("Overall, I would give this response a rating of 4, since it covers 2 key points.", 4),
    ("I would not rate this a 5. It deserves a 3/5.", 3),
    ("It's not perfect, but I'd rate it a 4.", 4),
    ("It gets 4 out of 5 stars.", 4),
    ("## Rating\n4\n\n## Rationale\nAccurate.", 4),
    ("Rating:\n\n3", 3),
    ("Rating: **4**", 4),
    ("Rating: four.", 4),
    ("4", 4),
    ("4 - solid answer, minor formatting issues", 4),
    ("The error rate is 5%. Rating: 4", 4),
    ("Rating: 4.5", 4.5),
    ("Rating: 3.0/5", 3.0),
    # missing
    ("The answer is thorough and correct, but it could cite a source.", None),
    ("", None),
    ("Rating: <a single number from 1 to 5>", None),
    ("1. The text is clear.\n2. It is correct.", None),
    ("Only 3 out of 5 steps are correct.", None),
    # out of range / other scale / not a single rating
    ("Rating: 7", None),
    ("Rating: 0\nRationale: empty.", None),
    ("Rating: 8/10", None),
    ("Rating: -1", None),
    ("Rating: 4-5", None),
    ("Rating: 3 or 4", None),
    ("Rating: N/A (the response does 3 things)", None),
    ("Rating: 4th", None),
    # ambiguous
    ("Rating: 3\nOn reflection, the list is incomplete.\nRating: 4", None),
    ("Text 1: Rating: 4\nText 2: Rating: 2", None),
]


@pytest.mark.parametrize(("text", "want"), PARSE_CASES)
def test_parse_rating(text, want):
    got = parse_rating(text)
    assert got == want
    assert got is None or isinstance(got, float)


def test_parse_rating_other_scale():
    assert parse_rating("Rating: 8/10", low=1, high=10) == 8
    assert parse_rating("Rating (1-10): 7", low=1, high=10) == 7
    assert parse_rating("Rating: 7", low=1, high=5) is None
    assert parse_rating(None) is None


def test_parse_rating_is_fast_on_pathological_text():
    import time

    start = time.perf_counter()
    for text in ["Rating" + " " * 20000 + "x", "(" * 5000, "1 " * 5000, "Rating: " + "-" * 10000, "4" + " " * 5000 + "x"]:
        assert parse_rating(text) is None
    assert time.perf_counter() - start < 2


# ---------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------

def test_templates_load_and_fill():
    templates = load_templates(PROMPTS / "ultrafeedback")
    assert list(templates) == list(ASPECTS)
    for text in templates.values():
        assert "Rating:" in text and "{instruction}" in text and "{completion}" in text
    conv = judge_conversation(templates["honesty"], "Name a prime.", "7 is prime. Also {instruction} {x}.")
    assert [m["role"] for m in conv] == ["user"]
    content = conv[0]["content"]
    assert "Name a prime." in content
    # Inserted text is not re-scanned for placeholders; other braces stay literal.
    assert "7 is prime. Also {instruction} {x}." in content and "{completion}" not in content
    # A message-list prompt is shown as a transcript.
    multi = judge_conversation("{instruction}|{completion}", [{"role": "system", "content": "Be terse."},
                                                               {"role": "user", "content": "Hi"}], "Hello")
    assert multi[0]["content"] == "System: Be terse.\n\nUser: Hi|Hello"


def test_template_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="honesty"):
        load_templates(tmp_path, aspects=["honesty"])
    (tmp_path / "honesty.txt").write_text("Rate {completion}")
    with pytest.raises(ValueError, match=r"\{instruction\}"):
        load_templates(tmp_path, aspects=["honesty"])


# ---------------------------------------------------------------------------------------------------
# score_batch
# ---------------------------------------------------------------------------------------------------

TEMPLATES = {"helpfulness": "H|{instruction}|{completion}", "honesty": "O|{instruction}|{completion}"}


def _judge_text(content: str, params: SamplingParams) -> str:
    aspect, _, completion = content.split("|")
    if completion == "good":
        return "Rating: 4\nRationale: fine." if aspect == "H" else "**Rating**: 5/5"
    if completion == "flaky":  # unreadable on the first attempt only
        return "I cannot decide on this one." if params.seed == 10 else "Rating: 2"
    if completion == "broken":  # helpfulness never readable
        return "Rating: N/A" if aspect == "H" else "Rating: 3"
    raise AssertionError(content)


def _rows(*completions):
    return [{"prompt": "q", "prompt_id": "p", "model": f"m{i}", "completion": c} for i, c in enumerate(completions)]


def test_score_batch_retries_then_marks():
    engine = FakeEngine(_judge_text)
    rows = _rows("good", "flaky", "broken")
    out = score_batch(engine, rows, templates=TEMPLATES, params=SamplingParams(seed=10, max_new_tokens=64, n=3),
                      max_attempts=3, judge="teacher")
    # One batched call for all 6 (row, aspect) ratings, then one per retry for the unreadable ones.
    assert [n for n, _ in engine.calls] == [6, 3, 1]
    assert [p.seed for _, p in engine.calls] == [10, 11, 12]
    assert [p.temperature for _, p in engine.calls] == [0.0, 0.7, 0.7]
    assert all(p.n == 1 and p.max_new_tokens == 64 for _, p in engine.calls)
    good, flaky, broken = out
    assert (good["rating_helpfulness"], good["rating_honesty"], good["score"]) == (4, 5, 4.5)
    assert (good["judge_failures"], good["judge_retries"]) == (0, 0)
    assert (flaky["rating_helpfulness"], flaky["rating_honesty"], flaky["score"]) == (2, 2, 2)
    assert (flaky["judge_failures"], flaky["judge_retries"]) == (0, 2)
    assert broken["rating_helpfulness"] is None and broken["rating_honesty"] == 3 and broken["score"] == 3
    assert (broken["judge_failures"], broken["judge_retries"]) == (1, 2)
    assert all(r["judge"] == "teacher" for r in out)
    assert broken["judgements"] == [{"judge": "teacher", "score": 3.0, "ratings": {"helpfulness": None, "honesty": 3.0},
                                     "failures": 1, "retries": 2}]
    assert out[0]["model"] == "m0" and "rating_helpfulness" not in rows[0]  # input rows untouched
    assert summarize_judging(out) == {"completions": 3, "failed_ratings": 1, "retries": 4, "unscored": 0}


def test_score_batch_single_attempt_marks_everything_unread():
    engine = FakeEngine(_judge_text)
    out = score_batch(engine, _rows("good", "flaky"), templates=TEMPLATES, params=SamplingParams(seed=10),
                      max_attempts=1)
    assert [n for n, _ in engine.calls] == [4]
    assert out[1]["score"] is None and out[1]["judge_failures"] == 2 and out[1]["judge_retries"] == 0
    assert out[0]["judge"] == "FakeEngine"
    assert summarize_judging(out)["unscored"] == 1


def test_score_batch_sampling_retries_keep_temperature():
    engine = FakeEngine(_judge_text)
    score_batch(engine, _rows("flaky"), templates=TEMPLATES, params=SamplingParams(seed=10, temperature=1.2))
    assert [p.temperature for _, p in engine.calls] == [1.2, 1.2]


def test_score_batch_expected_mode():
    probs = {"H": [0.1, 0.2, 0.3, 0.4, 0.0], "O": [1.0, 1.0, 0.0, 0.0, 2.0]}  # the second is not normalised
    engine = FakeScoringEngine(lambda c, p: pytest.fail("no text generation in expected mode"),
                               probs=lambda content: probs[content[0]])
    out = score_batch(engine, _rows("anything"), templates=TEMPLATES, mode="expected", judge="local")
    assert engine.calls == [(2, (("1", "2", "3", "4", "5"), "Rating: "))]
    row = out[0]
    assert row["rating_helpfulness"] == pytest.approx(0.1 * 1 + 0.2 * 2 + 0.3 * 3 + 0.4 * 4)  # 3.0
    assert row["rating_honesty"] == pytest.approx((1 * 1 + 1 * 2 + 2 * 5) / 4)  # 3.25
    assert row["score"] == pytest.approx(3.125)
    assert row["judge_failures"] == 0


def test_expected_rating_edge_cases():
    assert expected_rating([0, 0, 0, 0, 1]) == 5
    assert expected_rating([0, 0, 0, 0, 0]) is None
    assert expected_rating([float("nan"), 0, 0, 0, 1]) is None
    with pytest.raises(ValueError, match="5 probabilities"):
        expected_rating([0.5, 0.5])


def test_expected_mode_needs_a_scoring_engine():
    with pytest.raises(TypeError, match="option_probs"):
        score_batch(FakeEngine(_judge_text), _rows("good"), templates=TEMPLATES, mode="expected")


def test_score_batch_rejects_rows_without_completion():
    with pytest.raises(ValueError, match="row 0 has no 'completion'"):
        score_batch(FakeEngine(_judge_text), [{"prompt": "q"}], templates=TEMPLATES)


def test_several_judges_accumulate_and_average():
    first = score_batch(FakeEngine(_judge_text), _rows("good", "broken"), templates=TEMPLATES,
                        params=SamplingParams(seed=10), judge="a")
    second_judge = FakeEngine(lambda content, p: "Rating: 1")
    both = score_batch(second_judge, first, templates=TEMPLATES, judge="b")
    good, broken = both
    assert [j["judge"] for j in good["judgements"]] == ["a", "b"] and good["judge"] == "a+b"
    assert good["score"] == (4.5 + 1) / 2 and good["rating_honesty"] == (5 + 1) / 2
    # Judge a could not rate broken's helpfulness: the aspect mean is judge b's alone.
    assert broken["rating_helpfulness"] == 1 and broken["score"] == (3 + 1) / 2
    assert broken["judge_failures"] == 1
    with pytest.raises(ValueError, match="already rated by judge 'b'"):
        score_batch(second_judge, both, templates=TEMPLATES, judge="b")


# ---------------------------------------------------------------------------------------------------
# combine_judges
# ---------------------------------------------------------------------------------------------------

def test_combine_judges_agreement_hand_computed():
    #           prompt p        | q (B has no score for #4) | r       | s
    a = [5, 3, 1, 2, 4, 2, 3, 1, 2]
    b = [4, 4, 2, 5, None, 1, 4, 2, 1]
    pids = ["p", "p", "p", "q", "q", "r", "r", "s", "s"]
    combined, report = combine_judges([a, b], pids)
    assert combined == [4.5, 3.5, 1.5, 3.5, 4.0, 1.5, 3.5, 1.5, 1.5]
    # p: (0,1) tied by b, (0,2) and (1,2) concordant; q: nothing comparable; r: concordant; s: discordant.
    assert (report.concordant, report.discordant, report.tied) == (3, 1, 1)
    # Best completion: p: a {0} vs b {0,1} differ; q: one common completion, not counted; r: agree; s: differ.
    assert (report.prompts, report.best_agree) == (3, 1)
    assert report.best_agreement == pytest.approx(1 / 3)
    assert report.pair_agreement == 0.75 and report.gamma == 0.5
    assert report.to_dict()["judges"] == 2


def test_combine_judges_single_judge_and_errors():
    combined, report = combine_judges([[1, None]], ["p", "p"])
    assert combined == [1.0, None] and report.pair_agreement is None and report.best_agreement is None
    with pytest.raises(ValueError, match="one score per completion"):
        combine_judges([[1, 2], [1]], ["p", "p"])


# ---------------------------------------------------------------------------------------------------
# binarize
# ---------------------------------------------------------------------------------------------------

def _scored(prompt_id, scores, prompt=None, texts=None):
    prompt = prompt or f"Question {prompt_id}?"
    texts = texts or [f"answer {i} to {prompt_id}" for i in range(len(scores))]
    return [{"prompt": prompt, "prompt_id": prompt_id, "model": f"m{i}", "completion": t, "score": s,
             "judge": "teacher", "rating_helpfulness": s, "rating_honesty": s}
            for i, (s, t) in enumerate(zip(scores, texts))]


def test_binarize_counts_and_skips():
    groups = [
        _scored("ok", [4.0, 2.0, 3.0]),
        _scored("single", [5.0]),
        _scored("equal", [3.0, 3.0, 3.0]),
        _scored("unscored", [None, None]),
        _scored("half", [None, 4.0, float("nan")]),
        _scored("blank", [4.0, 2.0], texts=["fine", "   "]),
        _scored("same-text", [5.0, 4.0], texts=["same", "same"]),
    ]
    pairs, report = binarize(groups, seed=0)
    assert [p["prompt_id"] for p in pairs] == ["ok"]
    assert (report.prompts, report.pairs, report.completions) == (7, 1, 16)
    assert (report.unscored, report.empty) == (4, 1)
    assert report.skipped == {ONE_SCORED: 3, NO_LOWER: 2, NO_SCORED: 1}
    pair = pairs[0]
    assert pair["score_chosen"] == 4.0 and pair["chosen_model"] == "m0"
    assert pair["rejected_model"] in ("m1", "m2") and pair["score_rejected"] < 4.0
    assert pair["judge"] == "teacher" and pair["prompt"] == "Question ok?"
    assert [(c["model"], c["score"]) for c in pair["candidates"]] == [("m0", 4.0), ("m1", 2.0), ("m2", 3.0)]
    assert pair["candidates"][0]["ratings"] == {"helpfulness": 4.0, "honesty": 4.0}
    assert pair["messages"] == pair["chosen"]
    json.dumps(pairs)  # plain data
    assert json.loads(json.dumps(report.to_dict()))["skipped"] == {ONE_SCORED: 3, NO_LOWER: 2, NO_SCORED: 1}
    assert report.summary().startswith("prompts 7, pairs 1; completions 16 (4 unscored, 1 empty, left out)")


def test_binarize_strictly_lower_rule_and_ties():
    group = _scored("tie", [5.0, 5.0, 3.0, 1.0])
    chosen, rejected = set(), set()
    for seed in range(40):
        (pair,), _ = binarize([group], seed=seed)
        assert pair["score_chosen"] == 5.0 and pair["score_rejected"] < 5.0
        chosen.add(pair["chosen_model"])
        rejected.add(pair["rejected_model"])
    assert chosen == {"m0", "m1"}  # a tie at the top is broken by the seeded draw, not by position
    assert rejected == {"m2", "m3"}  # never the other 5.0


def test_binarize_reproducible_order_independent_and_seed_sensitive():
    groups = [_scored(f"p{i}", [4.0, 3.0, 2.0, 1.0]) for i in range(30)]
    pairs, _ = binarize(groups, seed=7)
    again, _ = binarize([list(g) for g in groups], seed=7)
    assert pairs == again
    shuffled = [list(reversed(g)) for g in reversed(groups)]
    other_order, _ = binarize(shuffled, seed=7)
    assert sorted(other_order, key=lambda p: p["prompt_id"]) == sorted(pairs, key=lambda p: p["prompt_id"])
    other_seed, _ = binarize(groups, seed=8)
    picks = [p["rejected_model"] for p in pairs]
    assert picks != [p["rejected_model"] for p in other_seed]
    assert len(set(picks)) == 3  # every lower completion gets drawn somewhere


def test_binarize_does_not_depend_on_python_hash_seed():
    code = ("import json; from zephyr_ray.feedback.binarize import binarize\n"
            "groups = [[{'prompt': f'q{i}', 'prompt_id': f'p{i}', 'model': f'm{k}', 'completion': f'a{k}', "
            "'score': float(k % 3)} for k in range(5)] for i in range(10)]\n"
            "print(json.dumps([p['rejected_model'] for p in binarize(groups, seed=3)[0]]))")
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True, cwd=ROOT).stdout)
    assert len(outputs) == 1 and len(json.loads(outputs.pop())) == 10


def test_binarize_output_is_valid_dpo_input():
    system_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    groups = [_scored("a", [4.0, 1.0]), _scored("b", [2.0, 3.5, 1.0], prompt=system_prompt)]
    pairs, _ = binarize(groups, seed=0)
    assert len(pairs) == 2
    for pair in pairs:
        parsed = validate_pair(pair)
        assert parsed.chosen == next(r["completion"] for g in groups for r in g
                                     if r["prompt_id"] == pair["prompt_id"] and r["model"] == pair["chosen_model"])
    b = pairs[1]
    assert b["prompt"] == "Name a colour." and b["chosen"][:2] == system_prompt
    assert validate_pair(b).prompt == system_prompt and b["score_chosen"] == 3.5


def test_binarize_reports_judge_agreement():
    def judged(pid, a, b):
        rows = _scored(pid, [(x + y) / 2 for x, y in zip(a, b)])
        for row, x, y in zip(rows, a, b):
            row["judgements"] = [{"judge": "a", "score": x}, {"judge": "b", "score": y}]
        return rows

    pairs, report = binarize([judged("p", [5, 1], [4, 2]), judged("q", [1, 5], [3, 2])], seed=0)
    assert (report.agreement.judges, report.agreement.prompts, report.agreement.best_agree) == (2, 2, 1)
    assert (report.agreement.concordant, report.agreement.discordant) == (1, 1)
    assert pairs[0]["candidates"][0]["judge_scores"] == [{"judge": "a", "score": 5.0}, {"judge": "b", "score": 4.0}]


def test_group_by_prompt_and_stable_ids():
    rows = _scored("x", [1.0, 2.0]) + [{"prompt": "no id", "completion": "c", "score": 1.0}] + _scored("y", [1.0])
    rows.insert(1, _scored("y", [3.0])[0])
    groups = group_by_prompt(rows)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert stable_prompt_id("no id") == stable_prompt_id("no id") != stable_prompt_id("no id!")
    assert len(stable_prompt_id("no id")) == 64


# ---------------------------------------------------------------------------------------------------
# self-instruct
# ---------------------------------------------------------------------------------------------------

NEXT_USER = "ASK|{dialogue}"


def _teacher(content: str, params: SamplingParams) -> str:
    if content.startswith("ASK|"):
        assert params.seed == 99  # user turns are written with user_params
        first = content[len("ASK|User: "):].split("\n\n")[0]
        if first == "mute":
            return "  \n"
        number = content.count("\n\nUser: ") + 2  # the user turn being written
        return f'User: "Follow-up {number} on {first}?"'
    assert params.seed == 5  # answers are written with params
    if content in ("silent", "Follow-up 2 on late stop?"):
        return "   "
    return f"Answer to {content}" + ("…" if content == "truncate me" else "")


def test_self_instruct_rows_and_early_stops():
    engine = FakeEngine(_teacher)
    seeds = [{"prompt": "normal", "prompt_id": "s1"}, {"prompt": "late stop", "prompt_id": "s2"},
             {"prompt": "silent", "prompt_id": "s3"}, {"prompt": "mute", "prompt_id": "s4"},
             {"prompt": "  ", "prompt_id": "s5"}]
    rows, report = self_instruct(engine, seeds, turns=3, params=SamplingParams(seed=5, n=4),
                                 next_user_template=NEXT_USER, user_params=SamplingParams(seed=99, temperature=0.8))
    # Per round: one call for the answers of every live dialogue, then one for their next user turns.
    assert [n for n, _ in engine.calls] == [4, 3, 2, 1, 1]
    assert all(p.n == 1 for _, p in engine.calls)
    assert [r["prompt_id"] for r in rows] == ["s1", "s2", "s4"]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "normal"},
        {"role": "assistant", "content": "Answer to normal"},
        {"role": "user", "content": "Follow-up 2 on normal?"},
        {"role": "assistant", "content": "Answer to Follow-up 2 on normal?"},
        {"role": "user", "content": "Follow-up 3 on normal?"},
        {"role": "assistant", "content": "Answer to Follow-up 3 on normal?"},
    ]
    # late stop: its second answer came back empty, so the dialogue ends after one exchange.
    assert rows[1]["messages"] == [{"role": "user", "content": "late stop"},
                                   {"role": "assistant", "content": "Answer to late stop"}]
    assert rows[2]["messages"] == [{"role": "user", "content": "mute"}, {"role": "assistant", "content": "Answer to mute"}]
    for row in rows:
        assert set(row) == {"prompt", "prompt_id", "messages"}
        assert row["prompt"] == row["messages"][0]["content"]
        validate_messages(row["messages"])
    assert (report.seeds, report.dialogues, report.exchanges, report.truncated) == (5, 3, 5, 0)
    assert report.ended_early == {EMPTY_ANSWER: 1, EMPTY_USER: 1}
    assert report.dropped == {EMPTY_SEED: 1, NO_EXCHANGE: 1}
    # The teacher saw the whole dialogue so far when writing a user turn.
    asks = [c[0]["content"] for c in engine.seen if c[0]["content"].startswith("ASK|")]
    assert ("ASK|User: normal\n\nAssistant: Answer to normal\n\nUser: Follow-up 2 on normal?\n\n"
            "Assistant: Answer to Follow-up 2 on normal?") in asks


def test_self_instruct_single_turn_default_ids_and_truncation():
    engine = FakeEngine(_teacher)
    rows, report = self_instruct(engine, [{"prompt": "truncate me"}], turns=1, params=SamplingParams(seed=5),
                                 next_user_template=NEXT_USER)
    assert [n for n, _ in engine.calls] == [1]  # no user turn is asked for after the last answer
    assert rows[0]["prompt_id"] == stable_prompt_id("truncate me")
    assert rows[0]["messages"][-1]["content"] == "Answer to truncate me…"
    assert report.truncated == 1 and report.to_dict()["dialogues"] == 1
    with pytest.raises(ValueError, match="dialogue"):
        self_instruct(engine, [], turns=1, params=SamplingParams(), next_user_template="no placeholder")


def test_self_instruct_message_list_seeds():
    engine = FakeEngine(_teacher)
    system = {"role": "system", "content": "You are concise."}
    seeds = [{"messages": [system, {"role": "user", "content": "normal"}], "prompt_id": "m1"},
             {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "normal"}]},
             {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},  # ends with the answer
             {"messages": [system, {"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]},
             {"prompt_id": "nothing"}]
    rows, report = self_instruct(engine, seeds, turns=1, params=SamplingParams(seed=5), next_user_template=NEXT_USER)
    assert rows[0] == {"prompt": "normal", "prompt_id": "m1", "messages": [
        system, {"role": "user", "content": "normal"}, {"role": "assistant", "content": "Answer to normal"}]}
    assert rows[1]["prompt"] == "hi" and len(rows[1]["messages"]) == 4
    assert rows[1]["prompt_id"] == stable_prompt_id(seeds[1]["prompt"])
    assert report.dropped == {EMPTY_SEED: 3} and report.dialogues == 2


def test_next_user_template_and_cleaning():
    template = (PROMPTS / "selfinstruct" / "next_user.txt").read_text()
    assert template.count("{dialogue}") == 1
    assert clean_user_turn('User: "How does it scale?"') == "How does it scale?"
    assert clean_user_turn("**Next user message:** Why?") == "Why?"
    assert clean_user_turn("“Can you give an example?”") == "Can you give an example?"
    assert clean_user_turn("Userland tools: which ones?") == "Userland tools: which ones?"
    assert clean_user_turn('  "" ') == ""
