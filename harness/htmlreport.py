"""A self-contained HTML index of a reports directory: every JSON report and PNG plot in it.

`build_index(report_dir)` writes `report_dir/index.html`: one page with inline CSS, no scripts
and no external resources (it must open on a machine without internet), holding

- a summary table with one row per JSON report: its headline figures (throughput, token
  savings, error rate, KV bytes per token, context limits, …), its pass/fail criteria in colour,
  when and on what machine it was generated, and a link to the raw file;
- every PNG shown inline with its path as caption;
- a list of every file, linked by relative path.

Unreadable or malformed JSON files are listed as such, never fatal. Every piece of text from the
reports is HTML-escaped. Files are visited in sorted order and nothing time-dependent is written,
so the same directory gives the same page byte for byte.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness.fileio import atomic_write_text
from harness.verdict import Verdict

__all__ = ["HEADLINE_KEYS", "INDEX_NAME", "build_index"]

INDEX_NAME = "index.html"
MAX_JSON_BYTES = 20 * 1024 * 1024
"""JSON files larger than this are linked but not parsed for the summary."""

HEADLINE_KEYS: tuple[str, ...] = (
    "requests",
    "elapsed_s",
    "throughput_rps",
    "error_rate",
    "token_savings",
    "token_savings_theoretical_max",
    "savings_efficiency",
    "efficiency",
    "kv_bytes_per_token",
    "max_context_tokens",
    "safe_context_tokens",
    "latency_ms",
)
"""Keys shown in the summary table when a report has them (at top level or one level down)."""

_PERCENT_KEYS = frozenset(
    {"error_rate", "token_savings", "token_savings_theoretical_max", "savings_efficiency"}
)
_NESTED_SKIP = frozenset({"machine_info", "criteria"})

_CSS = """
:root { color-scheme: light; }
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem;
  padding: 0 1rem; color: #1b1f24; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem;
  margin-top: 2rem; }
p.meta { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.5rem; text-align: left;
  vertical-align: top; }
th { background: #f6f8fa; }
table.criteria { width: auto; margin: 0.2rem 0; font-size: 0.85rem; }
dl.fields { display: grid; grid-template-columns: max-content auto; gap: 0 0.8rem; margin: 0; }
dl.fields dt { color: #57606a; }
dl.fields dd { margin: 0; font-variant-numeric: tabular-nums; }
.pass { color: #116329; background: #dafbe1; font-weight: bold; }
.fail { color: #82071e; background: #ffebe9; font-weight: bold; }
.na { color: #57606a; background: #f6f8fa; }
.what { color: #57606a; font-size: 0.9em; margin-top: 0.2em; }
.badge { padding: 0.05rem 0.4rem; border-radius: 0.3rem; white-space: nowrap; }
.unreadable { color: #82071e; }
code { font-size: 0.85rem; }
details summary { cursor: pointer; color: #57606a; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9rem; }
ul.files { font-size: 0.9rem; }
"""

_CHECK_IMAGES_JS = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.dataset.imagesOk = String(ok.length);
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesBroken = broken.map(function (i) {
    return i.getAttribute("src");
  }).join(" ");
});
"""


@dataclass(slots=True)
class _JsonReport:
    rel: str
    size: int
    data: Any = None
    error: str | None = None
    fields: list[tuple[str, str]] = field(default_factory=list)
    criteria: list[dict[str, Any]] = field(default_factory=list)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(rel: str) -> str:
    """A relative URL for a POSIX relative path, percent-encoded, then attribute-escaped."""
    return _esc(quote(rel, safe="/"))


def _list_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Sorted JSON and PNG files under `root`, skipping hidden files and folders."""
    jsons: list[Path] = []
    pngs: list[Path] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix == ".json":
            jsons.append(p)
        elif suffix == ".png":
            pngs.append(p)
    return jsons, pngs


def _fmt_number(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key in _PERCENT_KEYS:
        return f"{value * 100:.1f}%"
    if key == "efficiency":
        return f"{value:.3f}"
    if key == "throughput_rps":
        return f"{value:,.3f} req/s"
    if key == "elapsed_s":
        return f"{value:,.1f} s"
    if key == "kv_bytes_per_token":
        return f"{value:,.0f} B/token"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4g}"


def _fmt_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, Mapping):
        parts = [f"{k} {_fmt_number(key, v)}" for k, v in value.items() if v is not None]
        return ", ".join(parts) if parts else "n/a"
    if isinstance(value, list):
        return ", ".join(_fmt_number(key, v) for v in value)
    return _fmt_number(key, value)


def _headline_fields(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) for each headline key at top level, then one level down."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key in HEADLINE_KEYS:
        if key in data:
            out.append((key, _fmt_value(key, data[key])))
            seen.add(key)
    for outer in sorted(k for k, v in data.items() if isinstance(v, Mapping)):
        if outer in _NESTED_SKIP:
            continue
        inner = data[outer]
        for key in HEADLINE_KEYS:
            if key in inner and key not in seen:
                out.append((f"{outer}.{key}", _fmt_value(key, inner[key])))
                seen.add(key)
    return out


def _find_criteria(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `criteria` list at top level, or else in the first nested dict that has one."""
    candidates: list[Any] = [data.get("criteria")]
    candidates += [data[k].get("criteria") for k in sorted(data) if isinstance(data[k], Mapping)]
    for crit in candidates:
        if isinstance(crit, list):
            return [c if isinstance(c, dict) else {"metric": c} for c in crit]
    return []


def _read_report(path: Path, rel: str) -> _JsonReport:
    try:
        size = path.stat().st_size
    except OSError as exc:
        return _JsonReport(rel, 0, error=f"cannot stat: {exc.strerror or exc}")
    report = _JsonReport(rel, size)
    if size > MAX_JSON_BYTES:
        report.error = f"too large to summarise ({size:,} bytes)"
        return report
    try:
        report.data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        report.error = f"unreadable: {exc.strerror or exc}"
        return report
    except UnicodeDecodeError as exc:
        report.error = f"unreadable: not UTF-8 ({exc.reason} at byte {exc.start})"
        return report
    except json.JSONDecodeError as exc:
        report.error = f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        return report
    except (ValueError, RecursionError) as exc:
        report.error = f"malformed JSON: {exc}"
        return report
    if isinstance(report.data, Mapping):
        report.fields = _headline_fields(report.data)
        report.criteria = _find_criteria(report.data)
    return report


def _badge(passed: Any) -> str:
    if passed is True:
        return '<span class="badge pass">PASS</span>'
    if passed is False:
        return '<span class="badge fail">FAIL</span>'
    return '<span class="badge na">n/a</span>'


def _criteria_html(criteria: list[dict[str, Any]]) -> str:
    rows = []
    for c in criteria:
        passed = c.get("passed")
        metric = str(c.get("metric", "?"))
        cls = "pass" if passed is True else "fail" if passed is False else "na"
        rows.append(
            f'<tr class="criterion {cls}">'
            f"<td>{_esc(metric)}</td>"
            f"<td><code>{_esc(c.get('op', ''))} {_esc(_fmt_value(metric, c.get('threshold')))}"
            "</code></td>"
            f"<td>{_esc(_fmt_value(metric, c.get('value')))}</td>"
            f"<td>{_badge(passed)}</td></tr>"
        )
    return (
        '<table class="criteria"><tr><th>criterion</th><th>needs</th><th>value</th>'
        "<th>result</th></tr>" + "".join(rows) + "</table>"
    )


def _overall(criteria: list[dict[str, Any]]) -> Any:
    results = [c.get("passed") for c in criteria]
    if any(r is False for r in results):
        return False
    if results and all(r is True for r in results):
        return True
    return None


def _machine_html(info: Any) -> str:
    if info is None:
        return ""
    if isinstance(info, Mapping):
        items = "".join(
            f"<dt>{_esc(k)}</dt><dd>{_esc(json.dumps(v) if isinstance(v, dict | list) else v)}</dd>"
            for k, v in info.items()
        )
        body = f'<dl class="fields">{items}</dl>'
    else:
        body = f"<code>{_esc(info)}</code>"
    return f"<details><summary>machine</summary>{body}</details>"


def _what(data: Mapping[str, Any]) -> str:
    """What a report measured: its model, on which backend, under which profile."""
    backend = data.get("backend") if isinstance(data.get("backend"), Mapping) else {}
    model = data.get("model") or (backend or {}).get("model")
    parts = []
    if model:
        on = (backend or {}).get("name")
        parts.append(f"{model} on {on}" if on else str(model))
    if data.get("profile"):
        parts.append(f"profile {data['profile']}")
    return f'<div class="what">{_esc(" · ".join(parts))}</div>' if parts else ""


def _summary_row(rep: _JsonReport) -> str:
    link = f'<a href="{_href(rep.rel)}"><code>{_esc(rep.rel)}</code></a>'
    if rep.error is not None:
        return (
            f'<tr class="report unreadable"><td>{link}</td><td>{_badge(None)}</td>'
            f'<td colspan="3" class="unreadable">{_esc(rep.error)}</td></tr>'
        )
    data = rep.data
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        return (
            f'<tr class="report"><td>{link}</td><td>{_badge(None)}</td>'
            f'<td colspan="3" class="na">not a JSON object ({_esc(kind)})</td></tr>'
        )
    fields = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rep.fields)
    fields_html = f'<dl class="fields">{fields}</dl>' if fields else '<span class="na">—</span>'
    crit_html = _criteria_html(rep.criteria) if rep.criteria else '<span class="na">—</span>'
    when = data.get("generated_at")
    origin = (f"<div>{_esc(when)}</div>" if when is not None else "") + _machine_html(
        data.get("machine_info")
    )
    return (
        f'<tr class="report"><td>{link}{_what(data)}</td>'
        f"<td>{_badge(_overall(rep.criteria))}</td>"
        f"<td>{fields_html}</td><td>{crit_html}</td><td>{origin or '—'}</td></tr>"
    )


def _figures(pngs: Iterable[str]) -> str:
    parts = []
    for rel in pngs:
        stem = Path(rel).stem.replace("_", " ").replace("-", " ")
        parts.append(
            f'<figure><a href="{_href(rel)}"><img src="{_href(rel)}" alt="{_esc(stem)}"></a>'
            f"<figcaption><code>{_esc(rel)}</code></figcaption></figure>"
        )
    return "\n".join(parts) if parts else '<p class="na">No plots.</p>'


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _verdict_html(v: Verdict | None) -> str:
    if v is None:
        return ""
    cls = {"GO": "pass", "NO-GO": "fail"}.get(v.decision, "na")

    def items(title: str, lines: list[str]) -> str:
        if not lines:
            return ""
        lis = "".join(f"<li>{_esc(x)}</li>" for x in lines)
        return f"<h3>{_esc(title)}</h3><ul>{lis}</ul>"

    return (
        f'<h2 id="verdict">Verdict: <span class="badge {cls}">{_esc(v.decision)}</span></h2>'
        + items("Why", v.reasons)
        + items("Settings to run with (harness.yaml)", v.settings)
        + items("Projection", v.projection)
        + items("Not measured", v.not_measured)
    )


def build_index(
    report_dir: str | Path,
    *,
    title: str = "LLM batch harness report",
    check_images: bool = False,
    verdict: Verdict | None = None,
) -> Path:
    """Write `report_dir/index.html` (atomically) and return its path.

    The page lists every `*.json` and `*.png` under `report_dir` (recursively, hidden files
    skipped) by relative link, shows the PNGs inline, and summarises each JSON report (see the
    module docstring). `check_images=True` adds a small inline script, for browser tests only,
    that sets `data-images-ok` / `data-images-total` / `data-images-broken` on `<body>` once
    the page has loaded. Raises `OutputError` when the page cannot be written, `NotADirectoryError`
    when `report_dir` is not a directory.
    """
    root = Path(report_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"report directory {root} does not exist or is not a directory")
    jsons, pngs = _list_files(root)
    json_rels = [p.relative_to(root).as_posix() for p in jsons]
    png_rels = [p.relative_to(root).as_posix() for p in pngs]
    # summary.json repeats the reports: it is linked, not a row of its own.
    reports = [
        _read_report(p, rel)
        for p, rel in zip(jsons, json_rels, strict=True)
        if rel != "summary.json"
    ]

    failed = sum(1 for r in reports if _overall(r.criteria) is False)
    unreadable = sum(1 for r in reports if r.error is not None)
    meta = (
        f"{len(jsons)} JSON report(s), {len(pngs)} plot(s)"
        + (f", <span class='badge fail'>{failed} with failed criteria</span>" if failed else "")
        + (f", <span class='unreadable'>{unreadable} unreadable</span>" if unreadable else "")
    )
    rows = "\n".join(_summary_row(r) for r in reports)
    summary = (
        '<table class="summary"><tr><th>report</th><th>result</th><th>headline figures</th>'
        f"<th>criteria</th><th>generated</th></tr>\n{rows}\n</table>"
        if reports
        else '<p class="na">No JSON reports.</p>'
    )
    files = []
    for p, rel in sorted(zip(jsons + pngs, json_rels + png_rels, strict=True), key=lambda t: t[1]):
        try:
            size = _human_size(p.stat().st_size)
        except OSError:
            size = "?"
        files.append(f'<li><a href="{_href(rel)}"><code>{_esc(rel)}</code></a> ({size})</li>')
    files_html = (
        f'<ul class="files">{"".join(files)}</ul>' if files else '<p class="na">No files.</p>'
    )
    script = f"<script>{_CHECK_IMAGES_JS}</script>\n" if check_images else ""

    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
{script}</head>
<body>
<h1>{_esc(title)}</h1>
<p class="meta">{meta}</p>
{_verdict_html(verdict)}
<h2 id="summary">Summary</h2>
{summary}
<h2 id="plots">Plots</h2>
{_figures(png_rels)}
<h2 id="files">Files</h2>
{files_html}
</body>
</html>
"""
    return atomic_write_text(root / INDEX_NAME, page)
