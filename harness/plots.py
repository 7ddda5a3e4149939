"""PNG plots of the harness's reports: memory against context, throughput over a run, prefix-cache
token savings, and roofline efficiency.

Every function takes plain data (the small dataclasses below, dicts or lists of numbers, never
engine objects) and a target path, and returns the path written. Inputs are forgiving: `None`
values are skipped, an empty input gives a figure that says "no data", and one point is drawn
without a fit. PNGs are written atomically (a temporary file in the same directory, then
`os.replace`), so a report page never links half a file.

Figures are built with `matplotlib.figure.Figure` and its Agg canvas, not through pyplot: nothing
is registered in pyplot's global figure list, so nothing leaks and plotting is safe from worker
threads. Importing this module selects the Agg backend only when pyplot has not been imported yet
(switching backends under a live pyplot would close the caller's figures).
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.fileio import atomic_write_bytes
from harness.metrics import linear_fit

__all__ = [
    "BreakdownRow",
    "EfficiencyRow",
    "MemoryPoint",
    "SavingsRow",
    "plot_breakdown",
    "plot_efficiency",
    "plot_memory_vs_context",
    "plot_savings_by_strategy",
    "plot_throughput_over_run",
]

MIB = 1024 * 1024
DPI = 100
NO_DATA = "no data"
_MAX_SCATTER_POINTS = 20_000
"""Latency points drawn at most; longer runs are thinned evenly (the median uses them all)."""


@dataclass(frozen=True, slots=True)
class MemoryPoint:
    """One memory measurement at a context size."""

    n_ctx: float | None
    """Context size in tokens."""
    bytes: float | None
    """Measured memory in bytes; None when the measurement failed (the point is skipped)."""


@dataclass(frozen=True, slots=True)
class SavingsRow:
    """Token savings of one cache strategy or prompt variant; both fractions in 0–1."""

    name: str
    savings: float | None
    theoretical_max: float | None = None


@dataclass(frozen=True, slots=True)
class EfficiencyRow:
    """Roofline efficiency of one variant.

    `efficiency` wins when given; otherwise it is `bound_s / measured_s`.
    """

    name: str
    bound_s: float | None = None
    """Lower bound on the run time from the roofline model, in seconds."""
    measured_s: float | None = None
    """Measured run time, in seconds."""
    throughput_rps: float | None = None
    efficiency: float | None = None


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """`value` as a finite float, or None (None, NaN, inf, bools and non-numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


def _new_figure(width: float = 8.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _no_data(ax: Axes, text: str = NO_DATA) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=16,
        color="0.4",
    )


def _legend(ax: Axes) -> None:
    """A legend, only when something has a label (matplotlib warns otherwise)."""
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        ax.legend(handles, labels, loc="best", fontsize="small")


def _save(fig: Figure, path: str | Path) -> Path:
    """Render `fig` to `path` as PNG atomically; the figure is cleared afterwards."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


def _expand_range(lo: float, hi: float) -> tuple[float, float]:
    """A non-degenerate axis range around [lo, hi]."""
    if hi > lo:
        pad = (hi - lo) * 0.05
        return lo - pad, hi + pad
    if lo > 0:
        return 0.0, lo * 1.1
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


# ---------------------------------------------------------------------------------------------
# 1. Memory against context size
# ---------------------------------------------------------------------------------------------


def _memory_xy(
    points: Sequence[MemoryPoint | Mapping[str, Any] | Sequence[Any]],
) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for pt in points:
        if isinstance(pt, MemoryPoint):
            x, y = _num(pt.n_ctx), _num(pt.bytes)
        elif isinstance(pt, Mapping):
            x = _num(_first(pt, "n_ctx", "context", "context_tokens"))
            y = _num(_first(pt, "bytes", "used_bytes", "memory_bytes", "measured_bytes"))
        elif isinstance(pt, Sequence) and not isinstance(pt, str | bytes) and len(pt) >= 2:
            x, y = _num(pt[0]), _num(pt[1])
        else:
            continue
        if x is not None and y is not None:
            out.append((x, y))
    out.sort()
    return out


def plot_memory_vs_context(
    points: Sequence[MemoryPoint | Mapping[str, Any] | Sequence[Any]],
    theory_bytes_per_token: float | None,
    base_bytes: float | None,
    path: str | Path,
    *,
    budget_bytes: float | None = None,
    max_context: float | None = None,
    title: str = "Memory against context size",
) -> Path:
    """Measured memory (MiB) against `n_ctx`, with its least-squares line and the theory line.

    `points` are `MemoryPoint`s, `(n_ctx, bytes)` pairs or dicts with `n_ctx` and `bytes` (or
    `used_bytes` / `memory_bytes`). The theory line is `base_bytes + theory_bytes_per_token ×
    n_ctx`; it is drawn when both are given. `budget_bytes` adds a horizontal line (the memory
    budget), `max_context` a vertical one (the largest context that fits). The fitted slope, in
    bytes per token, is in the legend.
    """
    xy = _memory_xy(points)
    theory = _num(theory_bytes_per_token)
    base = _num(base_bytes)
    budget = _num(budget_bytes)
    max_ctx = _num(max_context)

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("context size n_ctx (tokens)")
    ax.set_ylabel("memory (MiB)")
    ax.grid(True, alpha=0.3)

    xs_all = [x for x, _ in xy] + ([max_ctx] if max_ctx is not None else [])
    if xy:
        xs = [x for x, _ in xy]
        ys = [y / MIB for _, y in xy]
        ax.scatter(
            xs,
            ys,
            color="tab:blue",
            zorder=3,
            label=f"measured ({len(xy)} point{'s' if len(xy) != 1 else ''})",
        )
        try:
            slope, intercept, r2 = linear_fit(xs, [y for _, y in xy])
        except ValueError:
            pass  # one point, or every point at the same n_ctx: no line
        else:
            lo, hi = min(xs_all), max(xs_all)
            ax.plot(
                [lo, hi],
                [(intercept + slope * lo) / MIB, (intercept + slope * hi) / MIB],
                color="tab:blue",
                linestyle="-",
                label=f"fit: {slope:,.0f} B/token + {intercept / MIB:,.1f} MiB (r² = {r2:.3f})",
            )
    else:
        _no_data(ax)

    if theory is not None and base is not None and xs_all:
        lo = min(0.0, *xs_all) if xy else 0.0
        hi = max(xs_all)
        if hi > lo:
            ax.plot(
                [lo, hi],
                [(base + theory * lo) / MIB, (base + theory * hi) / MIB],
                color="tab:orange",
                linestyle="--",
                label=f"theory: {base / MIB:,.1f} MiB + {theory:,.0f} B/token × n_ctx",
            )
    if budget is not None:
        ax.axhline(
            budget / MIB, color="tab:red", linestyle=":", label=f"budget {budget / MIB:,.0f} MiB"
        )
    if max_ctx is not None:
        ax.axvline(
            max_ctx, color="tab:green", linestyle="-.", label=f"max context {max_ctx:,.0f} tokens"
        )
    if len(xs_all) == 1 or (xs_all and min(xs_all) == max(xs_all)):
        ax.set_xlim(*_expand_range(xs_all[0], xs_all[0]))
    _legend(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 2. Throughput and latency over a run
# ---------------------------------------------------------------------------------------------


def _rolling_median(values: Sequence[float], k: int) -> list[float]:
    """Centred rolling median over `k` values (shrinking at the ends)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    n = len(arr)
    if n == 0:
        return []
    k = max(1, min(k, n))
    half = k // 2
    windows = np.lib.stride_tricks.sliding_window_view(arr, k)
    mid = [float(v) for v in np.median(windows, axis=1)]  # indices half .. n - 1 - (k - 1 - half)
    head = [float(np.median(arr[: i + half + 1])) for i in range(half)]
    tail = [float(np.median(arr[i - half :])) for i in range(half + len(mid), n)]
    return head + mid + tail


def plot_throughput_over_run(
    finish_times_s: Sequence[float | None],
    latencies_ms: Sequence[float | None],
    path: str | Path,
    *,
    window_s: float | None = None,
    start_s: float = 0.0,
    title: str = "Throughput and latency over the run",
    window_requests: int | None = None,
    roofline_rps: float | None = None,
) -> Path:
    """Rolling throughput (req/s) above per-request latency (ms), sharing a time axis.

    `finish_times_s[i]` is when request i finished, in seconds since the run started (pass
    `start_s` to subtract an absolute start time); `latencies_ms[i]` its latency, or None for a
    failed request (counted in the throughput, not drawn in the latency panel). Both sequences
    have one entry per request. The throughput at time t counts completions in the `window_s`
    seconds up to t (a twentieth of the run when None); the latency panel draws each request and
    a rolling median.
    """
    if len(finish_times_s) != len(latencies_ms):
        raise ValueError(
            f"finish_times_s ({len(finish_times_s)}) and latencies_ms ({len(latencies_ms)}) "
            "must have one entry per request"
        )
    import numpy as np

    pairs: list[tuple[float, float | None]] = []
    for t, lat in zip(finish_times_s, latencies_ms, strict=True):
        tt = _num(t)
        if tt is not None:
            pairs.append((tt - start_s, _num(lat)))
    pairs.sort(key=lambda p: p[0])
    times = np.asarray([t for t, _ in pairs], dtype=float)

    fig = _new_figure(9.0, 6.5)
    ax_rps, ax_lat = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title)
    ax_rps.set_ylabel("throughput (req/s)")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("time since start (s)")
    for ax in (ax_rps, ax_lat):
        ax.grid(True, alpha=0.3)

    if len(times) == 0:
        _no_data(ax_rps)
        _no_data(ax_lat)
        return _save(fig, path)

    t_lo = min(0.0, float(times[0]))
    t_hi = float(times[-1])
    span = t_hi - t_lo
    window = _num(window_s)
    if window is None or window <= 0:
        window = span / 20 if span > 0 else 1.0
    if span > 0 and window_requests and len(times) > window_requests:
        # Windows of requests, not of seconds: k completions over the time they took, so a
        # slow run (2 req/s) draws no spikes of 0 and 2x the mean.
        k = int(window_requests)
        rates = k / np.maximum(times[k:] - times[:-k], 1e-9)
        ax_rps.plot(times[k:], rates, color="tab:blue", label=f"over the last {k} requests")
        median = float(np.median(rates))
        ax_rps.axhline(median, color="tab:gray", linestyle="--", label=f"median {median:.3g} req/s")
        if roofline_rps:
            ax_rps.axhline(
                roofline_rps, color="tab:red", linestyle=":", label=f"roofline {roofline_rps:.3g}"
            )
        ax_rps.set_ylim(bottom=0)
        _legend(ax_rps)
    elif span > 0:
        # Full windows only, once the run is longer than one: a partial window at the start
        # divides a few completions by a tiny span and draws a spike.
        first = t_lo + window if span > window else t_lo + span / 400
        grid = np.linspace(first, t_hi, 400)
        counts = np.searchsorted(times, grid, side="right") - np.searchsorted(
            times, grid - window, side="right"
        )
        denom = np.minimum(grid - t_lo, window)
        rps = counts / denom
        ax_rps.plot(grid, rps, color="tab:blue", label=f"rolling, {window:.3g} s window")
        mean_rps = len(times) / span
        ax_rps.axhline(
            mean_rps, color="tab:gray", linestyle="--", label=f"mean {mean_rps:.3g} req/s"
        )
        ax_rps.set_ylim(bottom=0)
        _legend(ax_rps)
    else:
        _no_data(ax_rps, f"{len(times)} request(s) at t = {t_hi:.3g} s: no rate")

    lat_pairs = [(t, lat) for t, lat in pairs if lat is not None]
    if lat_pairs:
        lt = [t for t, _ in lat_pairs]
        lv = [lat for _, lat in lat_pairs]
        stride = max(1, math.ceil(len(lt) / _MAX_SCATTER_POINTS))
        ax_lat.scatter(
            lt[::stride],
            lv[::stride],
            s=6 if len(lt) > 1000 else 16,
            alpha=0.35 if len(lt) > 1000 else 0.7,
            color="tab:purple",
            linewidths=0,
            label="per request" + (f" (every {stride}th)" if stride > 1 else ""),
        )
        if len(lv) >= 3:
            k = max(3, (len(lv) // 20) | 1)
            ax_lat.plot(
                lt, _rolling_median(lv, k), color="black", label=f"rolling median ({k} requests)"
            )
        _legend(ax_lat)
    else:
        _no_data(ax_lat, "no latencies")
    if span <= 0:
        ax_lat.set_xlim(*_expand_range(t_hi, t_hi))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 3. Token savings by strategy
# ---------------------------------------------------------------------------------------------


def _savings_rows(rows: Sequence[SavingsRow | Mapping[str, Any]]) -> list[SavingsRow]:
    out: list[SavingsRow] = []
    for i, row in enumerate(rows):
        if isinstance(row, SavingsRow):
            out.append(row)
        elif isinstance(row, Mapping):
            name = _first(row, "name", "strategy", "variant")
            out.append(
                SavingsRow(
                    name=str(name) if name is not None else f"#{i + 1}",
                    savings=_num(_first(row, "token_savings", "savings", "measured")),
                    theoretical_max=_num(
                        _first(row, "token_savings_theoretical_max", "theoretical_max", "max")
                    ),
                )
            )
    return out


def _annotate(ax: Axes, x: float, value: float | None, text: str) -> None:
    """Write `text` just above the bar at `x` (at the axis for a missing value)."""
    y = value if value is not None else 0.0
    ax.annotate(
        text,
        (x, y),
        xytext=(0, 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize="small",
        color="black" if value is not None else "0.5",
        clip_on=False,
    )


def plot_savings_by_strategy(
    rows: Sequence[SavingsRow | Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "Prefix-cache token savings by strategy",
) -> Path:
    """Grouped bars per strategy/variant: measured token savings and the theoretical maximum.

    `rows` are `SavingsRow`s or dicts with `name` (or `strategy` / `variant`), `token_savings`
    (or `savings`) and `token_savings_theoretical_max` (or `theoretical_max`), fractions in 0–1,
    drawn as percentages with their values written on the bars; a missing value reads "n/a".
    """
    data = _savings_rows(rows)
    fig = _new_figure(max(6.0, 1.4 * len(data) + 3.0), 5.0)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_ylabel("prompt tokens served from cache (%)")
    ax.grid(True, axis="y", alpha=0.3)
    if not data:
        ax.set_xticks([])
        ax.set_ylim(0, 100)
        _no_data(ax)
        return _save(fig, path)

    width = 0.38
    values = [v for r in data for v in (r.savings, r.theoretical_max) if v is not None]
    top = max([100.0, *(v * 100 for v in values)]) * 1.12
    labels: list[str] = []
    for i, row in enumerate(data):
        for offset, value, color, label in (
            (-width / 2, row.savings, "tab:blue", "measured"),
            (width / 2, row.theoretical_max, "tab:gray", "theoretical maximum"),
        ):
            x = i + offset
            pct = value * 100 if value is not None else None
            ax.bar(
                x,
                pct if pct is not None else 0.0,
                width,
                color=color,
                label=label if i == 0 else None,
            )
            _annotate(ax, x, pct, f"{pct:.1f}%" if pct is not None else "n/a")
        label = row.name
        if row.savings is not None and row.theoretical_max:
            label += f"\n(efficiency {row.savings / row.theoretical_max:.0%})"
        labels.append(label)
    ax.set_xticks(range(len(data)), labels, fontsize="small")
    ax.set_ylim(0, top)
    ax.set_xlim(-0.6, len(data) - 0.4)
    _legend(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 4. Roofline efficiency
# ---------------------------------------------------------------------------------------------


def _efficiency_rows(rows: Sequence[EfficiencyRow | Mapping[str, Any]]) -> list[EfficiencyRow]:
    out: list[EfficiencyRow] = []
    for i, row in enumerate(rows):
        if isinstance(row, EfficiencyRow):
            out.append(row)
        elif isinstance(row, Mapping):
            name = _first(row, "name", "variant", "strategy")
            out.append(
                EfficiencyRow(
                    name=str(name) if name is not None else f"#{i + 1}",
                    bound_s=_num(_first(row, "bound_s", "roofline_s", "roofline_bound_s")),
                    measured_s=_num(_first(row, "measured_s", "elapsed_s")),
                    throughput_rps=_num(_first(row, "throughput_rps", "rps")),
                    efficiency=_num(row.get("efficiency")),
                )
            )
    return out


def _efficiency_of(row: EfficiencyRow) -> float | None:
    eff = _num(row.efficiency)
    if eff is not None:
        return eff
    bound, measured = _num(row.bound_s), _num(row.measured_s)
    if bound is None or measured is None or measured <= 0:
        return None
    return bound / measured


def plot_efficiency(
    rows: Sequence[EfficiencyRow | Mapping[str, Any]],
    path: str | Path,
    *,
    target: float = 0.85,
    show_throughput: bool | None = None,
    title: str = "Roofline efficiency by variant",
) -> Path:
    """Bars per variant of efficiency = roofline bound ÷ measured time (1.0 = at the bound).

    `rows` are `EfficiencyRow`s or dicts with `name`, and `efficiency` or `bound_s` and
    `measured_s` (or `elapsed_s`), optionally `throughput_rps`. Reference lines at 1.0 and at
    `target`; bars at or above the target are green, others orange. `show_throughput` adds a
    second panel of req/s (default: when any row has a throughput).
    """
    data = _efficiency_rows(rows)
    effs = [_efficiency_of(r) for r in data]
    rps = [_num(r.throughput_rps) for r in data]
    if show_throughput is None:
        show_throughput = any(v is not None for v in rps)
    width = max(6.0, 1.1 * len(data) + 3.0)
    fig = _new_figure(width, 7.5 if show_throughput else 5.0)
    axes = fig.subplots(2, 1, sharex=True) if show_throughput else [fig.add_subplot()]
    ax = axes[0]
    ax.set_title(title)
    ax.set_ylabel("efficiency (bound ÷ measured)")
    ax.grid(True, axis="y", alpha=0.3)
    names = [r.name for r in data]

    if not data:
        for a in axes:
            a.set_xticks([])
            _no_data(a)
        return _save(fig, path)

    known = [e for e in effs if e is not None]
    top = max([1.0, target, *known]) * 1.15
    for i, eff in enumerate(effs):
        color = "tab:green" if eff is not None and eff >= target else "tab:orange"
        ax.bar(i, eff if eff is not None else 0.0, 0.6, color=color)
        _annotate(ax, i, eff, f"{eff:.2f}" if eff is not None else "n/a")
    ax.axhline(1.0, color="black", linestyle="-", linewidth=1, label="roofline bound (1.0)")
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_ylim(0, top)
    ax.set_xlim(-0.6, len(data) - 0.4)
    _legend(ax)

    if show_throughput:
        ax2 = axes[1]
        ax2.set_ylabel("throughput (req/s)")
        ax2.grid(True, axis="y", alpha=0.3)
        known_rps = [v for v in rps if v is not None]
        top2 = (max(known_rps) if known_rps else 1.0) * 1.15 or 1.0
        for i, v in enumerate(rps):
            ax2.bar(i, v if v is not None else 0.0, 0.6, color="tab:blue")
            _annotate(ax2, i, v, f"{v:.3g}" if v is not None else "n/a")
        ax2.set_ylim(0, top2)
    axes[-1].set_xticks(range(len(data)), names, fontsize="small")
    return _save(fig, path)


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    """Where one variant's request time went, in milliseconds per request."""

    label: str
    overhead_ms: float
    """Client-seen time the server did not spend on prompt or decode (HTTP, template,
    tokenization, scheduling, the engine)."""
    prefill_ms: float
    decode_ms: float


def plot_breakdown(rows: Sequence[BreakdownRow], path: str | Path, *, title: str = "") -> Path:
    """A stacked bar per variant: overhead, prefill and decode time per request."""
    fig = _new_figure(8.0, 4.5)
    ax = fig.subplots()
    ax.set_title(title or "Time per request, by where it went")
    ax.set_ylabel("ms per request (mean)")
    if not rows:
        _no_data(ax)
        return _save(fig, path)
    xs = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for attr, color, label in (
        ("prefill_ms", "tab:blue", "prefill (server)"),
        ("decode_ms", "tab:green", "decode (server)"),
        ("overhead_ms", "tab:orange", "neither: template, tokenizing, HTTP, engine"),
    ):
        values = [max(0.0, float(getattr(r, attr))) for r in rows]
        ax.bar(xs, values, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(xs, [r.label for r in rows], rotation=15, ha="right")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax)
    return _save(fig, path)
