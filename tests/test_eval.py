"""Evaluation: the parsers and the win-rate maths against hand-computed cases, input validation, the real
MT-Bench / AlpacaEval files when ../shared is present, and the stage end to end on local Ray (tiny models,
a tiny judge, then a scripted OpenAI-compatible judge)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zephyr_ray.generation.types import SamplingParams
from zephyr_ray.judging import TIE, parse_score, parse_verdict
from zephyr_ray.tracking import numeric_leaves

from .conftest import ROOT, SHARED, shared_file
from .wandb_records import read_offline_run

SAMPLE = ROOT / "data" / "sample" / "mt_bench"
PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize("text, expected", [
    ("The answer is fine.\n\nRating: [[7]]", 7.0),
    ("Rating: [[7.5]]", 7.5),
    ("Rating: [[ 8 ]]", 8.0),
    ("Rating: [[10]]", 10.0),
    ("Rating: [[1]]", 1.0),
    ("Rating: [8]", 8.0),  # the single-bracket fallback
    ("As the format asks (Rating: [[5]]), ... my rating: [[3]]", 3.0),  # the last one decides
    ("See [2] for details. Rating: [[6]]", 6.0),  # [[x]] wins over [x]
    ("Rating: [[0]]", None),
    ("Rating: [[11]]", None),
    ("Rating: [[-2]]", None),
    ("Rating: [[12]] though really [5]", None),  # a [[x]] is present: no fallback to [x]
    ("Rating: [[rating]]", None),
    ("I would give it 8 out of 10.", None),
    ("", None),
    (None, None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A is more detailed. [[A]]", "A"),
    ("Final verdict: [[B]]", "B"),
    ("They are equally good: [[C]]", TIE),
    ('Output "[[A]]" if A is better ... my verdict: [[B]]', "B"),
    ("[[ a ]]", "A"),
    ("[A]", None),
    ("A is better", None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


# ------------------------------------------------------------------------------------------------ maths


def test_win_rate_swap_ties_and_standard_error_by_hand():
    from zephyr_ray.eval.pairwise import instruction_score, ordering_score, pairwise_stats, standard_error

    # The model shown first is assistant A; shown second it is assistant B.
    assert ordering_score("A", True) == 1 and ordering_score("B", True) == 0
    assert ordering_score("A", False) == 0 and ordering_score("B", False) == 1
    assert ordering_score(TIE, True) == ordering_score(TIE, False) == 0.5 and ordering_score(None, True) is None
    outcomes = [
        ("A", "B"),  # wins in both orders: 1
        ("A", "A"),  # the judge always picks the first answer: 0.5, inconsistent
        ("C", "C"),  # a tie both times: 0.5, consistent
        ("B", "A"),  # loses in both orders: 0
        ("A", None),  # one readable order only: 1
        (None, None),  # unjudged: left out
    ]
    outcomes = [(TIE if a == "C" else a, TIE if b == "C" else b) for a, b in outcomes]
    assert [instruction_score(o) for o in outcomes] == [1.0, 0.5, 0.5, 0.0, 1.0, None]
    s = pairwise_stats(outcomes)
    assert (s.instructions, s.judged, s.unjudged) == (6, 5, 1)
    assert s.win_rate == pytest.approx(3 / 5)
    # sample sd of [1, .5, .5, 0, 1] = sqrt(0.70 / 4); SE = sd / sqrt(5)
    assert s.standard_error == pytest.approx((0.70 / 4) ** 0.5 / 5 ** 0.5) == pytest.approx(0.187083, abs=1e-6)
    assert (s.wins, s.ties, s.losses) == (2, 2, 1)
    assert (s.both_orders, s.consistent, s.position_consistency) == (4, 3, 0.75)
    assert s.first_position_rate == pytest.approx(5 / 7)  # decisive verdicts A,B,A,A,B,A,A
    assert standard_error([0.5]) is None and standard_error([0.0, 1.0]) == pytest.approx(0.5)
    empty = pairwise_stats([(None, None)])
    assert empty.win_rate is None and empty.standard_error is None and empty.position_consistency is None


def test_agreement_with_labels_by_hand():
    from zephyr_ray.eval.pairwise import agreement_stats

    outcomes = [("A", "B"), ("B", "A"), (TIE, TIE), ("B", "A"), ("A", "A"), (None, None)]
    labels = [1.0, 1.0, 0.5, 0.0, 1.0, 1.0]  # P(output_1 is better)
    s = agreement_stats(outcomes, labels)
    # judge's P(output_1 better) per row: 1, 0, .5, 0, .5, -  -> agreement 1, 0, 1, 1, .5
    assert (s.rows, s.judged, s.unjudged) == (6, 5, 1)
    assert s.agreement == pytest.approx(3.5 / 5)
    assert s.standard_error == pytest.approx((sum((x - 0.7) ** 2 for x in [1, 0, 1, 1, 0.5]) / 4) ** 0.5 / 5 ** 0.5)
    assert s.exact == pytest.approx(3 / 5)  # the split judge (.5) against a clear label is not on its side
    assert (s.both_orders, s.consistent) == (5, 4)


def test_mt_bench_scores_per_turn_category_and_overall_by_hand():
    from zephyr_ray.eval.mt_bench import scores

    rows = [
        {"model": "m", "category": "math", "turn": 1, "score": 8.0, "attempts": 1},
        {"model": "m", "category": "math", "turn": 2, "score": 4.0, "attempts": 2},
        {"model": "m", "category": "writing", "turn": 1, "score": 6.0, "attempts": 1},
        {"model": "m", "category": "writing", "turn": 2, "score": None, "attempts": 3, "no_reference": False},
        {"model": "n", "category": "math", "turn": 1, "score": None, "attempts": 3, "no_reference": True},
    ]
    s = scores(rows, ["m", "n"], ["writing", "math", "coding"])
    assert s["m"]["turn_1"] == 7.0 and s["m"]["turn_2"] == 4.0 and s["m"]["overall"] == 6.0
    assert s["m"]["categories"] == {"writing": 6.0, "math": 6.0, "coding": None}
    assert (s["m"]["judgments"], s["m"]["rated"], s["m"]["parse_failures"], s["m"]["judge_calls"]) == (4, 3, 1, 7)
    assert s["n"]["overall"] is None and s["n"]["parse_failures"] == 1 and s["n"]["no_reference"] == 1


class ScriptedJudge:
    """An engine whose n-th answer to a conversation is scripted; records every call's params."""

    def __init__(self, script):
        self.script = script  # conversation text -> list of replies, one per attempt
        self.calls = []

    def generate(self, conversations, params):
        from zephyr_ray.generation.types import Completion

        self.calls.append((len(conversations), params))
        out = []
        for conv in conversations:
            replies = self.script[conv[-1]["content"]]
            text = replies.pop(0) if len(replies) > 1 else replies[0]
            out.append([Completion(text, 10, 5, "stop")])
        return out


def test_unreadable_judgments_are_retried_then_counted():
    from zephyr_ray.generation.types import SamplingParams
    from zephyr_ray.judging import PARSERS, judge_with_retries

    script = {"q1": ["Rating: [[6]]"], "q2": ["hmm", "Rating: [[9]]"], "q3": ["no idea"], "p1": ["??", "[[B]]"]}
    engine = ScriptedJudge(script)
    convs = [[{"role": "user", "content": k}] for k in script]
    parsers = [PARSERS["single"]] * 3 + [PARSERS["pairwise"]]
    results = judge_with_retries(engine, convs, parsers, SamplingParams(temperature=0.0, seed=5), max_attempts=3)
    assert [r.value for r in results] == [6.0, 9.0, None, "B"]
    assert [r.attempts for r in results] == [1, 2, 3, 2]
    assert [r.completion_tokens for r in results] == [5, 10, 15, 10]
    # One batched call per attempt over the unread ones; retries change the seed and sample when greedy.
    assert [(n, p.seed, p.temperature) for n, p in engine.calls] == [(4, 5, 0.0), (3, 6, 0.7), (1, 7, 0.7)]


class ScoringJudge:
    """A local judge with known option distributions (by the conversation's last message); writes no text."""

    def __init__(self, probs):
        self.probs = probs  # user message -> option probabilities
        self.calls = []

    def generate(self, conversations, params):
        pytest.fail("expected mode generates no text")

    def option_probs(self, conversations, options, prefix="", suffix=""):
        self.calls.append((len(conversations), tuple(options), prefix, suffix))
        return [self.probs[c[-1]["content"]] for c in conversations]


def test_expected_mode_scores_mt_bench_and_both_pairwise_orders_by_hand():
    from zephyr_ray.eval.judging import judge_work, verdict_of
    from zephyr_ray.eval.pairwise import instruction_score, ordering_score, pairwise_stats

    rating = [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.5, 0.3, 0.0, 0.0]  # 6 * .2 + 7 * .5 + 8 * .3 = 7.1
    spread = [0.1] * 10  # 5.5
    top = [0.0] * 9 + [1.0]  # "10]]" is its own option: 10, not swallowed by "1"
    pairs = {  # P(A), P(B), P(tie); the model is A in "x|AB" and B in "x|BA"
        "i1|AB": [0.6, 0.3, 0.1], "i1|BA": [0.5, 0.2, 0.3],  # .6 + .05 = .65 and .2 + .15 = .35: .5
        "i2|AB": [0.9, 0.1, 0.0], "i2|BA": [0.1, 0.7, 0.2],  # .9 and .7 + .1 = .8: .85
    }
    engine = ScoringJudge({"q1": rating, "q2": spread, "q3": top, "q4": [float("nan")] * 10, **pairs})
    units = [{"key": k, "kind": "single", "messages": [{"role": "user", "content": k}], "meta": "{}"}
             for k in ("q1", "q2", "q3", "q4")]
    units += [{"key": k, "kind": "pairwise", "messages": [{"role": "system", "content": "judge"},
                                                           {"role": "user", "content": k}], "meta": "{}"} for k in pairs]
    rows = judge_work(engine, units, params=SamplingParams(), max_attempts=3, judge="local", mode="expected")
    # One call per kind: the ratings 1..10 after "Rating: [[", the verdicts after "[[", each closed by "]]".
    assert engine.calls == [(4, tuple(str(k) for k in range(1, 11)), "Rating: [[", "]]"),
                            (4, ("A", "B", "C"), "[[", "]]")]
    assert [r["score"] for r in rows[:3]] == pytest.approx([7.1, 5.5, 10.0]) and rows[3]["score"] is None
    assert all(r["mode"] == "expected" and r["judgment"] == "" and r["attempts"] == 1 for r in rows)
    assert rows[0]["probs"] == rating and [r["verdict"] for r in rows[4:]] == ["A", "A", "A", "B"]
    by_key = {r["key"]: r for r in rows}
    outcomes = [(verdict_of(by_key[f"{i}|AB"]), verdict_of(by_key[f"{i}|BA"])) for i in ("i1", "i2")]
    assert outcomes[0][0] == {"A": 0.6, "B": 0.3, "tie": 0.1}
    assert ordering_score(outcomes[0][0], True) == pytest.approx(0.65)
    assert ordering_score(outcomes[0][1], False) == pytest.approx(0.35)
    assert [instruction_score(o) for o in outcomes] == pytest.approx([0.5, 0.85])
    s = pairwise_stats(outcomes)
    assert s.win_rate == pytest.approx(0.675) and s.standard_error == pytest.approx(0.175)
    assert (s.wins, s.ties, s.losses) == (1, 1, 0)
    # Position statistics: the most likely verdicts (i1: A then A, inconsistent; i2: A then B, consistent) and
    # the probability that went to the answer shown first.
    assert (s.both_orders, s.consistent, s.position_consistency) == (2, 1, 0.5)
    assert s.first_position_rate == pytest.approx((0.6 + 0.5 + 0.9 + 0.1) / (0.9 + 0.7 + 1.0 + 0.8))
    # A verdict is the one-hot case of the same formula.
    assert pairwise_stats([("A", "B"), (TIE, TIE)]).win_rate == 0.75
    with pytest.raises(TypeError, match="option_probs"):
        judge_work(ScriptedJudge({}), units[:1], params=SamplingParams(), max_attempts=1, judge="j", mode="expected")


def test_expected_judge_needs_a_local_backend_at_load():
    from zephyr_ray.config import ConfigError, EvalRecipe, PipelineRecipe, load_config

    with pytest.raises(ConfigError, match=r"judge\.mode='expected'.*openai backend"):
        load_config(ROOT / "configs/tiny/eval.yaml", ["judge.mode=expected", "judge.engine.backend=openai"], EvalRecipe)
    with pytest.raises(ConfigError, match=r"eval\.judge\.mode='expected'"):
        load_config(ROOT / "configs/tiny/pipeline.yaml", ["eval.judge.engine.backend=openai"], PipelineRecipe)
    for backend in ("transformers", "vllm"):
        cfg = load_config(ROOT / "configs/tiny/eval.yaml", ["judge.mode=expected", f"judge.engine.backend={backend}"],
                          EvalRecipe)
        assert cfg.judge.mode == "expected"
    assert load_config(ROOT / "configs/tiny/eval.yaml", [], EvalRecipe).judge.mode == "generate"
    assert load_config(ROOT / "configs/zephyr-7b-beta/eval.yaml", [], EvalRecipe).judge.mode == "generate"
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(ROOT / "configs/tiny/eval.yaml", ["judge.mode=guess"], EvalRecipe)


# ------------------------------------------------------------------------------------------------ inputs


def _questions(tmp_path, lines, **cfg):
    from zephyr_ray.config import MTBenchConfig
    from zephyr_ray.eval.mt_bench import load_questions

    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_questions(MTBenchConfig(questions=str(path), **cfg)), path


GOOD = '{"question_id": 1, "category": "math", "turns": ["a", "b"], "reference": ["1", "2"]}'


@pytest.mark.parametrize("line, message", [
    ('{"question_id": 2, "category": "math", "turns": ["only one"]}', r"line 2: field turns: expected 2 turns"),
    ('{"question_id": 2, "category": "poetry", "turns": ["a", "b"]}', r"line 2: field category: unknown category 'poetry'"),
    ('{"question_id": 2, "category": "math"}', r"line 2: field turns: expected a list"),
    ('{"question_id": 2, "category": "math", "turns": ["a", ""]}', r"line 2: field turns\[1\]: expected a non-empty"),
    ('{"question_id": null, "category": "math", "turns": ["a", "b"]}', r"line 2: field question_id"),
    ('{"question_id": 2, "category": "math", "turns": ["a", "b"], "reference": "x"}', r"line 2: field reference"),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b"]}', r"line 2: field question_id: question_id 1 is repeated"),
    ('{"question_id": 2, "category": "math", "turns": ["a", "b"]', r"line 2: field <json>: malformed JSON"),
])
def test_bad_question_rows_name_file_line_and_field(tmp_path, line, message):
    from zephyr_ray.data.schema import BadRowError

    with pytest.raises(BadRowError, match=r"question\.jsonl " + message):
        _questions(tmp_path, [GOOD, line])
    (questions, report), _ = _questions(tmp_path, [GOOD, line], on_bad_row="skip")
    assert [q.question_id for q in questions] == [1] and sum(report.skipped.values()) == 1


def test_question_selection_references_and_turn_two_context(tmp_path):
    from zephyr_ray.eval.mt_bench import answer_messages, references, select

    (questions, _), _ = _questions(tmp_path, [
        GOOD,
        '{"question_id": 2, "category": "math", "turns": ["c", "d"]}',
        '{"question_id": 3, "category": "writing", "turns": ["e", "f"], "reference": ["ignored"]}',
        '{"question_id": "x4", "category": "coding", "turns": ["g", "h"], "reference": ["r1"]}',
    ])
    assert [q.qid for q in select(questions, 1, None)] == ["1", "3", "x4"]
    assert [q.qid for q in select(questions, 1, 2)] == ["1", "3"]
    refs = references(questions, {"2": ("f1", "f2"), "1": ("file wins", "ok")}, ["math", "coding"])
    assert refs == {"1": ("file wins", "ok"), "2": ("f1", "f2"), "x4": ("r1",)}  # writing is not reference-guided
    assert answer_messages(questions[0], 2, "my first answer") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "my first answer"},
        {"role": "user", "content": "b"}]


def test_judge_prompts_sample_roles_and_errors(tmp_path):
    from zephyr_ray.data.schema import BadRowError
    from zephyr_ray.eval.mt_bench import GradingPrompts, judge_units
    from zephyr_ray.judging import ROLES, load_judge_prompts, require_prompt

    path = str(SAMPLE / "judge_prompts.jsonl")
    prompts = load_judge_prompts(path)
    names = {"single": "single-v1", "single-reference": "single-math-v1", "single-multi-turn": "single-v1-multi-turn",
             "single-reference-multi-turn": "single-math-v1-multi-turn", "pairwise": "pair-v2"}
    got = {role: require_prompt(prompts, names[role], role, path) for role in ROLES}
    grading = GradingPrompts(got["single"], got["single-reference"], got["single-multi-turn"],
                             got["single-reference-multi-turn"])
    (questions, _), _ = _questions(tmp_path, [GOOD, '{"question_id": 2, "category": "math", "turns": ["c", "d"]}'])
    units = judge_units("m", questions, {"1": ("A1 {answer}", "A2"), "2": ("B1", "B2")},
                        {"1": ("R1", "R2"), "2": None}, grading, "salt")
    metas = [json.loads(u["meta"]) for u in units]
    assert [(m["question_id"], m["turn"], m["prompt"], m["no_reference"]) for m in metas] == [
        (1, 1, "single-math-v1", False), (1, 2, "single-math-v1-multi-turn", False),
        (2, 1, "single-v1", True), (2, 2, "single-v1-multi-turn", True)]
    turn2 = units[1]["messages"][-1]["content"]
    assert all(s in turn2 for s in ("R1", "R2", "A1 {answer}", "A2", "a", "b"))  # braces in answers stay as written
    with pytest.raises(ValueError, match=r"no judge prompt named 'nope'.*pair-v2"):
        require_prompt(prompts, "nope", "single", path)
    with pytest.raises(ValueError, match=r"'pair-v2' has type 'pairwise'"):
        require_prompt(prompts, "pair-v2", "single", path)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text('{"name": "single-v1", "type": "single", "prompt_template": "[Q] {question}"}\n')
    with pytest.raises(ValueError, match=r"'single-v1': prompt_template lacks \{answer\}"):
        require_prompt(load_judge_prompts(str(lacking)), "single-v1", "single", str(lacking))
    bad = tmp_path / "judge_prompts.jsonl"
    bad.write_text(lacking.read_text() + '{"name": "x", "type": "triple", "prompt_template": "t"}\n')
    with pytest.raises(BadRowError, match=r"judge_prompts\.jsonl line 2: field type"):
        load_judge_prompts(str(bad))


def test_alpaca_rows_outputs_and_preferences(tmp_path):
    from zephyr_ray.data.rows import DataReport, valid_rows
    from zephyr_ray.data.schema import BadRowError
    from zephyr_ray.eval.inputs import read_input_rows
    from zephyr_ray.eval.pairwise import collect_instructions, validate_preference

    flat = tmp_path / "model_outputs.json"  # AlpacaEval's JSON array layout
    flat.write_text(json.dumps([{"instruction": "i1", "output": "o1", "generator": "g"},
                                {"instruction": "i2", "output": "o2", "generator": "g"},
                                {"instruction": "i1", "output": "o1b", "generator": "h"},
                                {"instruction": "i1", "output": "again", "generator": "g"}]))
    inst = collect_instructions(read_input_rows(str(flat)), "error", str(flat))
    assert [i["instruction"] for i in inst.items] == ["i1", "i2"]
    assert inst.outputs == {"i1": {"g": "o1", "h": "o1b"}, "i2": {"g": "o2"}} and inst.repeated_outputs == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": [{"model": "m", "text": "t"}]}\n{"prompt": "q", "output": "x"}\n')
    with pytest.raises(BadRowError, match=r"bad\.jsonl line 2: field generator"):
        collect_instructions(read_input_rows(str(bad)), "error", str(bad))
    prefs = [{"instruction": "i", "output_1": "a", "output_2": "b", "preference": 2},
             {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 1.5},
             {"prompt": "p", "chosen": "good", "rejected": "bad"},
             {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 3}]
    report = DataReport()
    rows = [r for _, r in valid_rows(prefs, validate_preference, "skip", report)]
    assert [r["label"] for r in rows] == [0.0, 0.5, 1.0] and rows[2]["output_1"] == "good"
    assert list(report.skipped) == ["preference: expected a number in [1, 2] (1: output_1 better, 2: output_2), got 3"]


def test_recipe_rules_fail_when_the_config_loads():
    from zephyr_ray.config import ConfigError, EvalRecipe, load_config

    def load(*overrides: str) -> EvalRecipe:
        return load_config(ROOT / "configs/tiny/eval.yaml", list(overrides), EvalRecipe)

    cfg = load()
    assert cfg.alpaca_models() == ["tiny-a", "tiny-b"] and cfg.reference_name() == "tiny-reference"
    with pytest.raises(ConfigError, match=r"^alpaca_eval.reference_model='x': needs exactly one reference"):
        load("alpaca_eval.reference_model=x")
    with pytest.raises(ConfigError, match=r"^models: names must be distinct .*\['tiny-a', 'tiny-a'\]"):
        load("models.1.name=tiny-a")
    with pytest.raises(ConfigError, match=r"^models\[1\].name='a/b': is not usable as a folder name"):
        load("models.1.name=a/b")
    with pytest.raises(ConfigError, match=r"^mt_bench.enabled=False: and alpaca_eval.enabled are both false"):
        load("mt_bench.enabled=false", "alpaca_eval.enabled=false")
    with pytest.raises(ConfigError, match=r"^alpaca_eval: reference 'tiny-a' is also an evaluated model"):
        load("alpaca_eval.reference.name=tiny-a")
    with pytest.raises(ConfigError, match=r"^mt_bench.reference_categories=\['math', 'poetry'\]: \['poetry'\] are not"):
        load("mt_bench.reference_categories=[math,poetry]")
    with pytest.raises(ConfigError, match=r"^judge.max_attempts=0: must be >= 1"):
        load("judge.max_attempts=0")
    with pytest.raises(ConfigError, match=r"^alpaca_eval.sampling.top_p=0.0: must be in \(0, 1\]"):
        load("alpaca_eval.sampling.top_p=0")


def test_radar_falls_back_to_bars_under_three_categories(tmp_path):
    from zephyr_ray.eval.report import radar_chart

    path = radar_chart(["math", "stem"], {"a": {"math": 5.0, "stem": None}}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------------ real files


def test_real_mt_bench_files_load_and_build_judge_prompts():
    from zephyr_ray.config import MT_BENCH_CATEGORIES, MTBenchConfig
    from zephyr_ray.eval.mt_bench import load_questions, load_reference_answers, references
    from zephyr_ray.judging import load_judge_prompts

    questions, report = load_questions(MTBenchConfig(questions=str(shared_file("mt_bench", "question.jsonl"))))
    assert len(questions) == 80 and report.used == 80 and not report.skipped
    assert {c: sum(q.category == c for q in questions) for c in MT_BENCH_CATEGORIES} == dict.fromkeys(MT_BENCH_CATEGORIES, 10)
    answers = load_reference_answers(str(shared_file("mt_bench", "reference_answer_gpt-4.jsonl")))
    refs = references(questions, answers, ["math", "reasoning", "coding"])
    assert len(refs) == 30 and all(r is not None and len(r) == 2 for r in refs.values())
    prompts = load_judge_prompts(str(shared_file("mt_bench", "judge_prompts.jsonl")))
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn", "pair-v2"} <= set(prompts)


def test_real_alpaca_eval_files_load():
    from zephyr_ray.data.rows import DataReport, valid_rows
    from zephyr_ray.eval.inputs import read_input_rows
    from zephyr_ray.eval.pairwise import collect_instructions, validate_preference

    path = str(shared_file("alpaca_eval", "completions.jsonl"))
    inst = collect_instructions(read_input_rows(path), "error", path)
    assert len(inst.items) == 805
    assert all({"text_davinci_003", "zephyr-7b-beta"} <= set(inst.outputs[i["instruction"]]) for i in inst.items)
    path = str(shared_file("alpaca_eval", "gpt4_preferences.jsonl"))
    report = DataReport()
    rows = [r for _, r in valid_rows(read_input_rows(path), validate_preference, "skip", report)]
    assert len(rows) + sum(report.skipped.values()) == 802 and len(rows) > 790
    assert {r["label"] for r in rows} == {1.0}


# ------------------------------------------------------------------------------------------------ end to end

QUESTIONS = 8


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mt_data() -> tuple[str, str]:
    """The real MT-Bench questions and judge prompts when ../shared is present, else the shipped sample."""
    real = SHARED / "mt_bench"
    if (real / "question.jsonl").exists() and (real / "judge_prompts.jsonl").exists():
        return str(real / "question.jsonl"), str(real / "judge_prompts.jsonl")
    return str(SAMPLE / "question.jsonl"), str(SAMPLE / "judge_prompts.jsonl")


def _eval_cfg(out, *extra):
    from zephyr_ray.config import EvalRecipe, load_config

    questions, _ = _mt_data()
    return load_config(ROOT / "configs/tiny/eval.yaml", [
        f"run.output_dir={out}", f"mt_bench.questions={questions}", "mt_bench.per_category=1",
        "mt_bench.sampling.max_new_tokens=8", "judge.sampling.max_new_tokens=8", "judge.max_attempts=2",
        "wandb.enabled=false", *extra], EvalRecipe)


@pytest.fixture(scope="module")
def tiny_eval(ray_cluster, tmp_path_factory):
    from zephyr_ray.eval.run import run_eval

    out = tmp_path_factory.mktemp("eval") / "tiny"
    _, judge_prompts = _mt_data()
    return run_eval(_eval_cfg(out, f"judge.prompts={judge_prompts}", "alpaca_eval.enabled=false",
                              "wandb.enabled=true", "wandb.mode=offline", "wandb.group=zr-eval"))


@pytest.mark.ray
def test_mt_bench_end_to_end_with_a_tiny_judge(tiny_eval):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, results = tiny_eval.dir, tiny_eval.results
    mt = results["mt_bench"]
    assert mt["questions"] == QUESTIONS and mt["categories"] == ["writing", "roleplay", "reasoning", "math", "coding",
                                                                 "extraction", "stem", "humanities"]
    for model in ("tiny-a", "tiny-b"):
        answers = _jsonl(out / "mt_bench" / "model_answer" / f"{model}.jsonl")
        assert len(answers) == QUESTIONS and len({a["question_id"] for a in answers}) == QUESTIONS
        assert all(len(a["choices"][0]["turns"]) == 2 and a["model_id"] == model for a in answers)
        # Turn 2 was asked with the model's own turn-1 answer in the context.
        folder = out / "mt_bench" / "answers" / model
        first = {r["question_id"]: r["answer"] for r in pa.concat_tables(
            [pq.read_table(p) for p in (folder / "turn-1").glob("part-*.parquet")]).to_pylist()}
        for row in pa.concat_tables([pq.read_table(p) for p in (folder / "turn-2").glob("part-*.parquet")]).to_pylist():
            assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user"]
            assert row["messages"][1]["content"] == first[row["question_id"]]
    judgments = _jsonl(out / "mt_bench" / "model_judgment" / "tiny-judge_single.jsonl")
    assert len(judgments) == 2 * QUESTIONS * 2
    assert {(j["model"], j["question_id"], j["turn"]) for j in judgments} == {
        (m, a["question_id"], t) for m in ("tiny-a", "tiny-b") for a in answers for t in (1, 2)}
    for j in judgments:  # reference-guided grading for math, reasoning and coding
        ref = j["category"] in ("math", "reasoning", "coding")
        assert j["judge"][1] == ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if j["turn"] == 2 else "")
        assert j["reference"] is ref
    # A tiny random judge writes no [[rating]]: every judgment is retried once, then counted as a failure.
    failed = [j for j in judgments if j["score"] == -1]
    assert len(failed) == 2 * QUESTIONS * 2 and all(j["attempts"] == 2 for j in failed)
    assert results["judging"] == {"judgments": 32, "calls": 64, "retries": 32, "parse_failures": 32,
                                  "truncated_prompts": 0}
    for model in ("tiny-a", "tiny-b"):
        s = mt["models"][model]
        assert (s["judgments"], s["rated"], s["parse_failures"], s["judge_calls"]) == (16, 0, 16, 32)
        assert s["overall"] is None and set(s["categories"]) == set(mt["categories"])
    assert results["timings"]["judge"]["calls"] == 64
    report = tiny_eval.report.read_text()
    assert "| Category | tiny-a | tiny-b |" in report
    assert all(f"| {c} | n/a | n/a |" in report for c in ("Writing", "Roleplay", "Reasoning", "Math", "Coding",
                                                           "Extraction", "STEM", "Humanities"))
    assert "32 still unreadable after 2 attempts" in report
    data = tiny_eval.chart.read_bytes()
    assert tiny_eval.chart.name == "mt_bench_radar.png" and len(data) > 10_000 and min(_png_size(data)) > 400
    assert json.loads((out / "results.json").read_text())["mt_bench"]["models"]["tiny-a"]["parse_failures"] == 16
    # The stage's summary is one offline W&B run: run.name in the group, results.json's numbers and the chart.
    wb = read_offline_run(out)
    assert (wb.name, wb.group, wb.project) == ("tiny-eval", "zr-eval", "zephyr-ray") and len(wb.history) == 1
    logged = {k: v for k, v in wb.history[0].items() if not k.startswith(("_", "mt_bench/radar/"))}
    assert logged == numeric_leaves(json.loads((out / "results.json").read_text()))
    assert {"mt_bench/models/tiny-a/parse_failures", "judging/parse_failures", "wall_s"} <= set(logged)
    assert wb.summary["mt_bench/models/tiny-b/parse_failures"] == 16 and wb.summary["judging/calls"] == 64
    image = {k.removeprefix("mt_bench/radar/"): v for k, v in wb.history[0].items() if k.startswith("mt_bench/radar/")}
    assert image["_type"] == "image-file" and image["format"] == "png" and min(image["width"], image["height"]) > 400
    assert len(list(out.glob("wandb/offline-run-*/files/media/images/mt_bench/radar_*.png"))) == 1


class FakeJudge(ThreadingHTTPServer):
    """An OpenAI-compatible judge on 127.0.0.1 with a scripted mind:

    - single grading: ``[[1 + sha1(prompt) % 10]]``; unreadable on the first attempt (seed 0) when the hash is a
      multiple of 3;
    - pairwise: the longer answer wins, equal lengths tie; an instruction containing "retry-me" gets an unreadable
      first attempt, one containing "always-first" always gets [[A]].
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.lock = threading.Lock()
        self.requests = 0
        self.unreadable = 0


PAIR = re.compile(r"\[Question\]\n(.*)\n\n\[Assistant A's answer begins\]\n(.*)\n\[Assistant A's answer ends\]\n\n"
                  r"\[Assistant B's answer begins\]\n(.*)\n\[Assistant B's answer ends\]", re.S)


def fake_verdict(question: str, a: str, b: str) -> str:
    if "always-first" in question:
        return "A"
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"


class _JudgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        srv: FakeJudge = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        pair = PAIR.search(user)
        if pair:
            question, a, b = pair.groups()
            unreadable = "retry-me" in question and body["seed"] == 0
            reply = "I cannot tell." if unreadable else f"Compared. [[{fake_verdict(question, a, b)}]]"
        else:
            h = int(hashlib.sha1(user.encode()).hexdigest(), 16)
            unreadable = h % 3 == 0 and body["seed"] == 0
            reply = "Hard to say." if unreadable else f"Some explanation. Rating: [[{1 + h % 10}]]"
        with srv.lock:
            srv.requests += 1
            srv.unreadable += unreadable
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(reply.split())}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_judge():
    srv = FakeJudge()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


FILE_PAIRS = [  # instruction, file-model output, ref-model output, file-model's score
    ("Name a colour.", "Blue is a calm colour.", "Red.", 1.0),
    ("Name a fruit.", "Fig.", "A ripe mango.", 0.0),
    ("Name a planet.", "Mars", "Vega", 0.5),
    ("retry-me: name a river.", "The Danube river.", "Nile.", 1.0),
    ("always-first: name a tree.", "Oak.", "A tall birch.", 0.5),
]


@pytest.mark.ray
def test_scripted_gpt4_like_judge_scores_mt_bench_and_alpaca_eval(tiny_eval, tmp_path, fake_judge):
    from zephyr_ray.eval.pairwise import instruction_score
    from zephyr_ray.eval.run import run_eval

    out = tmp_path / "run"
    shutil.copytree(tiny_eval.dir, out)  # the tiny models' MT-Bench answers are reused (resume)
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"prompt_id": f"i{k}", "prompt": q, "completions": [
        {"model": "file-model", "text": mine}, {"model": "ref-model", "text": ref}]}) + "\n"
        for k, (q, mine, ref, _) in enumerate(FILE_PAIRS)))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "p1", "chosen": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "a long answer"}],
         "rejected": [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "short"}]},
        {"prompt": "p2", "chosen": "tiny", "rejected": "much longer"},
        {"instruction": "p3", "output_1": "same", "output_2": "size", "preference": 1.5},
        {"instruction": "p4", "output_1": "x", "output_2": "longer", "preference": 2}]))
    url = f"http://127.0.0.1:{fake_judge.server_address[1]}/v1"
    judge = ["judge.engine.name=fake-gpt4", "judge.engine.backend=openai", "judge.engine.path=gpt-4",
             f"judge.engine.base_url={url}", "judge.engine.max_concurrency=4"]
    result = run_eval(_eval_cfg(
        out, *judge, f"judge.prompts={SAMPLE / 'judge_prompts.jsonl'}", "judge.max_attempts=3",
        f"alpaca_eval.instructions={instructions}", "alpaca_eval.reference=null", "alpaca_eval.reference_model=ref-model",
        "alpaca_eval.output_models=[file-model]", "alpaca_eval.sampling.max_new_tokens=8", f"alpaca_eval.agreement={prefs}"))
    res = result.results
    for model in ("tiny-a", "tiny-b"):  # resumed: the same answers, not generated again
        answers = [a["choices"] for a in _jsonl(out / "mt_bench" / "model_answer" / f"{model}.jsonl")]
        assert answers == [a["choices"] for a in _jsonl(tiny_eval.dir / "mt_bench" / "model_answer" / f"{model}.jsonl")]
    assert set(res["timings"]) == {"mt_bench answer turn 1", "mt_bench answer turn 2", "alpaca_eval generate", "judge"}
    # MT-Bench: every judgment read (retries counted), means = the judgments file's means.
    judgments = _jsonl(out / "mt_bench" / "model_judgment" / "fake-gpt4_single.jsonl")
    assert len(judgments) == 32 and all(1 <= j["score"] <= 10 for j in judgments)
    for model in ("tiny-a", "tiny-b"):
        s = res["mt_bench"]["models"][model]
        mine = [j for j in judgments if j["model"] == model]
        assert s["overall"] == pytest.approx(sum(j["score"] for j in mine) / 16)
        assert s["turn_2"] == pytest.approx(sum(j["score"] for j in mine if j["turn"] == 2) / 8)
        for c, v in s["categories"].items():
            scores = [j["score"] for j in mine if j["category"] == c]
            assert v == pytest.approx(sum(scores) / len(scores))
    # AlpacaEval against ref-model, from the file: the hand-computed case.
    file_model = res["alpaca_eval"]["models"]["file-model"]
    assert file_model["win_rate"] == pytest.approx(0.6)  # (1 + 0 + .5 + 1 + .5) / 5
    assert file_model["standard_error"] == pytest.approx((0.70 / 4) ** 0.5 / 5 ** 0.5)
    assert (file_model["wins"], file_model["ties"], file_model["losses"]) == (2, 2, 1)
    assert file_model["position_consistency"] == pytest.approx(0.8)  # "always-first" flips with the order
    assert file_model["first_position_rate"] == pytest.approx(5 / 8)
    assert (file_model["parse_failures"], file_model["judge_calls"]) == (0, 12)  # 10 + the 2 "retry-me" retries
    assert file_model["mean_length"] == pytest.approx(sum(len(m) for _, m, _, _ in FILE_PAIRS) / 5)
    assert file_model["reference_mean_length"] == pytest.approx(sum(len(r) for _, _, r, _ in FILE_PAIRS) / 5)
    # The generated tiny models: every annotation follows the scripted judge's rule in both orders.
    annotations = _jsonl(out / "alpaca_eval" / "annotations.jsonl")
    assert len(annotations) == 3 * 5
    for a in annotations:
        q, mine, ref = a["instruction"], a["output_2"], a["output_1"]
        expected = instruction_score(tuple("tie" if v == "C" else v for v in (fake_verdict(q, mine, ref),
                                                                             fake_verdict(q, ref, mine))))
        assert a["preference"] == pytest.approx(1 + expected)
        if a["generator_2"] == "file-model":
            assert expected == next(s for i, _, _, s in FILE_PAIRS if i == q)
    for model in ("tiny-a", "tiny-b"):
        s = res["alpaca_eval"]["models"][model]
        assert s["judged"] == 5 and s["mean_tokens"] is not None and s["judge_calls"] == 12
    assert json.loads((out / "alpaca_eval" / "model_outputs" / "tiny-a.json").read_text())[0]["generator"] == "tiny-a"
    # Judge agreement on the preference rows: agreement 1, 0, 1, 1.
    ag = res["alpaca_eval"]["agreement"]
    assert (ag["rows"], ag["judged"], ag["agreement"], ag["exact"]) == (4, 4, 0.75, 0.75)
    assert ag["standard_error"] == pytest.approx(0.25)
    # Every request the judge answered is a counted call; its unreadable replies are the retries.
    judging = res["judging"]
    assert judging["calls"] == fake_judge.requests and judging["retries"] == fake_judge.unreadable
    assert judging["judgments"] == 32 + 3 * 10 + 8 and judging["parse_failures"] == 0
    # 5 instructions are too few for the length-controlled win rate: n/a, and the report says why.
    assert "| file-model | 60.0 | 18.7 | n/a | 2/2/1 | 5/5 | 80.0 |" in result.report.read_text()
    assert file_model["lc_win_rate"] is None and file_model["lc_reason"].startswith("5 judged instructions")
    assert "LC win rate unavailable: tiny-a: 5 judged instructions" in result.report.read_text()
    assert min(_png_size(result.chart.read_bytes())) > 400


@pytest.mark.ray
def test_tiny_judge_in_expected_mode_scores_every_answer(tiny_eval, tmp_path):
    """A tiny random judge writes no [[rating]], but in expected mode every answer gets a score in [1, 10] and every
    instruction a win rate, from the judge's probabilities (one forward pass per judgment, no retries)."""
    from zephyr_ray.eval.pairwise import ordering_score
    from zephyr_ray.eval.run import run_eval
    from zephyr_ray.pipeline import summary_table

    out = tmp_path / "run"
    shutil.copytree(tiny_eval.dir, out)  # the tiny models' MT-Bench answers are reused (resume)
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"prompt_id": f"i{k}", "prompt": q, "completions": [
        {"model": "file-model", "text": mine}, {"model": "ref-model", "text": ref}]}) + "\n"
        for k, (q, mine, ref, _) in enumerate(FILE_PAIRS[:3])))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"instruction": "p", "output_1": "x", "output_2": "longer", "preference": 2}) + "\n")
    result = run_eval(_eval_cfg(
        out, "judge.mode=expected", f"judge.prompts={SAMPLE / 'judge_prompts.jsonl'}", "mt_bench.limit=3",
        f"alpaca_eval.instructions={instructions}", "alpaca_eval.generate=false", "alpaca_eval.reference=null",
        "alpaca_eval.reference_model=ref-model", "alpaca_eval.output_models=[file-model]", f"alpaca_eval.agreement={prefs}"))
    res = result.results
    assert res["judge"]["mode"] == "expected" and res["judge"]["label"] == "tiny-judge (expected: probability-weighted)"
    assert res["mt_bench"]["judge"] == res["alpaca_eval"]["judge"] == res["judge"]["label"]
    # MT-Bench: 3 questions x 2 models x 2 turns, every one scored = sum_k k * P(k) of its stored probabilities.
    judgments = _jsonl(out / "mt_bench" / "model_judgment" / "tiny-judge_single.jsonl")
    assert len(judgments) == 12
    for j in judgments:
        assert j["mode"] == "expected" and j["judgment"] == "" and j["attempts"] == 1 and len(j["probs"]) == 10
        assert sum(j["probs"]) == pytest.approx(1.0, abs=1e-6)
        assert 1 <= j["score"] <= 10 and j["score"] == pytest.approx(sum(k * p for k, p in zip(range(1, 11), j["probs"])))
    for model in ("tiny-a", "tiny-b"):
        s = res["mt_bench"]["models"][model]
        assert (s["rated"], s["parse_failures"]) == (6, 0) and 1 <= s["overall"] <= 10
        assert s["overall"] == pytest.approx(sum(j["score"] for j in judgments if j["model"] == model) / 6)
    assert res["judging"] == {"judgments": 12 + 6 + 2, "calls": 20, "retries": 0, "parse_failures": 0,
                              "truncated_prompts": 0}
    # AlpacaEval: a probability-weighted preference for every instruction, from both orders' probabilities.
    annotations = _jsonl(out / "alpaca_eval" / "annotations.jsonl")
    assert len(annotations) == 3
    prefs_of = []
    for a in annotations:
        first, second = a["probs_model_first"], a["probs_model_second"]
        assert set(first) == {"A", "B", "tie"} and sum(first.values()) == pytest.approx(1.0, abs=1e-6)
        p = (ordering_score(first, True) + ordering_score(second, False)) / 2
        assert 0 < p < 1 and a["preference"] == pytest.approx(1 + p)
        assert a["verdict_model_first"] == max(first, key=first.get)
        prefs_of.append(p)
    file_model = res["alpaca_eval"]["models"]["file-model"]
    assert (file_model["judged"], file_model["parse_failures"]) == (3, 0)
    assert file_model["win_rate"] == pytest.approx(sum(prefs_of) / 3) and file_model["standard_error"] > 0
    agreement = _jsonl(out / "alpaca_eval" / "agreement.jsonl")
    assert res["alpaca_eval"]["agreement"]["judged"] == 1 and 0 < agreement[0]["judge_preference_1"] < 1
    report = result.report.read_text()
    assert "expected mode: no text is generated" in report and "Judge: tiny-judge (expected: probability-weighted)." in report
    assert "20 judgments in expected mode, one forward pass each" in report
    # The pipeline's summary table reads results.json: numbers (no n/a) and the mode that made them.
    mt, ae = res["mt_bench"], res["alpaca_eval"]
    table = summary_table({"run_id": "r", "run_dir": str(out), "seconds": {}, "eval": {
        "mt_bench": {n: {"overall": s["overall"], **s["categories"], "parse_failures": s["parse_failures"]}
                     for n, s in mt["models"].items()},
        "categories": mt["categories"], "win_rate": {n: {"win_rate": s["win_rate"]} for n, s in ae["models"].items()},
        "reference": ae["reference"], "judge": res["judge"]["name"], "judge_mode": res["judge"]["mode"]}})
    assert "evaluation (judge tiny-judge, expected: probability-weighted):" in table
    overall = next(line for line in table.splitlines() if line.split()[:1] == ["overall"]).split()[1:]
    assert len(overall) == 2 and "n/a" not in overall
