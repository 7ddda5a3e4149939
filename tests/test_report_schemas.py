"""Reports have a written-down shape: the models of harness.reportmodels, exported as JSON
Schema to reports/schema/ (committed: a change of shape is a visible diff), and every report
the harness writes validates against its schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastjsonschema
import pytest

from harness.reportmodels import export_schemas, model_for_file

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "reports" / "schema"
pytest_plugins = ["pytester"]


def test_the_committed_schemas_are_the_models(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text() for p in export_schemas(tmp_path)}
    committed = {p.name: p.read_text() for p in COMMITTED.glob("*.schema.json")}
    assert committed == fresh, (
        "reports/schema/ is out of date: run scripts/export_schemas.py and commit the diff"
    )


def validate(path: Path) -> None:
    model = model_for_file(path.name)
    assert model is not None, f"{path.name} has no report model"
    schema = json.loads((COMMITTED / f"{model.__name__}.schema.json").read_text())
    fastjsonschema.compile(schema)(json.loads(path.read_text()))


SUITE = """\
import pytest
from harness.engine import JobSpec, TrimPolicy, run_job
from harness.phases import items_for, scale_figures
from harness.testing import InProcessDouble

@pytest.mark.scale_100
def test_phase(harness):
    scenario = harness.scenario("phase2_scale_100.yaml")
    items = items_for(scenario, harness.profile, 20)
    double = InProcessDouble()
    spec = JobSpec(strategy="conversation", policy=TrimPolicy(100_000, trim_interval=10),
                   progress=False)
    result = harness.run(run_job(double, items, spec))
    figures = scale_figures(result, size=20, report_dir=harness.report_dir)
    report = harness.report("performance_benchmarks_20.json", scenario, figures, backend=double)
    harness.gate(report)
"""


def test_a_scale_report_and_the_summary_validate(pytester: pytest.Pytester) -> None:
    shutil.copytree(ROOT / "scenarios", pytester.path / "scenarios")
    pytester.makepyfile(test_phase=SUITE)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "scale_100")
    reports = pytester.path / "reports"
    # The profile and model in the name: the in-process double under the embedded profile.
    validate(reports / "performance_benchmarks_20.embedded.double.json")
    validate(reports / "summary.json")


def test_a_report_missing_a_figure_cannot_be_written(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from harness.report import write_report

    with pytest.raises(ValidationError, match="throughput_rps"):
        write_report(
            tmp_path / "performance_benchmarks_5.json",
            phase="scale",
            scenario="s",
            profile="p",
            backend={},
            figures={"requests": 5},
            criteria=[],
            machine={},
            commit=None,
        )
    assert not (tmp_path / "performance_benchmarks_5.json").exists()
