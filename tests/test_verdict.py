"""The verdict a user bets a night of GPU time on: each rule that can make it GO, tested.

A complete production set (every required phase of `gpu-gemma3-12b`, passed, on Ollama with
gemma3:12b, one server, the prompt `harness run` sends, written by this harness) reads GO; each
test below breaks one rule in that set and checks the verdict says NO-GO or incomplete and names
the report and the field. Removing a rule from `harness.verdict` makes its test fail.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from harness import __version__
from harness.cli import main
from harness.scenarios import load_scenario
from harness.verdict import PRODUCTION, REQUIRED_PHASES, verdict
from harness.workload import load_prompt

ROOT = Path(__file__).resolve().parent.parent
PROMPT = load_prompt(None)
PHASES = {
    "context_limit_results.json": "context_limits",
    "prefix_reuse_results.json": "context_limits",
    "performance_benchmarks_100.json": "scale",
    "performance_benchmarks_1000.json": "scale",
    "performance_benchmarks_10000.json": "scale",
    "quality_results.json": "quality",
    "reliability_results.json": "reliability",
}


SCENARIOS = {
    "context_limit_results.json": "phase1_context_limits.yaml",
    "prefix_reuse_results.json": "prefix_reuse.yaml",
    "performance_benchmarks_100.json": "phase2_scale_100.yaml",
    "performance_benchmarks_1000.json": "phase3_scale_1k.yaml",
    "performance_benchmarks_10000.json": "phase4_scale_10k.yaml",
    "quality_results.json": "quality.yaml",
    "reliability_results.json": "reliability.yaml",
}
"""The project's scenario that gates each report (`harness.verdict.looser_gates`)."""


def gates(base: str) -> list[dict[str, Any]]:
    """The project's production criteria of `base`'s scenario, each checked and met."""
    scenario = load_scenario(ROOT / "scenarios" / SCENARIOS[base])
    return [
        {"metric": c.metric, "op": c.op, "threshold": c.threshold, "value": c.threshold,
         "passed": True}
        for c in scenario.criteria_for("gpu-gemma3-12b")
    ]  # fmt: skip


def report(base: str, **changes: Any) -> dict[str, Any]:
    """A passing production report of `base`, as the plugin writes it."""
    phase = PHASES[base]
    data: dict[str, Any] = {
        "harness_version": __version__,
        "schema_version": 2,
        "phase": phase,
        "scenario": f"scenarios/{SCENARIOS[base]}",
        "profile": "gpu-gemma3-12b",
        "generated_at": "2026-12-01T10:00:00+00:00",
        "machine_info": {},
        "commit_info": {"id": "0123456789abcdef0123", "dirty": False, "branch": "main"},
        "backend": {
            "name": "ollama",
            "model": "gemma3:12b",
            "server": "ollama 0.34.0",
            "request_path": "native",
        },
        "criteria": gates(base),
        "passed": True,
        "result": "PASS",
        "prompt": {"name": PROMPT.name, "file": PROMPT.path, "sha256": PROMPT.sha256},
    }
    if phase == "reliability":
        data["prompt"] = {"name": "short", "file": "scenarios/prompts/short_screen.yaml",
                          "sha256": "f" * 64}  # fmt: skip
    if phase == "scale":
        n = int(base.removesuffix(".json").rsplit("_", 1)[1])
        data.update(
            requests=n, requests_planned=n, completed=n, finished=True, throughput_rps=6.5,
            error_rate=0.0, strategy={"name": "stateless", "servers": 1},
            uncached_tokens_per_request=118.4,
            cached_tokens_source="server",
            # Measured as `harness run` resolves the job with no harness.yaml: its defaults.
            config={"MAX_CONTEXT_TOKENS": {"value": 14000, "source": "scenario"},
                    "strategy": {"value": "stateless", "source": "harness run's default"},
                    "concurrency": {"value": 1, "source": "default"},
                    "score_mode": {"value": "decode", "source": "default"}},
        )  # fmt: skip
    if phase == "quality":
        data["score_mode"] = "decode"
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write_set(folder: Path, reports: dict[str, dict[str, Any]]) -> Path:
    """Write each report under its new-layout name (profile and model in it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for base, data in reports.items():
        model = data["backend"]["model"].replace(":", "-")
        name = base.removesuffix(".json") + f".{data['profile']}.{model}.json"
        (folder / name).write_text(json.dumps(data))
    return folder


def complete() -> dict[str, dict[str, Any]]:
    return {base: report(base) for _, base in REQUIRED_PHASES}


def decide(tmp_path: Path, reports: dict[str, dict[str, Any]], **kw: Any) -> Any:
    folder = write_set(tmp_path / "reports", reports)
    return verdict(folder, tmp_path / "harness.yaml", **kw)


def test_a_complete_production_set_reads_go(tmp_path: Path) -> None:
    v = decide(tmp_path, complete())
    assert v.decision == "GO", v.lines()
    assert v.exit_code == 0
    # Every report it read, with its date, harness version and commit.
    assert len(v.evidence) == len(REQUIRED_PHASES)
    assert all(f"harness {__version__} @ 0123456789ab" in e for e in v.evidence)
    assert any("performance_benchmarks_10000" in p for p in v.projection)


def test_a_failed_phase_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    reports["quality_results.json"].update(
        passed=False, result="FAIL",
        criteria=[{"metric": "parse_rate", "op": ">=", "threshold": 0.999, "value": 0.9,
                   "passed": False}],
    )  # fmt: skip
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("quality_results" in r and "parse_rate" in r for r in v.reasons)


def test_a_missing_phase_is_incomplete(tmp_path: Path) -> None:
    reports = complete()
    del reports["performance_benchmarks_10000.json"]
    v = decide(tmp_path, reports)
    assert v.decision == "incomplete" and v.exit_code == 1
    assert any("scale 10K" in r for r in v.reasons)


def test_an_ungated_phase_is_incomplete(tmp_path: Path) -> None:
    reports = complete()
    reports["reliability_results.json"].update(criteria=[], passed=None, result="ungated")
    v = decide(tmp_path, reports)
    assert v.decision == "incomplete"
    assert any("ungated" in r and "reliability_results" in r for r in v.reasons)


def test_another_model_in_one_report_is_no_go_naming_it(tmp_path: Path) -> None:
    reports = complete()
    reports["performance_benchmarks_1000.json"]["backend"]["model"] = "gemma3:4b"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO", v.lines()
    assert any(
        "performance_benchmarks_1000.gpu-gemma3-12b.gemma3-4b.json" in r
        and "backend.model is 'gemma3:4b'" in r
        for r in v.reasons
    )


def test_a_whole_set_of_another_model_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    for data in reports.values():
        data["backend"]["model"] = "gemma3:4b"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"


def test_another_backend_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    reports["quality_results.json"]["backend"]["name"] = "openai"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("backend.name is 'openai'" in r for r in v.reasons)


def test_a_second_prompt_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    reports["performance_benchmarks_100.json"]["prompt"] = {
        "name": "other", "file": "mine.yaml", "sha256": "a" * 64,
    }  # fmt: skip
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("performance_benchmarks_100" in r and "prompt.sha256 aaaaaaaaaaaa" in r
               for r in v.reasons)  # fmt: skip


def test_the_prompt_must_be_the_one_harness_run_sends(tmp_path: Path) -> None:
    """The same prompt in every report, but not the one `harness run` would send."""
    other = ROOT / "scenarios" / "prompts" / "short_screen.yaml"
    v = decide(tmp_path, complete(), prompt=other)
    assert v.decision == "NO-GO"
    assert any("is not the prompt harness run sends" in r for r in v.reasons)


def test_a_report_without_its_prompt_is_incomplete(tmp_path: Path) -> None:
    reports = complete()
    reports["quality_results.json"]["prompt"] = None
    reports["quality_results.json"].pop("prompt")
    v = decide(tmp_path, reports)
    assert v.decision == "incomplete"
    assert any("quality_results" in r and "names no prompt" in r for r in v.reasons)


def test_a_second_server_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    reports["performance_benchmarks_10000.json"]["backend"]["server"] = "ollama 0.35.1"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("backend.server differs" in r and "ollama 0.35.1" in r for r in v.reasons)


def test_a_replayed_ollama_is_no_go_naming_the_replay(tmp_path: Path) -> None:
    reports = complete()
    for data in reports.values():
        data["backend"]["replay"] = "tests/ollama_replay.py: recorded Ollama bodies"
        data["backend"]["server"] = "ollama 0.34.0 (a replay: tests/ollama_replay.py)"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("a replayed server (tests/ollama_replay.py" in r for r in v.reasons)
    assert v.projection == []  # a replay's throughput projects nothing


def test_a_test_double_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    for data in reports.values():  # one server throughout: only the double rule can say no
        data["backend"]["server"] = "in-process test double"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("a test double's figures, not measurements" in r for r in v.reasons)


def test_the_projection_comes_only_from_a_finished_passing_run(tmp_path: Path) -> None:
    reports = complete()
    # A larger run that stopped part-way, and one that failed: neither may project.
    stopped = report("performance_benchmarks_10000.json", requests=50000, finished=False,
                     throughput_rps=60.0)  # fmt: skip
    failed = copy.deepcopy(stopped)
    failed.update(finished=True, passed=False, result="FAIL", throughput_rps=70.0)
    folder = write_set(tmp_path / "reports", reports)
    (folder / "performance_benchmarks_50000.gpu-gemma3-12b.gemma3-12b.json").write_text(
        json.dumps({**stopped, "generated_at": "2026-12-02T00:00:00+00:00"})
    )
    (folder / "performance_benchmarks_170000.gpu-gemma3-12b.gemma3-12b.json").write_text(
        json.dumps({**failed, "requests": 170000})
    )
    v = verdict(folder, tmp_path / "harness.yaml")
    assert v.projection and "performance_benchmarks_10000" in v.projection[0]
    assert "6.50 req/s" in v.projection[0]


def test_a_stopped_scale_run_is_not_the_projection_source(tmp_path: Path) -> None:
    """The required 10K phase stopped after a few rows: NO-GO, and no projection from it."""
    reports = complete()
    reports["performance_benchmarks_10000.json"].update(
        finished=False, requests=40, throughput_rps=9.0, passed=False, result="FAIL",
        criteria=[{"metric": "run_finished", "op": "==", "threshold": 1, "value": 0,
                   "passed": False}],
    )  # fmt: skip
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert v.projection and "performance_benchmarks_1000." in v.projection[0]


def test_another_harness_version_is_stale(tmp_path: Path) -> None:
    reports = complete()
    reports["quality_results.json"]["harness_version"] = "0.0.1"
    v = decide(tmp_path, reports)
    assert v.decision == "incomplete"
    assert any("quality_results" in r and "stale: written by harness 0.0.1" in r
               for r in v.reasons)  # fmt: skip


def test_settings_harness_yaml_no_longer_holds_are_stale(tmp_path: Path) -> None:
    """The scale runs measured MAX_CONTEXT_TOKENS 14000; harness.yaml now says 12000."""
    (tmp_path / "harness.yaml").write_text(
        "profiles:\n  gpu-gemma3-12b:\n    MAX_CONTEXT_TOKENS: 12000\n    provenance:\n"
        "      MAX_CONTEXT_TOKENS: {report: reports/context_limit_results.gpu-gemma3-12b."
        "gemma3-12b.json, date: '2026-12-01', backend: ollama, model: gemma3:12b}\n"
    )
    v = decide(tmp_path, complete())
    assert v.decision == "incomplete"
    assert any(
        "performance_benchmarks_100" in r
        and "MAX_CONTEXT_TOKENS = 14000" in r
        and "harness.yaml now says MAX_CONTEXT_TOKENS: 12000" in r
        for r in v.reasons
    )


def test_reports_of_the_old_layout_still_load(tmp_path: Path) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    for base, data in complete().items():
        (folder / base).write_text(json.dumps(data))
    v = verdict(folder, tmp_path / "harness.yaml")
    assert v.decision == "GO", v.lines()


def test_the_scenarios_production_profile_is_the_verdicts(tmp_path: Path) -> None:
    seen = 0
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        profile = load_scenario(path).profiles.get("gpu-gemma3-12b")
        if profile is None:
            continue  # flags.yaml: the embedded server's flags only
        seen += 1
        assert profile.backend == PRODUCTION["backend"], path
        if profile.model is not None:
            assert profile.model == PRODUCTION["model"], path
    assert seen >= len(REQUIRED_PHASES) - 2  # scale 100, 1K, 10K share a shape; all are there


def test_harness_verdict_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_set(tmp_path / "reports", complete())
    config = str(tmp_path / "harness.yaml")
    assert main(["verdict", str(folder), "--config", config]) == 0
    out = capsys.readouterr().out
    assert out.startswith("verdict: GO") and "evidence read:" in out
    (folder / next(p.name for p in folder.glob("quality_results*"))).unlink()
    assert main(["verdict", str(folder), "--config", config]) == 1
    assert "verdict: incomplete" in capsys.readouterr().out
    assert main(["verdict", str(tmp_path / "nowhere"), "--config", config]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["verdict", str(folder), "--config", config, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["decision"] == "incomplete"


def test_a_criterion_left_out_of_a_reports_gates_is_no_go_naming_it(tmp_path: Path) -> None:
    """A 10K report gated on 1 of its profile's criteria: its PASS says nothing of the rest."""
    reports = complete()
    ten_k = reports["performance_benchmarks_10000.json"]
    ten_k["criteria"] = ten_k["criteria"][:1]
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO", v.lines()
    text = " ".join(v.reasons)
    assert "performance_benchmarks_10000" in text and "gates looser than the project's" in text
    assert "eta_error_max <= 0.2 (scenarios/phase4_scale_10k.yaml) was not checked" in text


@pytest.mark.parametrize(
    ("metric", "threshold", "op", "outcome"),
    [
        ("token_savings", 0.5, ">", "NO-GO"),  # loosened
        ("token_savings", 0.97, ">=", "NO-GO"),  # the bound itself let through
        ("token_savings", 0.99, ">", "GO"),  # stricter: fine
        ("memory.peak_gb", 16, "<", "NO-GO"),  # an upper bound loosened
        ("memory.peak_gb", 10, "<", "GO"),
        ("cached_tokens_source", "estimate", "==", "NO-GO"),  # another word
    ],
)
def test_a_threshold_looser_than_the_projects_is_no_go_and_a_stricter_one_is_fine(
    tmp_path: Path, metric: str, threshold: Any, op: str, outcome: str
) -> None:
    reports = complete()
    for c in reports["performance_benchmarks_10000.json"]["criteria"]:
        if c["metric"] == metric:
            c.update(op=op, threshold=threshold)
    v = decide(tmp_path, reports)
    assert v.decision == outcome, v.lines()
    if outcome == "NO-GO":
        assert f"{metric} was checked {op} {threshold}, looser than the project's" in " ".join(
            v.reasons
        )


def test_a_report_gated_by_a_scenario_the_project_does_not_have_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    reports["quality_results.json"]["scenario"] = "/somewhere/else/my_quality.yaml"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert "gated by /somewhere/else/my_quality.yaml, not one of the project's scenarios" in (
        " ".join(v.reasons)
    )


def _config(data: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {
        **data["config"],
        **{k: {"value": v, "source": "scenario"} for k, v in settings.items()},
    }


@pytest.mark.parametrize(
    ("base", "setting", "value"),
    [
        ("performance_benchmarks_10000.json", "strategy", "conversation"),
        ("performance_benchmarks_1000.json", "concurrency", 4),
        ("performance_benchmarks_100.json", "score_mode", "logprobs"),
    ],
)
def test_a_scale_run_measured_otherwise_than_harness_run_will_run_is_no_go(
    tmp_path: Path, base: str, setting: str, value: Any
) -> None:
    """Issue 38: scale reports measured with `strategy: conversation` while harness run resolves
    `stateless` read GO."""
    reports = complete()
    reports[base] = report(base, config=_config(reports[base], **{setting: value}))
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO", v.lines()
    (why,) = [r for r in v.reasons if "not measured as harness run" in r]
    assert base.removesuffix(".json") in why and f"config.{setting} = {value!r}" in why
    assert "harness run will send" in why


def test_quality_scored_in_another_mode_than_harness_run_uses_is_no_go(tmp_path: Path) -> None:
    reports = complete()
    reports["quality_results.json"]["score_mode"] = "logprobs"
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    assert any("quality_results" in r and "config.score_mode = 'logprobs'" in r for r in v.reasons)


def test_what_harness_run_will_send_comes_from_harness_yaml_now(tmp_path: Path) -> None:
    """A conversation measured, and harness.yaml's STRATEGY says conversation: harness run
    sends that, GO; the same reports with harness.yaml silent are NO-GO."""
    reports = complete()
    for base in ("performance_benchmarks_100.json", "performance_benchmarks_1000.json",
                 "performance_benchmarks_10000.json"):  # fmt: skip
        reports[base] = report(base, config=_config(reports[base], strategy="conversation"))
    assert decide(tmp_path, reports).decision == "NO-GO"
    (tmp_path / "harness.yaml").write_text(
        "profiles:\n  gpu-gemma3-12b:\n    STRATEGY: conversation\n"
    )
    v = decide(tmp_path, reports)
    assert v.decision == "GO", v.lines()


def test_a_scale_report_that_does_not_name_its_run_settings_is_incomplete(tmp_path: Path) -> None:
    reports = complete()
    base = "performance_benchmarks_1000.json"
    reports[base] = report(base, config={"MAX_CONTEXT_TOKENS": {"value": 14000, "source": "x"}})
    v = decide(tmp_path, reports)
    assert v.decision == "incomplete", v.lines()
    assert any("names no config.strategy, config.concurrency, config.score_mode" in r
               for r in v.reasons)  # fmt: skip


def test_the_projection_says_what_the_run_sent(tmp_path: Path) -> None:
    """Issue 38: the 170K projection was quoted without saying from what rows and settings."""
    v = decide(tmp_path, complete())
    assert (
        "generated rows, strategy stateless, concurrency 1, 118 uncached tokens a row"
        in (v.projection[0])
    )
    assert "a finished run that passed its criteria" in v.projection[0]


def test_a_no_go_of_failed_scale_runs_still_shows_the_time_labelled(tmp_path: Path) -> None:
    """Issue 38: a NO-GO (throughput 3.1, needs > 6) gave no time estimate at all."""
    reports = _slow_scale_set()
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    (line, *_) = v.projection
    assert "performance_benchmarks_10000" in line and "3.10 req/s" in line
    assert "from a run that failed (throughput_rps" in line and "not a reference" in line
    assert "15.2 h" in line  # 170,000 / 3.1 / 3600


def test_the_session_summary_judges_against_the_jobs_prompt(tmp_path: Path) -> None:
    """Issue 38 (one rule for every reader): the summary, the page and the terminal called the
    verdict without the prompt `harness run` sends, so a set measured with `--harness-prompt`
    read NO-GO there and GO in `harness validate`."""
    from harness.pytest.reporting import ReportContext

    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(Path(PROMPT.path).read_text().replace("Northwind", "Southwind"))
    mine = load_prompt(rubric)
    assert mine.sha256 != PROMPT.sha256
    reports = complete()
    for data in reports.values():
        if data["phase"] != "reliability":
            data["prompt"] = {"name": mine.name, "file": str(rubric), "sha256": mine.sha256}
    folder = write_set(tmp_path / "reports", reports)

    def context(prompt: Path | None) -> ReportContext:
        return ReportContext(
            profile="gpu-gemma3-12b", root=tmp_path, report_dir=folder,
            config_path=tmp_path / "harness.yaml", write_config=False,
            backend_info=lambda *a, **k: {}, machine=dict, prompt=prompt,
        )  # fmt: skip

    assert context(rubric).verdict().decision == "GO"
    assert context(None).verdict().decision == "NO-GO"


def _slow_scale_set() -> dict[str, dict[str, Any]]:
    reports = complete()
    failing = {"metric": "throughput_rps", "op": ">", "threshold": 6, "value": 3.1,
               "passed": False}  # fmt: skip
    for base in ("performance_benchmarks_100.json", "performance_benchmarks_1000.json",
                 "performance_benchmarks_10000.json"):  # fmt: skip
        reports[base].update(
            passed=False, result="FAIL", throughput_rps=3.1,
            criteria=[c for c in reports[base]["criteria"] if c["metric"] != "throughput_rps"]
            + [failing],
        )  # fmt: skip
    return reports


def _extra(base: str, data: dict[str, Any]) -> dict[str, Any]:
    """A production report outside the required set (concurrency, performance)."""
    return {**report("context_limit_results.json"), "phase": base.split("_")[0], **data}


def test_a_no_go_says_what_to_try_from_what_was_measured(tmp_path: Path) -> None:
    """Issue 38: each failed criterion carries one next step grounded in the reports: the
    concurrency the concurrency phase measured fastest, the score mode the performance phase
    measured faster, the deadline the measured rate meets."""
    reports = _slow_scale_set()
    cells = [{"concurrency": n, "throughput_rps": r, "errors": 0}
             for n, r in ((1, 3.1), (2, 5.0), (4, 6.8))]  # fmt: skip
    reports["concurrency_results.json"] = _extra(
        "concurrency_results.json", {"server_concurrency": cells, "criteria": []}
    )
    reports["performance_comparison.json"] = _extra(
        "performance_comparison.json",
        {"logprobs_over_decode": 1.6, "score_agreement": 0.985, "criteria": []},
    )
    v = decide(tmp_path, reports)
    assert v.decision == "NO-GO"
    (line,) = [r for r in v.reasons if r.startswith("performance_benchmarks_10000")]
    assert "throughput_rps = 3.1, needs > 6; next: at the measured 3.10 req/s" in line
    assert "170,000 rows take 15.2 h (concurrency 1, score mode decode" in line
    assert "measured 6.80 req/s at 4 in flight: set CONCURRENCY: 4" in line
    assert "OLLAMA_NUM_PARALLEL to at least 4" in line
    assert "--score-mode logprobs, measured 1.60x decode" in line and "98.5%" in line
    assert "or a deadline of 16 h" in line


def test_a_no_go_without_the_report_that_would_ground_a_step_says_which_to_run(
    tmp_path: Path,
) -> None:
    v = decide(tmp_path, _slow_scale_set())
    (line,) = [r for r in v.reasons if r.startswith("performance_benchmarks_10000")]
    assert "next: " in line and "measure concurrency (pytest suites/performance" in line
    reports = complete()
    reports["performance_benchmarks_1000.json"].update(
        passed=False, result="FAIL", uncached_tokens_per_request=2100.0,
        criteria=[{"metric": "token_savings", "op": ">", "threshold": 0.95, "value": 0.41,
                   "passed": False}],
    )  # fmt: skip
    v = decide(tmp_path / "b", reports)
    (line,) = [r for r in v.reasons if r.startswith("performance_benchmarks_1000.")]
    assert "next: 2100 uncached prompt tokens a row: the shared rubric is not reused" in line


def test_every_production_criterion_has_a_next_step_of_its_own() -> None:
    """A failed production criterion never falls to the generic "run the phase again" unless
    it is one of the few listed here (their report names the fix)."""
    from harness.nextsteps import STEPS

    generic = {"r_squared", "distinct_scores", "cases_failed", "cases_run", "duplicated",
               "lost", "restart_failed", "cached_tokens_source"}  # fmt: skip
    metrics = {c["metric"] for base in SCENARIOS for c in gates(base)}
    uncovered = {m for m in metrics if m not in STEPS and m.split(".", 1)[0] not in STEPS} - generic
    assert not uncovered
