"""Agreement of the model's scores with a person's: the figures a hand-scored sample supports.

`agree(pairs, scale=(1, 10))` takes (id, human score, model score, model probability, expected
score) rows and gives, over the rows where both scores exist (`n`): exact agreement, agreement
within ±1, mean absolute error, quadratic-weighted Cohen's κ over the whole scale, Spearman's ρ
and Kendall's τ (and, where the model gave an expected score, ρ and τ of it), each with a seeded
percentile bootstrap 95% CI over rows (`scipy.stats.bootstrap`, paired); the confusion matrix;
the disagreements, largest first; and how many labelled rows a CI of a given width needs (the
width shrinks as 1/√n). `raters(columns)` gives two or more raters' agreement with each other:
the ceiling a judge is measured against.

No figure without its n: under `MIN_ROWS` comparable rows, or where a figure is undefined (every
score the same: κ's expected disagreement is 0, a rank correlation of a constant), the metric is
`None` with the reason, never 0 or 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "MIN_ROWS",
    "Agreement",
    "Figure",
    "Pair",
    "agree",
    "labels_needed",
    "quadratic_kappa",
    "raters",
]

MIN_ROWS = 10
"""Fewer comparable rows than this: every figure is None, with the reason."""

RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Pair:
    """One labelled row: the person's score and the model's (None where absent)."""

    id: str
    human: int | None
    model: int | None
    p: float | None = None
    """The model's probability of its score (logprobs mode)."""
    expected: float | None = None
    """The model's expected score (logprobs mode)."""


@dataclass(frozen=True, slots=True)
class Figure:
    """One agreement figure: its value and 95% CI over rows, its n, or why it is None."""

    value: float | None
    ci: tuple[float, float] | None
    n: int
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "ci95": list(self.ci) if self.ci is not None else None,
            "n": self.n,
            "reason": self.reason,
        }

    def text(self, digits: int = 3) -> str:
        if self.value is None:
            return f"n/a ({self.reason})"
        ci = (
            f" [{self.ci[0]:.{digits}f}, {self.ci[1]:.{digits}f}]"
            if self.ci is not None
            else f" (no CI: {self.reason})"
        )
        return f"{self.value:.{digits}f}{ci} (n={self.n})"


def quadratic_kappa(a: Sequence[int], b: Sequence[int], scale: tuple[int, int]) -> float | None:
    """Cohen's κ with quadratic weights over every value of `scale` (lo..hi), not only the
    values seen: a 3 against a 4 is one step of the scale whatever else was scored. None when
    undefined (no expected disagreement: both sides gave one and the same value throughout)."""
    lo, hi = scale
    k = hi - lo + 1
    x = np.asarray(a, dtype=np.int64) - lo
    y = np.asarray(b, dtype=np.int64) - lo
    observed = np.bincount(x * k + y, minlength=k * k).reshape(k, k).astype(float)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    denom = float((weights * expected).sum())
    if denom <= 0.0:
        return None
    return 1.0 - float((weights * observed).sum()) / denom


def _exact(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def _within1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b) <= 1))


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def _rank(kind: str) -> Callable[[np.ndarray, np.ndarray], float | None]:
    def rank(a: np.ndarray, b: np.ndarray) -> float | None:
        if np.all(a == a[0]) or np.all(b == b[0]):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = stats.spearmanr(a, b) if kind == "spearman" else stats.kendalltau(a, b)
        value = float(r.statistic)
        return None if math.isnan(value) else value

    return rank


def _figure(
    stat: Callable[[np.ndarray, np.ndarray], float | None],
    a: np.ndarray,
    b: np.ndarray,
    *,
    seed: int,
    undefined: str,
) -> Figure:
    n = len(a)
    if n < MIN_ROWS:
        return Figure(None, None, n, f"{n} comparable rows, under {MIN_ROWS}")
    value = stat(a, b)
    if value is None:
        return Figure(None, None, n, undefined)

    def statistic(x: np.ndarray, y: np.ndarray) -> float:
        v = stat(x, y)
        return float("nan") if v is None else v

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample with one value throughout: nan, left out
        res = stats.bootstrap(
            (a, b),
            statistic,
            paired=True,
            vectorized=False,
            n_resamples=RESAMPLES,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(lo) or math.isnan(hi):
        return Figure(value, None, n, "resamples where it is undefined: no CI")
    return Figure(value, (lo, hi), n)


@dataclass(slots=True)
class Agreement:
    """The model against one rater over the labelled rows."""

    n: int
    """Rows with both scores."""
    labelled: int
    """Rows with a person's score."""
    scale: tuple[int, int]
    figures: dict[str, Figure] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    """Rows: the person's score (lo..hi); columns: the model's."""
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    """(id, human, model, p), largest difference first."""
    missing_model: list[str] = field(default_factory=list)
    """Labelled ids the model has no score for (not run, failed, unparsed)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "labelled": self.labelled,
            "scale": list(self.scale),
            "figures": {k: f.to_dict() for k, f in self.figures.items()},
            "confusion": self.confusion,
            "disagreements": self.disagreements,
            "missing_model": self.missing_model,
        }


FIGURES = {
    "exact": "exact agreement",
    "within_1": "within ±1",
    "mae": "mean absolute error",
    "kappa_quadratic": "Cohen's κ (quadratic weights)",
    "spearman": "Spearman ρ",
    "kendall": "Kendall τ",
    "spearman_expected": "Spearman ρ of the expected score",
    "kendall_expected": "Kendall τ of the expected score",
}
"""Each figure's name in the report → what it is."""


def agree(pairs: Sequence[Pair], *, scale: tuple[int, int] = (1, 10), seed: int = 0) -> Agreement:
    """The model's scores against the person's (see the module doc)."""
    lo, hi = scale
    labelled = [p for p in pairs if p.human is not None]
    for p in labelled:
        for who, v in (("human", p.human), ("model", p.model)):
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"{p.id}: the {who} score {v} is outside the scale {lo}-{hi}")
    both = [p for p in labelled if p.model is not None]
    h = np.array([p.human for p in both], dtype=np.int64)
    m = np.array([p.model for p in both], dtype=np.int64)
    out = Agreement(len(both), len(labelled), scale)
    out.missing_model = [p.id for p in labelled if p.model is None]

    def kappa(a: np.ndarray, b: np.ndarray) -> float | None:
        return quadratic_kappa(a.tolist(), b.tolist(), scale)

    constant = "every score the same on one side: undefined"
    out.figures["exact"] = _figure(_exact, h, m, seed=seed, undefined="")
    out.figures["within_1"] = _figure(_within1, h, m, seed=seed, undefined="")
    out.figures["mae"] = _figure(_mae, h, m, seed=seed, undefined="")
    out.figures["kappa_quadratic"] = _figure(kappa, h, m, seed=seed, undefined=constant)
    out.figures["spearman"] = _figure(_rank("spearman"), h, m, seed=seed, undefined=constant)
    out.figures["kendall"] = _figure(_rank("kendall"), h, m, seed=seed, undefined=constant)
    with_e = [p for p in both if p.expected is not None]
    if with_e:
        he = np.array([p.human for p in with_e], dtype=np.float64)
        e = np.array([p.expected for p in with_e], dtype=np.float64)
        for name, kind in (("spearman_expected", "spearman"), ("kendall_expected", "kendall")):
            out.figures[name] = _figure(_rank(kind), he, e, seed=seed, undefined=constant)
    k = hi - lo + 1
    grid = np.zeros((k, k), dtype=np.int64)
    for a, b in zip(h, m, strict=True):
        grid[a - lo, b - lo] += 1
    out.confusion = grid.tolist()
    out.disagreements = [
        {"id": p.id, "human": p.human, "model": p.model, "p": p.p}
        for p in sorted(both, key=lambda p: -abs((p.human or 0) - (p.model or 0)))
        if p.human != p.model
    ]
    return out


def raters(
    columns: Sequence[tuple[str, Sequence[int | None]]],
    *,
    scale: tuple[int, int] = (1, 10),
    seed: int = 0,
) -> dict[str, Figure]:
    """Each pair of raters' quadratic κ with its CI, over the rows both scored: `"a~b"`."""
    out: dict[str, Figure] = {}
    for i, (name_a, a) in enumerate(columns):
        for name_b, b in columns[i + 1 :]:
            both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
            x = np.array([p[0] for p in both], dtype=np.int64)
            y = np.array([p[1] for p in both], dtype=np.int64)

            def kappa(u: np.ndarray, v: np.ndarray) -> float | None:
                return quadratic_kappa(u.tolist(), v.tolist(), scale)

            out[f"{name_a}~{name_b}"] = _figure(
                kappa, x, y, seed=seed, undefined="every score the same on one side: undefined"
            )
    return out


def labels_needed(figure: Figure, width: float) -> int | None:
    """Labelled rows for a 95% CI of `width` on this figure, from its CI at n (the width goes
    as 1/√n); None when the figure has no CI."""
    if figure.ci is None or width <= 0:
        return None
    now = figure.ci[1] - figure.ci[0]
    if now <= 0:
        return figure.n
    return max(MIN_ROWS, math.ceil(figure.n * (now / width) ** 2))
