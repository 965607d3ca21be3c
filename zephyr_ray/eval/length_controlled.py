"""AlpacaEval 2's length-controlled (LC) win rate: the win rate the judge would give if the model's answers were
as long as the reference's (Dubois et al., 2024, "Length-Controlled AlpacaEval").

Judges prefer longer answers, so a model can raise its raw win rate by writing more. The LC win rate fits a
logistic GLM to the judged pairs of one model against the reference and predicts the preference with the
length term set to zero. For the judged pair of model m and the reference on instruction x, with preference
p = P(m's answer is better) in [0, 1] (the instruction's score from :mod:`zephyr_ray.eval.pairwise`: ties half,
probabilities in expected mode; fitted as a soft label, as AlpacaEval does)::

    logit p = theta_m + phi_m * tanh(d_mx / sd_m) + psi_m * gamma_x

- ``d_mx`` = len(model answer) - len(reference answer) in characters, ``sd_m`` its sample standard deviation
  (n - 1) over the model's judged pairs: the tanh keeps one very long answer from dominating the fit;
- ``gamma_x`` = the instruction's difficulty: how much harder than average x is for any model to beat the
  reference on (larger = harder), fitted first on the judgments of every model of the run (all are judged
  against the same reference), then held fixed;
- ``theta_m`` (model identity), ``phi_m`` (length) and ``psi_m`` (difficulty) per model, no intercept.

LC win rate = mean over the model's judged instructions of sigmoid(theta_m + psi_m * gamma_x) (length term 0).

Instruction difficulty (stage 1): ``logit p = theta_m + phi_m * tanh(d_mx / sd_m) - gamma_x`` jointly on every
model's pairs. With a single model each gamma_x would only see that model's one judgment of x and absorb it,
length effect included, so the figure is reported **unavailable** (with the reason, never guessed) unless at
least :data:`MIN_MODELS` models have at least :data:`MIN_INSTRUCTIONS` judged instructions each and a length
difference that varies (sd > 0). Below about a hundred instructions the figure is noisy.

Regularisation. AlpacaEval (``src/alpaca_eval/metrics/glm_winrate.py``, ``length_controlled_v1``) fits the same
three features with scikit-learn's L1-penalised ``LogisticRegressionCV`` (liblinear, no intercept, the penalty
chosen by 5-fold cross-validation, folds grouped by annotation), takes gamma_x precomputed once on its
leaderboard's models, and adds the judgments of two length-gamed versions of the baseline (prompted to be verbose
/ concise) at weight 0.2 / 2 each: pairs that differ only in length, which anchor the length slope so that padding
or truncating answers cannot buy a better LC figure. One run here has neither a leaderboard nor gamed baselines,
and cross-validation on a few hundred pairs would make the figure depend on the fold split; instead every fit is
a deterministic Newton solve of the soft-label log loss summed over pairs plus an L2 penalty:
:data:`L2_COEFFICIENTS` = 0.1 (scikit-learn's C = 10) on theta, phi and psi, weak enough that phi can follow a
steep length preference (at 1.0, 10-20 points of a purely length-driven win rate stayed in the LC figure on the
synthetic judges of ``tests/test_length_controlled.py``), and :data:`L2_DIFFICULTY` = 1 on each gamma_x (a
standard normal prior on the logit scale, which also fixes gamma's mean at about 0). With few instructions the
penalties pull the LC figure toward 50%. No standard error is reported for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_MODELS = 2
MIN_INSTRUCTIONS = 10
L2_COEFFICIENTS = 0.1
L2_DIFFICULTY = 1.0


@dataclass(frozen=True)
class Judged:
    """One judged pair of a model against the reference: its preference (P(model better), in [0, 1]) and the
    lengths (characters) of both answers."""

    instruction_id: str
    preference: float
    model_length: int
    reference_length: int


@dataclass
class LengthControlled:
    """A model's LC win rate, or why there is none; the fitted coefficients say how much length mattered."""

    lc_win_rate: float | None = None
    lc_available: bool = False
    lc_reason: str | None = None
    lc_model: float | None = None  # theta
    lc_length: float | None = None  # phi: > 0 = the judge favoured the longer answer
    lc_difficulty: float | None = None  # psi
    lc_length_sd: float | None = None  # sd of the length difference (characters)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def length_feature(model_lengths: Sequence[float], reference_lengths: Sequence[float]) -> tuple[np.ndarray, float]:
    """``tanh(d / sd)`` per pair, d = model length - reference length, sd its sample standard deviation (n - 1);
    AlpacaEval's length term. ``sd`` is 0 (and the feature all zeros) when the difference does not vary."""
    d = np.asarray(model_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return (np.tanh(d / sd) if sd > 0 else np.zeros_like(d)), sd


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _loss(z: np.ndarray, y: np.ndarray, w: np.ndarray, lam: np.ndarray) -> float:
    # -[y log s(z) + (1 - y) log s(-z)], stable for large |z|
    nll = y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)
    return float(nll.sum() + 0.5 * (lam * w * w).sum())


def _newton_step(cols: np.ndarray, vals: np.ndarray, s: np.ndarray, lam: np.ndarray, grad: np.ndarray,
                 dense: int) -> np.ndarray:
    """``H^-1 grad`` for H = X^T diag(s) X + diag(lam), X given sparsely. Columns from ``dense`` on (one
    difficulty per instruction) meet no other such column in any row, so their block of H is diagonal: only the
    leading block is factorised (a Schur complement), never the full instructions-by-instructions matrix."""
    dim = lam.size
    n_tail = dim - dense
    a = np.diag(lam[:dense])
    b = np.zeros((dense, n_tail))
    d = lam[dense:].copy()
    for i in range(cols.shape[1]):
        for j in range(cols.shape[1]):
            ci, cj, v = cols[:, i], cols[:, j], vals[:, i] * vals[:, j] * s
            head_i, head_j = ci < dense, cj < dense
            both = head_i & head_j
            np.add.at(a, (ci[both], cj[both]), v[both])
            mixed = head_i & ~head_j
            np.add.at(b, (ci[mixed], cj[mixed] - dense), v[mixed])
            tail = ~head_i & ~head_j
            if np.any(ci[tail] != cj[tail]):
                raise ValueError("a row has two columns of the diagonal block")
            np.add.at(d, ci[tail] - dense, v[tail])
    g1, g2 = grad[:dense], grad[dense:]
    x1 = np.linalg.solve(a - (b / d) @ b.T, g1 - b @ (g2 / d))
    return np.concatenate([x1, (g2 - b.T @ x1) / d])


def _fit(cols: np.ndarray, vals: np.ndarray, y: np.ndarray, lam: np.ndarray, max_iter: int, tol: float,
         dense: int | None = None) -> np.ndarray:
    """Newton's method on rows given sparsely (row i = ``vals[i]`` at columns ``cols[i]``): the difficulty fit has
    one column per instruction but three non-zeros per row, so the Hessian is accumulated in O(rows) and solved
    through its diagonal difficulty block (columns from ``dense`` on)."""
    dim = lam.size
    w = np.zeros(dim)
    flat = cols.ravel()
    loss = _loss(np.zeros(len(y)), y, w, lam)
    for _ in range(max_iter):
        p = _sigmoid((vals * w[cols]).sum(axis=1))
        grad = np.bincount(flat, weights=(vals * (p - y)[:, None]).ravel(), minlength=dim) + lam * w
        step = _newton_step(cols, vals, p * (1.0 - p), lam, grad, dim if dense is None else dense)
        t = 1.0
        while True:  # step halving: the penalised loss is convex, so a short enough Newton step always descends
            candidate = w - t * step
            new_loss = _loss((vals * candidate[cols]).sum(axis=1), y, candidate, lam)
            if new_loss <= loss or t < 1e-8:
                break
            t /= 2
        w, loss = candidate, new_loss
        if float(np.max(np.abs(t * step))) < tol:
            break
    return w


def _check(y: np.ndarray, vals: np.ndarray, lam: np.ndarray) -> None:
    if np.any(lam <= 0):
        raise ValueError("the L2 penalty must be positive for every coefficient")
    if np.any(~((y >= 0) & (y <= 1))) or not np.all(np.isfinite(vals)):
        raise ValueError("preferences must lie in [0, 1] and features be finite")


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: np.ndarray | float, max_iter: int = 100,
                 tol: float = 1e-10) -> np.ndarray:
    """Coefficients minimising the soft-label log loss summed over rows plus ``l2 / 2 * w**2`` (no intercept):
    Newton steps with step halving, deterministic. The penalty must be positive so that separable data (a model
    that always wins) still gives finite coefficients."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lam = np.broadcast_to(np.asarray(l2, dtype=np.float64), (X.shape[1],)).copy()
    _check(y, X, lam)
    cols = np.broadcast_to(np.arange(X.shape[1]), X.shape)
    return _fit(np.ascontiguousarray(cols), X, y, lam, max_iter, tol)


def instruction_difficulty(judged: Mapping[str, Sequence[Judged]]) -> dict[str, float]:
    """gamma_x per instruction, fitted jointly on every model's pairs (see the module docstring): larger = the
    reference is harder to beat on x, whichever model tries."""
    models = list(judged)
    ids = sorted({j.instruction_id for rows in judged.values() for j in rows})
    column = {iid: 2 * len(models) + i for i, iid in enumerate(ids)}
    cols, vals, ys = [], [], []
    for m, name in enumerate(models):
        rows = judged[name]
        t, _ = length_feature([j.model_length for j in rows], [j.reference_length for j in rows])
        for j, tj in zip(rows, t):  # theta_m, phi_m * t, -gamma_x
            cols.append((m, len(models) + m, column[j.instruction_id]))
            vals.append((1.0, tj, -1.0))
            ys.append(j.preference)
    lam = np.array([L2_COEFFICIENTS] * (2 * len(models)) + [L2_DIFFICULTY] * len(ids))
    y, v = np.array(ys, dtype=np.float64), np.array(vals, dtype=np.float64)
    _check(y, v, lam)
    w = _fit(np.array(cols, dtype=np.int64), v, y, lam, max_iter=100, tol=1e-10, dense=2 * len(models))
    return {iid: float(w[column[iid]]) for iid in ids}


def _unusable(rows: Sequence[Judged]) -> str | None:
    if len(rows) < MIN_INSTRUCTIONS:
        return f"{len(rows)} judged instructions, the GLM needs at least {MIN_INSTRUCTIONS}"
    _, sd = length_feature([j.model_length for j in rows], [j.reference_length for j in rows])
    if sd == 0:
        return "the length difference to the reference is the same on every instruction: length and model cannot be told apart"
    return None


def length_controlled_win_rates(judged: Mapping[str, Sequence[Judged]]) -> dict[str, LengthControlled]:
    """The LC win rate of every model (its judged pairs against the one reference), or the reason it is unavailable."""
    for name, rows in judged.items():
        seen: set[str] = set()
        for j in rows:
            if j.instruction_id in seen:
                raise ValueError(f"model {name!r}: instruction {j.instruction_id!r} judged twice")
            seen.add(j.instruction_id)
            if not 0.0 <= j.preference <= 1.0:  # NaN fails too
                raise ValueError(f"model {name!r}, instruction {j.instruction_id!r}: preference {j.preference} "
                                 "is not in [0, 1]")
    problems = {name: _unusable(rows) for name, rows in judged.items()}
    fittable = {name: judged[name] for name, problem in problems.items() if problem is None}
    out = {name: LengthControlled(lc_reason=problem) for name, problem in problems.items() if problem is not None}
    if len(fittable) < MIN_MODELS:
        why = (f"instruction difficulty needs at least {MIN_MODELS} models judged against the reference with "
               f"{MIN_INSTRUCTIONS}+ instructions each; this run has {len(fittable)}")
        for name in fittable:
            out[name] = LengthControlled(lc_reason=why)
        return {name: out[name] for name in judged}
    gamma = instruction_difficulty(fittable)
    for name, rows in fittable.items():
        t, sd = length_feature([j.model_length for j in rows], [j.reference_length for j in rows])
        g = np.array([gamma[j.instruction_id] for j in rows])
        X = np.column_stack([np.ones(len(rows)), t, g])
        theta, phi, psi = fit_logistic(X, np.array([j.preference for j in rows]), L2_COEFFICIENTS)
        lc = float(_sigmoid(theta + psi * g).mean())
        out[name] = LengthControlled(lc_win_rate=lc, lc_available=True, lc_model=float(theta), lc_length=float(phi),
                                     lc_difficulty=float(psi), lc_length_sd=sd)
    return {name: out[name] for name in judged}


def with_length_controlled(stats: Mapping[str, Any], lc: LengthControlled) -> dict[str, Any]:
    """``stats`` (a model's pairwise statistics) with the LC fields placed right after ``win_rate`` and its
    standard error, so that results.json and W&B show the two side by side."""
    out: dict[str, Any] = {}
    for key, value in stats.items():
        out[key] = value
        if key == "standard_error":
            out.update(lc.to_dict())
    if "lc_win_rate" not in out:
        out.update(lc.to_dict())
    return out
