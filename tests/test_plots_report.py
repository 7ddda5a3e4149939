"""The report plots (harness.plots) and the HTML index (harness.htmlreport), without a browser."""

from __future__ import annotations

import json
import math
import stat
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from harness import htmlreport, plots
from harness.htmlreport import build_index
from harness.plots import (
    EfficiencyRow,
    MemoryPoint,
    SavingsRow,
    plot_efficiency,
    plot_memory_vs_context,
    plot_savings_by_strategy,
    plot_throughput_over_run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIB = 1024 * 1024


def assert_png(path: Path) -> None:
    """A real, non-trivial PNG: signature, over 1 KB, over 100 px each way, no temp file left."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"
    from matplotlib import image

    height, width = image.imread(str(path)).shape[:2]
    assert width > 100, width
    assert height > 100, height
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers


# --- data --------------------------------------------------------------------------------------


def memory_points() -> list[MemoryPoint]:
    base, per_token = 300 * MIB, 36_864
    return [
        MemoryPoint(n, base + per_token * n + (n % 7) * 1000) for n in (2048, 4096, 8192, 16384)
    ]


def run_columns(n: int = 500) -> tuple[list[float | None], list[float | None]]:
    finish = [i * 0.05 + (0.02 if i % 3 else 0.0) for i in range(n)]
    latency: list[float | None] = [
        None if i % 50 == 0 else 80.0 + 20 * math.sin(i / 10) for i in range(n)
    ]
    return list(finish), latency


# --- plots -------------------------------------------------------------------------------------


def test_memory_plot_writes_a_png(tmp_path: Path) -> None:
    out = plot_memory_vs_context(
        memory_points(),
        36_864,
        300 * MIB,
        tmp_path / "memory.png",
        budget_bytes=2048 * MIB,
        max_context=40_000,
        title="Memory <test>",
    )
    assert out == tmp_path / "memory.png"
    assert_png(out)


def test_memory_plot_accepts_pairs_dicts_and_skips_none(tmp_path: Path) -> None:
    points: list[Any] = [
        (1024, 400 * MIB),
        {"n_ctx": 2048, "bytes": 440 * MIB},
        {"n_ctx": 4096, "used_bytes": 520 * MIB},
        MemoryPoint(8192, None),
        (None, 5),
        {"n_ctx": 3000},
        (5000, float("nan")),
    ]
    assert_png(plot_memory_vs_context(points, 40_000, 360 * MIB, tmp_path / "m.png"))


@pytest.mark.parametrize(
    "points",
    [[], [MemoryPoint(4096, 500 * MIB)], [MemoryPoint(4096, 500 * MIB), (4096, 510 * MIB)]],
    ids=["empty", "one-point", "same-n_ctx"],
)
def test_memory_plot_edge_cases(tmp_path: Path, points: list[Any]) -> None:
    assert_png(plot_memory_vs_context(points, 36_864, 300 * MIB, tmp_path / "m.png"))
    assert_png(plot_memory_vs_context(points, None, None, tmp_path / "m2.png", max_context=8192))


def test_throughput_plot_writes_a_png(tmp_path: Path) -> None:
    finish, latency = run_columns()
    out = plot_throughput_over_run(finish, latency, tmp_path / "sub" / "run.png", window_s=2.0)
    assert out == tmp_path / "sub" / "run.png"
    assert_png(out)


def test_throughput_plot_absolute_times_and_auto_window(tmp_path: Path) -> None:
    finish, latency = run_columns()
    t0 = 1.7e9
    absolute = [t + t0 if t is not None else None for t in finish]
    assert_png(plot_throughput_over_run(absolute, latency, tmp_path / "r.png", start_s=t0))


@pytest.mark.parametrize(
    ("finish", "latency"),
    [
        ([], []),
        ([1.5], [120.0]),
        ([1.5], [None]),
        ([2.0, 2.0, 2.0], [10.0, 11.0, None]),
        ([None, 1.0, 3.0], [5.0, None, None]),
    ],
    ids=["empty", "one-point", "one-failed", "same-time", "nones"],
)
def test_throughput_plot_edge_cases(
    tmp_path: Path, finish: list[float | None], latency: list[float | None]
) -> None:
    assert_png(plot_throughput_over_run(finish, latency, tmp_path / "r.png"))


def test_throughput_plot_rejects_unpaired_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one entry per request"):
        plot_throughput_over_run([1.0, 2.0], [1.0], tmp_path / "r.png")


def test_rolling_median_matches_the_definition() -> None:
    import statistics

    values = [float((i * 7) % 11) for i in range(40)]
    for k in (1, 3, 5, 9):
        half = k // 2
        expected = [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(40)]
        assert plots._rolling_median(values, k) == expected


def test_savings_plot_writes_a_png(tmp_path: Path) -> None:
    rows: list[Any] = [
        SavingsRow("baseline", 0.12, 0.15),
        {"strategy": "sorted-prefix", "token_savings": 0.71, "token_savings_theoretical_max": 0.8},
        {"variant": "no-theory", "savings": 0.4},
        SavingsRow("failed", None, 0.6),
    ]
    assert_png(plot_savings_by_strategy(rows, tmp_path / "savings.png"))


@pytest.mark.parametrize(
    "rows", [[], [SavingsRow("only", 0.5, 0.5)], [SavingsRow("nothing", None, None)]]
)
def test_savings_plot_edge_cases(tmp_path: Path, rows: list[Any]) -> None:
    assert_png(plot_savings_by_strategy(rows, tmp_path / "s.png"))


def test_efficiency_plot_writes_a_png(tmp_path: Path) -> None:
    rows: list[Any] = [
        EfficiencyRow("bs1", bound_s=10.0, measured_s=14.0, throughput_rps=3.2),
        {"name": "bs8", "efficiency": 0.91, "throughput_rps": 11.5},
        {"name": "over", "bound_s": 10.0, "elapsed_s": 9.0},
        {"name": "unknown"},
    ]
    assert_png(plot_efficiency(rows, tmp_path / "eff.png", target=0.9))
    assert_png(plot_efficiency(rows, tmp_path / "eff1.png", show_throughput=False))


@pytest.mark.parametrize(
    "rows",
    [[], [EfficiencyRow("one", efficiency=0.5)], [EfficiencyRow("zero", 1.0, 0.0)]],
    ids=["empty", "one", "zero-time"],
)
def test_efficiency_plot_edge_cases(tmp_path: Path, rows: list[Any]) -> None:
    assert_png(plot_efficiency(rows, tmp_path / "e.png"))
    assert_png(plot_efficiency(rows, tmp_path / "e2.png", show_throughput=True))


def test_plots_leave_no_pyplot_figures_and_readable_files(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    out = plot_savings_by_strategy([SavingsRow("a", 0.3, 0.4)], tmp_path / "s.png")
    assert plt.get_fignums() == before
    assert stat.S_IMODE(out.stat().st_mode) & 0o044, "PNG should be readable beyond its owner"


def test_plot_into_an_unwritable_place_raises_output_error(tmp_path: Path) -> None:
    from harness.errors import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        plot_savings_by_strategy([], blocker / "s.png")


# --- HTML index --------------------------------------------------------------------------------


class LinkCollector(HTMLParser):
    """hrefs, img srcs, and the text of the page (no tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.alts: list[str] = []
        self.text: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.hrefs.append(unquote(a["href"] or ""))
        if tag == "img":
            self.srcs.append(unquote(a.get("src") or ""))
            self.alts.append(a.get("alt") or "")
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


PASSING = {
    "suite": "throughput",
    "throughput_rps": 12.5,
    "requests": 1000,
    "elapsed_s": 80.0,
    "error_rate": 0.0,
    "generated_at": "2026-05-10T10:00:00+00:00",
    "machine_info": {"cpu": "test cpu", "cores": 2},
    "criteria": [
        {"metric": "throughput_rps", "op": ">=", "threshold": 10, "value": 12.5, "passed": True}
    ],
}
FAILING = {
    "metrics": {"token_savings": 0.42, "token_savings_theoretical_max": 0.8, "latency_ms": {}},
    "note": "<script>alert('x')</script>",
    "criteria": [
        {"metric": "token_savings", "op": ">=", "threshold": 0.5, "value": 0.42, "passed": False},
        {
            "metric": "savings_efficiency",
            "op": ">=",
            "threshold": 0.5,
            "value": 0.53,
            "passed": True,
        },
    ],
}
MEMORY = {
    "kv_bytes_per_token": 36864,
    "max_context_tokens": 40000,
    "safe_context_tokens": 32768,
    "machine_info": {"gpu": "<script>evil()</script>"},
}


@pytest.fixture(scope="module")
def png_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Two real plots, rendered once for the module (rendering is the slow part)."""
    d = tmp_path_factory.mktemp("pngs")
    memory = plot_memory_vs_context(memory_points(), 36_864, 300 * MIB, d / "memory.png")
    savings = plot_savings_by_strategy([SavingsRow("a", 0.42, 0.8)], d / "savings.png")
    return {"memory.png": memory.read_bytes(), "phase2/savings.png": savings.read_bytes()}


@pytest.fixture
def report_dir(tmp_path: Path, png_bytes: dict[str, bytes]) -> Path:
    d = tmp_path / "reports"
    (d / "phase2").mkdir(parents=True)
    (d / "phase1.json").write_text(json.dumps(PASSING))
    (d / "phase2" / "savings.json").write_text(json.dumps(FAILING))
    (d / "phase2" / "memory report.json").write_text(json.dumps(MEMORY))
    (d / "broken.json").write_text('{"throughput_rps": 1.0,')
    (d / "list.json").write_text("[1, 2, 3]")
    (d / ".hidden.json").write_text("{}")
    (d / "notes.txt").write_text("not linked")
    for rel, data in png_bytes.items():
        (d / rel).write_bytes(data)
    return d


def test_index_links_every_json_and_png(report_dir: Path) -> None:
    out = build_index(report_dir)
    assert out == report_dir / "index.html"
    page = out.read_text(encoding="utf-8")
    parser = LinkCollector()
    parser.feed(page)

    on_disk = {
        p.relative_to(report_dir).as_posix()
        for p in report_dir.rglob("*")
        if p.suffix in {".json", ".png"} and not p.name.startswith(".")
    }
    assert on_disk == set(parser.hrefs)
    pngs = sorted(x for x in on_disk if x.endswith(".png"))
    assert parser.srcs == pngs  # sorted, each shown once
    assert all(parser.alts), parser.alts
    for link in parser.hrefs + parser.srcs:
        assert not link.startswith(("/", "http:", "https:", "file:")), link
        assert (report_dir / link).is_file(), link
    assert "notes.txt" not in page
    assert ".hidden.json" not in page
    assert parser.scripts == 0, "the plain page has no scripts"
    assert "<link" not in page, "no external resources"


def test_index_escapes_report_text(report_dir: Path) -> None:
    page = build_index(report_dir).read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;evil()&lt;/script&gt;" in page
    parser = LinkCollector()
    parser.feed(page)
    assert "<script>evil()</script>" in "".join(parser.text)


def test_index_shows_figures_and_criteria(report_dir: Path) -> None:
    page = build_index(report_dir, title="Run <42>").read_text(encoding="utf-8")
    assert "<title>Run &lt;42&gt;</title>" in page
    # headline fields, formatted, at top level and one level down
    assert "12.500 req/s" in page
    assert "metrics.token_savings" in page
    assert "42.0%" in page
    assert "36,864 B/token" in page
    assert "safe_context_tokens" in page
    assert "32,768" in page
    assert "2026-05-10T10:00:00+00:00" in page
    assert "test cpu" in page
    # criteria: one failed row, two passed ones, and a failing badge for the savings report
    assert page.count('class="criterion fail"') == 1
    assert page.count('class="criterion pass"') == 2
    assert "1 with failed criteria" in page
    assert "FAIL" in page
    # malformed and non-object JSON are listed, not fatal
    assert "malformed JSON" in page
    assert "not a JSON object (list)" in page
    assert "unreadable" in page


def test_index_is_deterministic_and_sorted(report_dir: Path) -> None:
    first = build_index(report_dir).read_bytes()
    second = build_index(report_dir).read_bytes()
    assert first == second
    parser = LinkCollector()
    parser.feed(first.decode())
    assert parser.srcs == sorted(parser.srcs)
    assert not [p for p in report_dir.iterdir() if p.name.endswith(".tmp")]


def test_index_check_images_adds_the_probe_script(report_dir: Path) -> None:
    page = build_index(report_dir, check_images=True).read_text(encoding="utf-8")
    assert page.count("<script>") == 1
    assert "imagesOk" in page
    assert "imagesTotal" in page


def test_index_of_an_empty_dir(tmp_path: Path) -> None:
    page = build_index(tmp_path).read_text(encoding="utf-8")
    assert "No JSON reports." in page
    assert "No plots." in page
    assert stat.S_IMODE((tmp_path / "index.html").stat().st_mode) & 0o044


def test_index_of_a_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        build_index(tmp_path / "missing")


def test_index_skips_huge_json(report_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(htmlreport, "MAX_JSON_BYTES", 10)
    page = build_index(report_dir).read_text(encoding="utf-8")
    assert "too large to summarise" in page
    assert "phase1.json" in page


def test_each_row_names_the_model_backend_and_profile_it_measured(tmp_path: Path) -> None:
    # `make run` (270M) then a 1K run of the tiny model into the same folder: each row says which.
    d = tmp_path / "reports"
    d.mkdir()
    (d / "context_limit_results.json").write_text(
        json.dumps(
            {
                "model": "gemma3-270m",
                "profile": "embedded",
                "backend": {"name": "embedded", "model": "gemma3-270m"},
            }
        )
    )
    (d / "performance_benchmarks_1000.json").write_text(
        json.dumps({"profile": "embedded", "backend": {"name": "embedded", "model": "tiny-gemma3"}})
    )
    (d / "notes.json").write_text(json.dumps({"x": 1}))
    page = build_index(d).read_text(encoding="utf-8")
    rows = {
        name: page[page.index(f"<code>{name}</code>") :].split("</tr>", 1)[0]
        for name in ("context_limit_results.json", "performance_benchmarks_1000.json", "notes.json")
    }
    assert "gemma3-270m on embedded · profile embedded" in rows["context_limit_results.json"]
    assert "tiny-gemma3 on embedded · profile embedded" in rows["performance_benchmarks_1000.json"]
    assert 'class="what"' not in rows["notes.json"]
