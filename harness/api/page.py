"""The page at `/`: every batch with its progress (rate, ETA, prefix-cache savings), and each
finished batch's throughput plot (the suites' `plot_throughput_over_run`).

One self-contained HTML document, inline CSS, no scripts and nothing external: while a batch is
open the page reloads itself every `REFRESH_S` seconds. Every value shown is HTML-escaped. Each
batch row carries `data-` attributes (`data-batch`, `data-status`, `data-done`, `data-total`,
`data-failed`, `data-savings`) so a test can read the progress from the DOM.

The savings are the cached prompt tokens ÷ the prompt tokens of the replies whose server
reported cached tokens, with where the figure came from (`server`, `llama.cpp timings`, ...)
and, when not every reply reported it, the share that did; "unknown" when none did (an
unreported figure is never counted as 0).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass

from harness.api.store import TERMINAL_STATUSES, BatchRow
from harness.engine.progress import format_duration

__all__ = ["REFRESH_S", "BatchView", "render_page"]

REFRESH_S = 5

_CSS = """
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 1.5rem auto; max-width: 80rem;
  padding: 0 1rem; color: #1b1f24; background: #fff; line-height: 1.4; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
p.meta { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.35rem 0.5rem; text-align: left;
  vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { width: 14rem; height: 0.9rem; background: #eaeef2; border-radius: 0.3rem;
  overflow: hidden; }
.bar > div { height: 100%; background: #2da44e; }
.bar > div.failed { background: #cf222e; }
.status { padding: 0.05rem 0.4rem; border-radius: 0.3rem; font-weight: bold;
  white-space: nowrap; }
.st-in_progress, .st-validating, .st-finalizing { color: #0550ae; background: #ddf4ff; }
.st-completed { color: #116329; background: #dafbe1; }
.st-failed, .st-expired { color: #82071e; background: #ffebe9; }
.st-cancelling, .st-cancelled { color: #6e5000; background: #fff8c5; }
code { font-size: 0.85rem; }
details summary { cursor: pointer; color: #57606a; }
img.plot { max-width: 100%; border: 1px solid #d0d7de; margin-top: 0.4rem; }
"""


@dataclass(frozen=True, slots=True)
class BatchView:
    """What the page shows of one batch."""

    row: BatchRow
    completed: int
    failed: int
    rate_rps: float | None = None
    """Requests per second: over the recent window while running, the mean once finished."""
    eta_s: float | None = None
    running: bool = False
    """True for the batch the worker is running now (the others in progress are queued)."""

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def savings(self) -> float | None:
        """Cached prompt tokens ÷ prompt tokens, over the completed requests whose server
        reported cached tokens; None when none did."""
        r = self.row
        return r.cached_tokens / r.cached_prompt_tokens if r.cached_prompt_tokens else None

    @property
    def cached_coverage(self) -> float | None:
        """Share of the completed requests whose server reported cached tokens."""
        return self.row.cached_known / self.completed if self.completed else None

    @property
    def cached_source(self) -> str:
        return self.row.cached_source or "unknown"

    def savings_text(self) -> str:
        coverage = self.cached_coverage
        if coverage is None:
            return "–"
        savings = self.savings
        if not self.row.cached_known or savings is None:
            return "unknown (not reported)"
        text = f"{savings:.1%} ({self.cached_source}"
        if coverage < 1:
            text += f"; {coverage:.0%} of replies reported it"
        return text + ")"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "–"


def _row_html(v: BatchView) -> str:
    r = v.row
    total = r.total
    pct = v.done / total if total else (1.0 if r.status in TERMINAL_STATUSES else 0.0)
    ok_w = 100.0 * v.completed / total if total else 0.0
    bad_w = 100.0 * v.failed / total if total else 0.0
    status = r.status
    if status == "in_progress" and not v.running:
        label = "in_progress (queued)" if v.done == 0 else "in_progress (waiting)"
    else:
        label = status
    rate = f"{v.rate_rps:.2f} req/s" if v.rate_rps is not None else "–"
    eta = format_duration(v.eta_s) if v.running else "–"
    savings = v.savings_text()
    if v.cached_coverage is None:
        savings_attr = ""
    elif v.row.cached_known and v.savings is not None:
        savings_attr = f"{v.savings:.6f}"
    else:
        savings_attr = "unknown"
    report = ""
    if status in TERMINAL_STATUSES and v.done:
        src = f"/batches/{r.id}/throughput.png"
        report = (
            f'<details><summary>throughput plot</summary><img class="plot" loading="lazy" '
            f'alt="throughput of {_e(r.id)}" src="{_e(src)}"></details>'
        )
    files = " ".join(
        f"{name}: <code>{_e(fid)}</code>"
        for name, fid in (("output", r.output_file_id), ("errors", r.error_file_id))
        if fid
    )
    errors = ""
    if r.errors:
        first = r.errors[0]
        at = f"line {first.get('line')}: " if first.get("line") else ""
        more = f" (+{len(r.errors) - 1} more)" if len(r.errors) > 1 else ""
        errors = f"<br><small>{_e(at)}{_e(first.get('message'))}{_e(more)}</small>"
    return (
        f'<tr data-batch="{_e(r.id)}" data-status="{_e(status)}" data-done="{v.done}" '
        f'data-total="{total}" data-failed="{v.failed}" data-savings="{_e(savings_attr)}">'
        f"<td><code>{_e(r.id)}</code><br><small>{_e(_when(r.created_at))}</small></td>"
        f'<td><span class="status st-{_e(status)}">{_e(label)}</span>{errors}</td>'
        f'<td><div class="bar" title="{pct:.1%}"><div style="width:{ok_w:.2f}%;float:left">'
        f'</div><div class="failed" style="width:{bad_w:.2f}%;float:left"></div></div>'
        f"<small>{v.done} / {total}{f' ({pct:.1%})' if total else ''}</small></td>"
        f'<td class="num">{v.failed}</td><td class="num">{_e(rate)}</td>'
        f'<td class="num">{_e(eta)}</td><td class="num">{_e(savings)}</td>'
        f"<td>{files}{report}</td></tr>"
    )


def render_page(batches: Sequence[BatchView], *, server: str = "", access: str = "") -> str:
    """The whole page (newest batch first, as given); `access`: how programs reach the service
    (and whether it needs its key), shown under the table."""
    open_ = any(v.row.status not in TERMINAL_STATUSES for v in batches)
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if open_ else ""
    rows = "".join(_row_html(v) for v in batches) or (
        '<tr><td colspan="8">No batches yet: upload a file with purpose "batch" and create '
        "one (POST /v1/files, POST /v1/batches).</td></tr>"
    )
    running = sum(1 for v in batches if v.running)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>harness api: batches</title>{refresh}<style>{_CSS}</style></head>"
        f'<body data-batches="{len(batches)}" data-running="{running}">'
        "<h1>harness api: batches</h1>"
        f'<p class="meta">{_e(server)} · updated {_e(_when(int(time.time())))}'
        f"{f' · reloads every {REFRESH_S} s' if open_ else ''}</p>"
        "<table><thead><tr><th>batch</th><th>status</th><th>progress</th><th>failed</th>"
        "<th>rate</th><th>ETA</th><th>savings</th><th>files</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        + (f'<p class="meta access">{_e(access)}</p>' if access else "")
        + "</body></html>"
    )
