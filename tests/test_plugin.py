"""The pytest plugin under pytester: gating messages, bad scenarios, write-back, markers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]

SCENARIO = """\
name: phase2_scale_100
phase: scale
workload:
  requests: 30
  structured: none
  max_tokens: 4
strategy:
  name: conversation
  trim_interval: 10
profiles:
  embedded:
    criteria:
      - error_rate <= 0
      - token_savings >= {threshold}
"""

# A phase test as a suite writes one, on the in-process double (no server needed).
SUITE = """\
import pytest
from harness.engine import JobSpec, TrimPolicy, run_job
from harness.phases import items_for, scale_figures
from harness.testing import InProcessDouble

@pytest.mark.scale_100
def test_phase(harness):
    scenario = harness.scenario("phase2_scale_100.yaml")
    items = items_for(scenario, harness.profile)
    spec = JobSpec(strategy="conversation", policy=TrimPolicy(100_000, trim_interval=10),
                   progress=False)
    double = InProcessDouble()
    result = harness.run(run_job(double, items, spec))
    figures = scale_figures(result, size=len(items), report_dir=harness.report_dir)
    report = harness.report("performance_benchmarks_30.json", scenario, figures, backend=double)
    harness.gate(report)
    harness.recommend({"TRIM_INTERVAL": 10, "MAX_CONTEXT_TOKENS": 100000}, report, None)

@pytest.mark.scale_10k
def test_long_phase():
    raise AssertionError("a long phase must not run unless -m names it")
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    (pytester.path / "scenarios").mkdir()
    shutil.copytree(ROOT / "scenarios" / "prompts", pytester.path / "scenarios" / "prompts")
    pytester.makepyfile(test_phase=SUITE)
    return pytester


def scenario(pytester: pytest.Pytester, threshold: str) -> None:
    path = pytester.path / "scenarios" / "phase2_scale_100.yaml"
    path.write_text(SCENARIO.format(threshold=threshold))


def test_a_passing_phase_writes_reports_and_prints_the_table(project: pytest.Pytester) -> None:
    scenario(project, "0.5")
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(
        [
            "*harness reports*",
            "verdict: not measured for production",
            "*performance_benchmarks_30.embedded.double.json: a test double's figures, not "
            "measurements*",
            "*performance_benchmarks_30.embedded.double.json*embedded*double*PASS*savings*",
            "summary: reports/summary.json",
        ]
    )
    report = json.loads(
        (project.path / "reports" / "performance_benchmarks_30.embedded.double.json").read_text()
    )
    for key in ("harness_version", "phase", "scenario", "profile", "generated_at", "machine_info",
                "commit_info", "backend", "criteria", "passed"):  # fmt: skip
        assert key in report
    assert report["passed"] is True
    assert report["scenario"] == "scenarios/phase2_scale_100.yaml"
    assert report["context_trims"] == 2
    summary = json.loads((project.path / "reports" / "summary.json").read_text())
    assert summary["this_session"][0]["result"] == "PASS"
    assert [r["report"] for r in summary["reports"]] == [
        "performance_benchmarks_30.embedded.double.json"
    ]
    assert summary["verdict"]["decision"] == "not measured for production"


def test_an_impossible_criterion_fails_with_the_promised_message(project: pytest.Pytester) -> None:
    scenario(project, "1.5")
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(
        ["*token_savings = 0.*, needs >= 1.5 (scenarios/phase2_scale_100.yaml, profile embedded)*"]
    )
    result.stdout.no_fnmatch_line("*error_rate = *")  # only the failed criterion is listed
    result.stdout.no_fnmatch_line("*Traceback*")


def test_a_bad_scenario_is_a_clear_error_not_a_traceback(project: pytest.Pytester) -> None:
    path = project.path / "scenarios" / "phase2_scale_100.yaml"
    path.write_text(SCENARIO.format(threshold="0.5").replace("token_savings", "token_saving"))
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.re_match_lines(
        [
            r"bad scenario: scenarios/phase2_scale_100\.yaml:14: profiles\.embedded\.criteria"
            r"\[1\]: unknown metric 'token_saving' for phase scale; known: .*token_savings"
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*harness/scenarios.py*")
    result.stdout.no_fnmatch_line("*During handling*")


def test_long_phases_run_only_when_named(project: pytest.Pytester) -> None:
    scenario(project, "0.5")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-m", "scale_10k")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(["*a long phase must not run unless -m names it*"])


def test_write_config_writes_once_with_provenance(project: pytest.Pytester) -> None:
    scenario(project, "0.5")
    config = project.path / "harness.yaml"
    config.write_text("profiles:\n  gpu-gemma3-12b:\n    TRIM_INTERVAL: 75  # from the GPU box\n")
    first = project.runpytest_subprocess("-p", "no:cacheprovider", "--write-config")
    first.assert_outcomes(passed=1, deselected=1)
    first.stdout.fnmatch_lines(["config written: harness.yaml (MAX_CONTEXT_TOKENS, TRIM_INTERVAL)"])
    text = config.read_text()
    assert "TRIM_INTERVAL: 75  # from the GPU box" in text
    assert "report: reports/performance_benchmarks_30.embedded.double.json" in text
    second = project.runpytest_subprocess("-p", "no:cacheprovider", "--write-config")
    second.assert_outcomes(passed=1, deselected=1)
    second.stdout.no_fnmatch_line("config written:*")
    assert config.read_text() == text
    without = project.runpytest_subprocess("-p", "no:cacheprovider")
    without.assert_outcomes(passed=1, deselected=1)
    assert config.read_text() == text


def test_options_are_in_one_group_with_defaults(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "LLM batch harness:",
            "*--harness-backend=HARNESS_BACKEND*",
            "*Default: the scenario profile's backend, else*",
            "*--harness-memory-budget=MEMORY_BUDGET*",
            "*--harness-write-config, --write-config*",
        ]
    )
    bad = pytester.runpytest("--harness-backend", "vllm")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--harness-backend 'vllm': choose embedded, openai or ollama*"])


# The real scale suite, its backend replaced by the double, which fails for good at request K+1.
STOPPING_CONFTEST = """\
from harness.errors import ModelNotFound
from harness.pytest import HarnessSession
from harness.testing import InProcessDouble

K = 37

def _fail(n, request):
    return ModelNotFound("injected: the model went away") if n == K + 1 else None

def _backend(self, cfg):
    return InProcessDouble(fail=_fail)

HarnessSession.backend = _backend
"""


def test_a_scale_run_stopped_part_way_still_reports_what_ran(pytester: pytest.Pytester) -> None:
    shutil.copytree(ROOT / "scenarios", pytester.path / "scenarios")
    shutil.copy(ROOT / "suites" / "scale" / "test_scale.py", pytester.path / "test_scale.py")
    pytester.makeconftest(STOPPING_CONFTEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "scale_100")
    result.assert_outcomes(failed=1, deselected=4)
    result.stdout.fnmatch_lines(
        ["*run_finished = 0: stopped after 37 of 100 requests: ModelNotFound: injected*"]
    )
    result.stderr.fnmatch_lines(["*scale 100: 37 of 100 requests run*STOPPED: ModelNotFound*"])
    (path,) = (pytester.path / "reports").glob("performance_benchmarks_100.embedded.*.json")
    report = json.loads(path.read_text())
    assert report["passed"] is False
    assert report["completed"] == 37
    assert report["requests_planned"] == 100
    assert report["finished"] is False
    assert report["stopped_by"] == "ModelNotFound: injected: the model went away"
    assert report["criteria"][0]["metric"] == "run_finished"
    assert report["criteria"][0]["passed"] is False
    assert report["projection"] is None


def test_a_profile_without_criteria_is_ungated_and_its_gate_fails(project: pytest.Pytester) -> None:
    path = project.path / "scenarios" / "phase2_scale_100.yaml"
    text = SCENARIO.format(threshold="0.5")
    path.write_text(text[: text.index("    criteria:")] + "    model: gemma3-270m\n")
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(
        [
            "*scenarios/phase2_scale_100.yaml: profile 'embedded' has no criteria, so nothing "
            "was checked and the phase cannot pass*",
            "*performance_benchmarks_30.embedded.double.json*ungated*",
        ]
    )
    report = json.loads(
        (project.path / "reports" / "performance_benchmarks_30.embedded.double.json").read_text()
    )
    assert report["passed"] is None
    assert report["result"] == "ungated"
    summary = json.loads((project.path / "reports" / "summary.json").read_text())
    assert summary["this_session"][0]["result"] == "ungated"


def test_a_failed_phase_writes_nothing_to_the_config(project: pytest.Pytester) -> None:
    scenario(project, "1.5")  # impossible: the phase fails
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--harness-write-config")
    result.assert_outcomes(failed=1, deselected=1)
    assert not (project.path / "harness.yaml").exists()
    result.stdout.no_fnmatch_line("config written:*")


def test_a_phase_that_skips_is_in_the_summary_with_its_reason(project: pytest.Pytester) -> None:
    """The session's own hooks (registered as a plugin of its config) note a phase test that
    skipped, with why; a skipped test that is no phase is not a phase's business. In-process:
    the outer pytest's session must not receive the inner run's reports."""
    scenario(project, "0.5")
    project.makepyfile(
        test_skips="""
import pytest

@pytest.mark.quality
def test_quality_phase():
    pytest.skip("no quality model here")

def test_not_a_phase():
    pytest.skip("not a phase")
"""
    )
    result = project.inline_run("-p", "no:cacheprovider")
    result.assertoutcome(passed=1, skipped=2)
    summary = json.loads((project.path / "reports" / "summary.json").read_text())
    assert summary["skipped"] == [
        {"test": "test_skips.py::test_quality_phase", "reason": "no quality model here"}
    ]


def test_a_value_the_phase_was_given_is_written_as_configured_not_measured(
    project: pytest.Pytester,
) -> None:
    """Phase 1 writes the slots and server flags it ran with beside what it measured: their
    provenance says `configured` (and where they came from), the others' `measured`, and the
    verdict's settings say so."""
    scenario(project, "0.5")
    suite = project.path / "test_phase.py"
    suite.write_text(
        suite.read_text().replace(
            'harness.recommend({"TRIM_INTERVAL": 10, "MAX_CONTEXT_TOKENS": 100000}, report, None)',
            'harness.recommend({"MAX_CONTEXT_TOKENS": 100000, "parallel": 1}, report, None, '
            'configured={"parallel": "default"})',
        )
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--write-config")
    result.assert_outcomes(passed=1, deselected=1)
    from harness.config import load_profile
    from harness.verdict import _settings

    prof = load_profile(project.path / "harness.yaml", "embedded")
    assert prof.provenance["MAX_CONTEXT_TOKENS"]["kind"] == "measured"
    assert prof.provenance["parallel"]["kind"] == "configured"
    assert prof.provenance["parallel"]["configured"] == "default"
    shown = _settings(prof)
    assert any(s.startswith("parallel: 1 — configured, not measured: default") for s in shown)
    assert not any(s.startswith("MAX_CONTEXT_TOKENS") and "configured" in s for s in shown)
