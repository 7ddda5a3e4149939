"""Phase reports, gates, write-back and the session's summary.

- `Reports.write` evaluates the scenario profile's criteria on a phase's figures and writes its
  report (harness.report: fixed envelope, atomic). A report whose profile has no criteria is
  `ungated`, never PASS; a run that stopped part-way fails on a `run_finished` criterion.
- `Reports.gate` fails the test unless criteria were checked and met: a failed criterion, and a
  profile with no criteria at all (the message names the scenario file), both fail.
- `Reports.recommend` writes measured values to harness.yaml (`--harness-write-config`); the
  suites call it only after their gate passed.
- `Reports.write_summary` covers every report in the folder (not only this session's), with the
  verdict (harness.verdict) first, and the phases this session skipped, with their reasons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import __version__
from harness.backends.base import Backend
from harness.config import write_back
from harness.fileio import atomic_write_json
from harness.phases.common import job_identity, prompt_identity
from harness.report import commit_info, now_iso, write_report
from harness.reportfiles import find_report, report_filename
from harness.reportmodels import SummaryReport
from harness.scenarios import Criterion, Scenario, evaluate
from harness.verdict import Verdict, read_reports, verdict

__all__ = ["PhaseResult", "ReportContext", "Reports"]

_HEADLINES = (
    ("throughput_rps", "{:.2f} req/s"),
    ("uncached_tokens_per_request", "{:.0f} uncached tok/req"),
    ("token_savings", "savings {:.1%}"),
    ("savings_efficiency", "eff {:.3f}"),
    ("error_rate", "errors {:.2%}"),
    ("kv_bytes_per_token", "KV {:.0f} B/tok"),
    ("max_context_tokens", "max ctx {}"),
    ("prefix_reuse_at_workload", "rubric reused {:.1%}"),
    ("parse_rate", "parsed {:.1%}"),
    ("reproducible_rate", "reproducible {:.1%}"),
    ("accuracy", "accuracy {:.1%}"),
    ("cases_run", "{} cases"),
)


@dataclass
class PhaseResult:
    """A written phase report, for the terminal table and the summary."""

    key: str
    path: Path
    report: dict[str, Any]
    failed: list[str] = field(default_factory=list)
    scenario: str = ""

    @property
    def result(self) -> str:
        if self.failed:
            return "FAIL"
        return "PASS" if self.report.get("criteria") else "ungated"


@dataclass(frozen=True)
class ReportContext:
    """What the reports need of the pytest session (`HarnessSession.report_context`): where
    they go, whose they are, and how a report's server and machine are described."""

    profile: str
    root: Path
    report_dir: Path
    config_path: Path
    write_config: bool
    backend_info: Callable[..., dict[str, Any]]
    """`(backend, scenario=None)`: the server a report's figures came from."""
    machine: Callable[[], dict[str, Any]]
    """The machine's description (asked once per session, with the plugin hook's additions)."""
    from_validated: tuple[str, ...] = ()
    """The job settings the validated job (harness.yaml `jobs`) gave, not the options."""
    unlike_harness_run: Callable[[Scenario], dict[str, str]] | None = None
    """`(scenario)`: the job settings the phase sends otherwise than `harness run` would."""
    prompt: Path | None = None
    """The job's prompt (`--harness-prompt`, or the validated job's): the one `harness run`
    sends, so the summary, the page and the terminal judge the reports against it, as
    `harness verdict --prompt` and `harness validate` do (None: the packaged rubric)."""

    def verdict(self) -> Verdict:
        """The verdict every reader of this session shows: one call, one prompt."""
        return verdict(self.report_dir, self.config_path, prompt=self.prompt)

    def relpath(self, path: Path) -> str:
        """`path` relative to the project's root when it lies inside it."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


class Reports:
    """The reports of one session (see the module docstring)."""

    def __init__(self, context: ReportContext) -> None:
        self.context = context
        self.results: list[PhaseResult] = []
        self.config_changes: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        """(test, reason) of phase tests that skipped this session."""

    def write(
        self,
        filename: str,
        scenario: Scenario,
        figures: dict[str, Any],
        *,
        backend: Backend | None = None,
        key: str | None = None,
        stopped: str | None = None,
        defaults: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Evaluate the criteria on `figures`, write the report, remember it. `stopped` says why
        the run ended early: the report keeps what ran and fails on `run_finished`. `defaults`:
        criteria the harness applies where the profile sets none on that metric (a pool run's
        `scaling_efficiency >= 0.7`)."""
        s = self.context
        criteria = scenario.criteria_for(s.profile) if s.profile in scenario.profiles else []
        gated = {c.metric for c in criteria}
        for i, text in enumerate(defaults):
            default = Criterion.parse(
                text, "harness default", f"profiles.{s.profile}.defaults[{i}]", scenario.phase
            )
            if default.metric not in gated:
                criteria.append(default)
        results = evaluate(criteria, figures)
        rows = [r.to_dict() for r in results]
        failed = [r.message() for r in results if not r.passed]
        if stopped is not None:
            rows.insert(0, {"metric": "run_finished", "op": "==", "threshold": 1, "value": 0,
                            "passed": False, "reason": stopped})  # fmt: skip
            failed.insert(0, f"run_finished = 0: {stopped}")
        info = s.backend_info(backend, scenario)
        # The profile and model in the name: a run of one never overwrites another's report.
        path = s.report_dir / report_filename(filename, s.profile, str(info.get("model")))
        scenario_rel = s.relpath(Path(scenario.path))
        report = write_report(
            path,
            phase=scenario.phase,
            scenario=scenario_rel,
            profile=s.profile,
            backend=info,
            figures=figures,
            criteria=rows,
            machine=s.machine(),
            commit=commit_info(s.root),
            prompt=prompt_identity(scenario, s.profile, s.root),
            job={
                **job_identity(scenario, s.profile, s.root),
                "from_validated": list(s.from_validated),
                "unlike_harness_run": s.unlike_harness_run(scenario)
                if s.unlike_harness_run is not None
                else {},
            },
        )
        # Messages name the scenario relative to the project, as users wrote it.
        failed = [m.replace(scenario.path, scenario_rel) for m in failed]
        self.results.append(PhaseResult(key or filename, path, report, failed, scenario_rel))
        return report

    def gate(self, report: dict[str, Any]) -> None:
        for result in self.results:
            if result.report is not report:
                continue
            if result.failed:
                pytest.fail("\n".join(result.failed), pytrace=False)
            if not report.get("criteria"):
                pytest.fail(
                    f"{result.scenario}: profile {self.context.profile!r} has no criteria, so "
                    "nothing was checked and the phase cannot pass (its report says ungated); "
                    "add criteria to the profile",
                    pytrace=False,
                )

    def path_of(self, report: dict[str, Any]) -> Path:
        """Where a report written this session lies (its name carries profile and model)."""
        for result in self.results:
            if result.report is report:
                return result.path
        raise KeyError("that report was not written by this session")

    def recommend(
        self,
        values: dict[str, Any],
        report: dict[str, Any] | Path,
        backend: Backend | None,
        *,
        configured: Mapping[str, str] | None = None,
    ) -> None:
        """Write `values` to harness.yaml with their provenance: `report` (the report dict
        this session wrote, or its path) and the backend and model that measured them.
        `configured`: the values among them the phase was given, not measured (each with where
        it came from): their provenance says `configured`, so nothing reads them as measured."""
        s = self.context
        if not s.write_config:
            return
        info = s.backend_info(backend)
        report_path = report if isinstance(report, Path) else self.path_of(report)
        provenance = {
            "report": s.relpath(report_path),
            "date": now_iso()[:10],
            "backend": info.get("name"),
            "model": info.get("model"),
        }
        given = dict(configured or {})
        measured = {k: v for k, v in values.items() if k not in given}
        self.config_changes += write_back(
            s.config_path, s.profile, measured, {**provenance, "kind": "measured"}
        )
        for key, source in given.items():
            if key in values:
                self.config_changes += write_back(
                    s.config_path,
                    s.profile,
                    {key: values[key]},
                    {**provenance, "kind": "configured", "configured": source},
                )

    # -- the session's summary ------------------------------------------------------------

    def write_summary(self) -> Path | None:
        s = self.context
        if not self.results and not self.skipped:
            return None
        reports = read_reports(s.report_dir)
        summary = {
            "harness_version": __version__,
            "generated_at": now_iso(),
            "profile": s.profile,
            "machine_info": s.machine(),
            "commit_info": commit_info(s.root),
            "verdict": s.verdict().to_dict(),
            "reports": [
                {
                    "report": e.file,
                    "phase": e.phase,
                    "profile": e.profile,
                    "model": e.model,
                    "backend": e.backend,
                    "generated_at": e.generated_at,
                    "result": e.result,
                    "failed_criteria": list(e.failed),
                }
                for e in reports
            ],
            "this_session": [
                {
                    "key": r.key,
                    "report": s.relpath(r.path),
                    "result": r.result,
                    "failed_criteria": r.failed,
                }
                for r in self.results
            ],
            "skipped": [{"test": t, "reason": why} for t, why in self.skipped],
            "config_written": sorted(set(self.config_changes)),
        }
        path = s.report_dir / "summary.json"
        atomic_write_json(path, SummaryReport(**summary).model_dump(mode="json"))
        return path

    def write_pages(self) -> Path | None:
        """Plots that need only the reports on disk, and `index.html` with the verdict first."""
        from harness.htmlreport import build_index
        from harness.plots import plot_memory_vs_context

        s = self.context
        found = find_report(s.report_dir, "context_limit_results.json", profile=s.profile)
        if found is not None:
            _, data = found
            budget = data.get("memory_budget_bytes")
            peak = data.get("max_measured_bytes") or 0
            if budget and budget > 3 * peak:
                budget = None  # far above every reading: drawing it would flatten the plot
            plot_memory_vs_context(
                [(m["n_ctx"], m["memory_bytes"]) for m in data.get("measurements", [])]
                + [(m["n_ctx"], m["memory_bytes"]) for m in data.get("search_measurements", [])],
                data.get("kv_bytes_per_token_theory"),
                data.get("base_model_memory_bytes"),
                s.report_dir / "plots" / "memory_vs_context.png",
                budget_bytes=budget,
                max_context=data.get("max_context_tokens"),
                title=f"Memory against context: {data.get('model', '')}",
            )
        return build_index(s.report_dir, verdict=s.verdict())

    def lines(self) -> list[str]:
        """The terminal summary: the verdict, then every report in the folder."""
        s = self.context
        out = s.verdict().lines()
        rows = [("report", "profile", "model", "result", "figures")]
        for e in read_reports(s.report_dir):
            figures = []
            for key, fmt in _HEADLINES:
                value = e.data.get(key)
                if value is not None:
                    with contextlib.suppress(ValueError, TypeError):
                        figures.append(fmt.format(value))
            rows.append((e.file, e.profile, e.model, e.result, ", ".join(figures)))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        out += [
            "  ".join(f"{row[i]:<{widths[i]}}" for i in range(4)) + f"  {row[4]}" for row in rows
        ]
        out += [f"skipped: {t}: {why}" for t, why in self.skipped]
        return out
