"""Report files say whose they are: a run of one profile or model never overwrites another's
report in the same folder, and reports of the old layout (`<base>.json`) still load."""

from __future__ import annotations

import json
from pathlib import Path

from harness.reportfiles import base_name, find_report, report_filename, reports_named


def _write(folder: Path, name: str, profile: str, model: str, when: str) -> Path:
    path = folder / name
    data = {"profile": profile, "backend": {"model": model}, "generated_at": when}
    path.write_text(json.dumps(data))
    return path


def test_a_run_of_another_profile_or_model_gets_its_own_file(tmp_path: Path) -> None:
    base = "performance_benchmarks_100.json"
    prod = report_filename(base, "gpu-gemma3-12b", "gemma3:12b")
    assert prod == "performance_benchmarks_100.gpu-gemma3-12b.gemma3-12b.json"
    mine = report_filename(base, "embedded", "gemma3-270m")
    other = report_filename(base, "embedded", "/models/SmolLM2.Q4.gguf")
    assert len({prod, mine, other}) == 3
    assert {base_name(n) for n in (prod, mine, other, base)} == {base}
    _write(tmp_path, prod, "gpu-gemma3-12b", "gemma3:12b", "2026-12-01T00:00:00")
    # `make run` afterwards in the same folder: the production report is still there.
    _write(tmp_path, mine, "embedded", "gemma3-270m", "2026-12-02T00:00:00")
    found = find_report(tmp_path, base, profile="gpu-gemma3-12b", model="gemma3:12b")
    assert found is not None and found[0].name == prod
    found = find_report(tmp_path, base, profile="embedded")
    assert found is not None and found[0].name == mine


def test_an_old_layout_report_loads_by_what_it_says(tmp_path: Path) -> None:
    base = "context_limit_results.json"
    old = _write(tmp_path, base, "gpu-gemma3-12b", "gemma3:12b", "2026-11-01T00:00:00")
    new = _write(tmp_path, report_filename(base, "embedded", "gemma3-270m"), "embedded",
                 "gemma3-270m", "2026-12-01T00:00:00")  # fmt: skip
    # Another base whose name starts the same is not this one's.
    _write(tmp_path, "context_limit_results_x.embedded.m.json", "embedded", "m", "2026-12-03")
    assert sorted(reports_named(tmp_path, base)) == sorted([old, new])
    found = find_report(tmp_path, base, profile="gpu-gemma3-12b")
    assert found is not None and found[0] == old
    assert find_report(tmp_path, base, profile="gpu-gemma3-12b", model="gemma3:4b") is None
    newest = find_report(tmp_path, base)
    assert newest is not None and newest[0] == new
