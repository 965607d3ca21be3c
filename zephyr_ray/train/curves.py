"""Training curves as a PNG next to ``metrics.jsonl``: what a practitioner looks at first after a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Panels per stage: each panel plots these metric keys against the step (keys a run lacks are left out); the
# held-out eval_ values (data.eval_path / eval_fraction) share their training value's panel.
SFT_PANELS: tuple[tuple[str, ...], ...] = (("loss", "eval_loss"), ("lr",), ("grad_norm",), ("tokens_per_s",),
                                           ("nll", "eval_nll"),  # this and the next: distillation
                                           ("distill/divergence", "distill/kl"))
DPO_PANELS: tuple[tuple[str, ...], ...] = (("loss", "eval_loss"), ("rewards/accuracies", "eval_rewards/accuracies"),
                                           ("rewards/margins", "eval_rewards/margins"),
                                           ("rewards/chosen", "rewards/rejected"))


def plot_curves(metrics: Sequence[dict[str, Any]], panels: Sequence[Sequence[str]], path: str | Path,
                title: str) -> Path | None:
    """One subplot per panel in a row-major grid of two columns; None when no panel has a value to plot."""
    series = []
    for keys in panels:
        lines = {k: [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), int | float)] for k in keys}
        lines = {k: v for k, v in lines.items() if v}
        if lines:
            series.append(lines)
    if not series:
        return None
    rows = (len(series) + 1) // 2
    fig = Figure(figsize=(10, 3.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, lines in enumerate(series):
        ax = fig.add_subplot(rows, 2, i + 1)
        for key, points in lines.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, linewidth=1.5, marker="." if len(points) < 50 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(lines))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
