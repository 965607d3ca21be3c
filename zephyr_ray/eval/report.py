"""The eval stage's outputs for people: the MT-Bench radar chart (PNG) and the Markdown report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def category_label(category: str) -> str:
    return "STEM" if category.lower() == "stem" else category.capitalize()


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def radar_chart(categories: Sequence[str], series: dict[str, dict[str, float | None]], path: Path,
                title: str = "MT-Bench", low: float = 0.0, high: float = 10.0) -> Path:
    """One polygon per model over the categories (as in the Zephyr paper's figure); a category a model has no
    rating for leaves a gap. Under three categories a radar means nothing, so a grouped bar chart is drawn."""
    labels = [category_label(c) for c in categories]
    fig = Figure(figsize=(7.5, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    if len(categories) >= 3:
        ax = fig.add_subplot(projection="polar")
        angles = np.linspace(0, 2 * np.pi, len(categories), endpoint=False)
        closed = np.concatenate([angles, angles[:1]])
        for name, by_category in series.items():
            values = [_nan(by_category.get(c)) for c in categories]
            values = np.array([*values, values[0]])
            ax.plot(closed, values, linewidth=2, marker="o", markersize=4, label=name)
            ax.fill(closed, np.nan_to_num(values, nan=low), alpha=0.1)
        ax.set_theta_offset(np.pi / 2)
        ax.set_theta_direction(-1)
        ax.set_xticks(angles)
        ax.set_xticklabels(labels)
        ax.set_ylim(low, high)
        ax.set_yticks(np.linspace(low, high, 6)[1:])
        ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.12), fontsize="small")
    else:
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(series))
        x = np.arange(len(categories))
        for i, (name, by_category) in enumerate(series.items()):
            ax.bar(x + i * width, [_nan(by_category.get(c)) for c in categories], width, label=name)
        ax.set_xticks(x + width * (len(series) - 1) / 2)
        ax.set_xticklabels(labels)
        ax.set_ylim(low, high)
        ax.legend(fontsize="small")
    ax.set_title(title, pad=24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _f(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown_report(results: dict[str, Any], chart: str | None) -> str:
    judge = results["judge"]
    expected = judge.get("mode") == "expected"
    how = ("expected mode: no text is generated; the judge's answer is prefilled up to the verdict and every rating "
           "is sum_k k * P(k) over its probabilities of 1..10, every verdict its probabilities of A, B and tie (one "
           "forward pass per judgment)" if expected else
           f"generate mode: its text is parsed for [[rating]] / [[verdict]], up to {judge['max_attempts']} calls "
           "per judgment")
    lines = [f"# Evaluation: {results['run']}", "",
             f"Judge: **{judge['name']}** ({judge['backend']}, {judge['model']}), prompts `{judge['prompts']}`; {how}.",
             ""]
    mt = results.get("mt_bench")
    if mt:
        lines += ["## MT-Bench", "",
                  f"Judge: {mt.get('judge', judge['name'])}. "
                  f"{mt['questions']} questions from `{mt['source']}`, single-answer grading (1-10) of both turns"
                  + (f"; {', '.join(mt['reference_categories'])} against reference answers."
                     if mt.get("reference_categories") else "."), ""]
        rows = [[name, _f(s["turn_1"]), _f(s["turn_2"]), _f(s["overall"]), f"{s['rated']}/{s['judgments']}",
                 str(s["parse_failures"])] for name, s in mt["models"].items()]
        lines += _table(["Model", "Turn 1", "Turn 2", "Overall", "Rated", "Parse failures"], rows) + [""]
        lines += ["### By category", ""]
        names = list(mt["models"])
        rows = [[category_label(c), *(_f(mt["models"][m]["categories"].get(c)) for m in names)] for c in mt["categories"]]
        lines += _table(["Category", *names], rows) + [""]
        if chart:
            lines += [f"![MT-Bench by category]({chart})", ""]
        missing = sum(s["no_reference"] for s in mt["models"].values())
        if missing:
            lines += [f"{missing} judgments of reference-guided categories had no reference answer and used the "
                      "general prompt.", ""]
    ae = results.get("alpaca_eval")
    if ae and ae.get("models"):
        lines += [f"## AlpacaEval-style win rate against {ae['reference']}", "",
                  f"Judge: {ae.get('judge', judge['name'])}. "
                  f"{ae['instructions']} instructions from `{ae['source']}`; each pair judged in both orders "
                  + ("(per order the model's preference is P(its letter) + 0.5 P(tie); W/T/L: preference above, at, "
                     "below one half; ± is the standard error over instructions)." if expected else
                     "(ties count half; ± is the standard error over instructions)."), ""]
        rows = []
        for name, s in ae["models"].items():
            rows.append([name, _pct(s["win_rate"]), _pct(s["standard_error"]), _pct(s.get("lc_win_rate")),
                         f"{s['wins']}/{s['ties']}/{s['losses']}",
                         f"{s['judged']}/{s['instructions']}", _pct(s["position_consistency"]),
                         _pct(s["first_position_rate"]), f"{_f(s['mean_length'], '.0f')} / {_f(s['reference_mean_length'], '.0f')}",
                         str(s["parse_failures"])])
        lines += _table(["Model", "Win rate %", "± SE %", "LC win rate %", "W/T/L", "Judged", "Position consistency %",
                         "Picked first %", "Mean length (chars) model / ref", "Parse failures"], rows) + [""]
        lines += ["Judges favour longer answers (length bias): compare the mean lengths before reading a win rate. "
                  "The LC (length-controlled, AlpacaEval 2) win rate is the win rate a logistic fit of the judgments "
                  "on model, length difference (tanh of the difference over its standard deviation) and instruction "
                  "difficulty (fitted on every model of the run) predicts at equal lengths.", ""]
        unavailable = {n: s["lc_reason"] for n, s in ae["models"].items() if s.get("lc_reason")}
        if unavailable:
            lines += ["LC win rate unavailable: " + "; ".join(f"{n}: {why}" for n, why in unavailable.items()) + ".", ""]
        missing = {n: s["missing_outputs"] for n, s in ae["models"].items() if s.get("missing_outputs")}
        if missing:
            lines += ["Instructions left out for want of an output (model or reference): "
                      + ", ".join(f"{n} {k}" for n, k in missing.items()) + ".", ""]
    ag = (ae or {}).get("agreement")
    if ag:
        lines += ["## Judge agreement", "",
                  f"The judge ({ag.get('judge', judge['name'])}) against the labels of `{ag['source']}` "
                  f"({ag['rows']} preference rows, both orders).", ""]
        lines += _table(["Rows judged", "Agreement %", "± SE %", "Same side %", "Position consistency %", "Parse failures"],
                        [[f"{ag['judged']}/{ag['rows']}", _pct(ag["agreement"]), _pct(ag["standard_error"]), _pct(ag["exact"]),
                          _pct(ag["position_consistency"]), str(ag["parse_failures"])]]) + [""]
    calls = results["judging"]
    if expected:
        lines += ["## Judging", "",
                  f"{calls['judgments']} judgments in expected mode, one forward pass each (no text, no retries); "
                  f"{calls['parse_failures']} without a usable distribution (left out of every score above).", ""]
    else:
        lines += ["## Judging", "",
                  f"{calls['judgments']} judgments, {calls['calls']} judge calls ({calls['retries']} retries of "
                  f"unreadable judgments), {calls['parse_failures']} still unreadable after {judge['max_attempts']} "
                  "attempts (left out of every score above).", ""]
    if calls.get("truncated_prompts"):
        lines += [f"**{calls['truncated_prompts']} judge prompts were cut to the judge's max_prompt_length**; raise "
                  "`judge.engine.max_prompt_length`.", ""]
    timing_rows = [[phase, f"{t['seconds']:.1f}", str(t["units"]), _f(t["units"] / t["seconds"] if t["seconds"] else None),
                    str(t["calls"]) if "calls" in t else "", _f(t["calls"] / t["seconds"]) if t.get("calls") and t["seconds"] else ""]
                   for phase, t in results["timings"].items()]
    lines += _table(["Phase", "Wall s", "Units", "Units/s", "Judge calls", "Calls/s"], timing_rows)
    lines += ["", "A phase's wall time includes its actors' start and model load; a resumed run only times the work "
              "it did.", ""]
    return "\n".join(lines)
