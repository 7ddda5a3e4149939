"""`harness validate INPUT`: the phases a profile needs, run on the user's own job, then the
verdict.

Each phase is the pytest command a user (or CI) would type, printed before it runs, with the
job given as `--harness-input`, `--harness-prompt` and `--harness-id-column` (the session lays
it over every scenario: `harness.pytest.session.job_given`). A phase that already has a fresh
passing report of this job in the report folder is skipped (`fresh_pass`): the same input file,
id column, prompt (sha256) and profile, result PASS, written after the input and the prompt
were last changed. So an interrupted validation (Ctrl-C, a closed terminal) goes on where it
stopped when the same command runs again. Before each phase it prints what the phase will take
at the rate measured so far (a scale report of this job: rows per second), when one exists.

It ends with the verdict (`harness.verdict.verdict`) read from the same folder, with the prompt
`harness run` would send; its exit status is 0 when every phase it ran or skipped passed, 1 when
one failed, 130 when interrupted. When every phase ran (or was skipped as passed) it records the
job in harness.yaml (`jobs`, `harness.config.record_job`): `harness run INPUT` then runs that
job with no flags, and its banner says what `validation_status` finds: `validated: GO`,
`validated on the stand-in: not measured for production`, or `not validated: <first reason>`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.config import DEFAULT_CONFIG_PATH, JobRecord, find_job, record_job
from harness.run.resolve import default_model, default_profile
from harness.verdict import PRODUCTION_PROFILE, ReportEntry, read_reports, verdict
from harness.workload import DEFAULT_PROMPT_PATH, load_prompt, read_candidates_csv

__all__ = [
    "PHASES",
    "Phase",
    "ValidateOptions",
    "Validation",
    "fresh_pass",
    "phase_command",
    "validate",
    "validation_status",
]


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase as pytest runs it."""

    name: str
    suite: str
    """The suite's folder, from the project root."""
    marker: str
    report: str
    """The report's base name (`performance_benchmarks_100.json`)."""
    rows: int | None = None
    """Requests the phase sends, where its size is fixed (for the time estimate)."""
    writes_config: bool = False
    """Run with `--harness-write-config`: what it measured (phase 1's context and memory line)
    is what the later phases and `harness run` read from harness.yaml."""


PHASES: tuple[Phase, ...] = (
    Phase("context limits", "suites/context_limits", "context_limits",
          "context_limit_results.json", writes_config=True),
    Phase("scale 100", "suites/scale", "scale_100", "performance_benchmarks_100.json", 100),
    Phase("scale 1K", "suites/scale", "scale_1k", "performance_benchmarks_1000.json", 1_000),
    Phase("scale 10K", "suites/scale", "scale_10k", "performance_benchmarks_10000.json", 10_000),
    Phase("quality", "suites/quality", "quality", "quality_results.json"),
    Phase("reliability", "suites/reliability", "reliability", "reliability_results.json"),
)  # fmt: skip
"""The roadmap's phases (`harness.verdict.REQUIRED_PHASES`), in the order they run."""

PYTEST_INTERRUPTED, PYTEST_USAGE_ERROR = 2, 4
"""pytest's exit codes for Ctrl-C and for a command line it refused."""

STOP_GRACE_S = 120.0
"""How long a phase interrupted by Ctrl-C is given to stop on its own (end its case, stop its
servers, say what ran) before it is killed."""


def run_phase(cmd: list[str], cwd: Path, *, grace_s: float = STOP_GRACE_S) -> int:
    """Run one phase's pytest, its output on this terminal; its exit code.

    Ctrl-C (or SIGTERM) reaches the phase exactly once, from here: it runs in its own session,
    so the terminal's SIGINT goes to `harness validate` alone, which passes it on and waits up
    to `grace_s` for pytest to stop as it does on Ctrl-C (a second SIGINT would break its
    teardown and leave the servers to stop by themselves), then kills it; then the interrupt
    goes on (KeyboardInterrupt). Before, `subprocess.run` killed pytest 0.25 s after the
    terminal's SIGINT, in the middle of its teardown.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, before)


STAND_IN_SKIPS = {"scale_10k": "hours on a CPU: `make long` runs it on the tiny model"}
"""Phases the stand-in profile (the embedded CPU server) leaves out by default, and why."""


@dataclass(frozen=True, slots=True)
class ValidateOptions:
    """What `harness validate` was given."""

    input: Path
    prompt: Path | None = None
    id_column: str = "id"
    backend: str | None = None
    model: str | None = None
    base_url: str | None = None
    profile: str | None = None
    threads: int | None = None
    report_dir: Path = Path("reports")
    config: Path | None = None
    """The config file the phases write back to and the job is recorded in (None: harness.yaml
    in `root`); `harness validate` gives the one `harness run` reads where the user stands."""
    phases: tuple[str, ...] | None = None
    """Markers of the phases to run (None: the profile's)."""
    dry_run: bool = False


def default_phases(backend: str | None) -> tuple[Phase, ...]:
    """Every phase for a production backend; the stand-in leaves out `STAND_IN_SKIPS`."""
    if backend in (None, "embedded"):
        return tuple(p for p in PHASES if p.marker not in STAND_IN_SKIPS)
    return PHASES


def phase_command(opts: ValidateOptions, phase: Phase) -> list[str]:
    """The pytest command that runs `phase` on the job (what CI can run as it is)."""
    cmd = [sys.executable, "-m", "pytest", phase.suite, "-m", phase.marker,
           "-p", "no:cacheprovider",
           "--harness-input", str(opts.input.resolve()),
           "--harness-id-column", opts.id_column,
           "--harness-report-dir", str(opts.report_dir)]  # fmt: skip
    # The prompt always: with none named, a job validated earlier for this input would give its
    # own (the pytest options take the validated job's prompt), not the packaged rubric.
    cmd += ["--harness-prompt", str((opts.prompt or DEFAULT_PROMPT_PATH).resolve())]
    if phase.writes_config:
        cmd.append("--harness-write-config")
    for flag, value in (
        ("--harness-backend", opts.backend),
        ("--harness-model", opts.model),
        ("--harness-base-url", opts.base_url),
        ("--harness-profile", opts.profile),
        ("--harness-threads", opts.threads),
        ("--harness-config", opts.config),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def _same_file(named: Any, path: Path, root: Path) -> bool:
    if not named:
        return False
    p = Path(str(named))
    return (p if p.is_absolute() else root / p).resolve() == path.resolve()


def _written_at(e: ReportEntry) -> float:
    try:
        return datetime.fromisoformat(e.generated_at).timestamp()
    except ValueError:
        return 0.0


def _of_this_job(
    entries: Sequence[ReportEntry],
    phase: Phase,
    opts: ValidateOptions,
    *,
    prompt_sha256: str,
    root: Path,
    profile: str | None,
) -> list[ReportEntry]:
    """The reports of `phase` that measured this job (the same input and id column, the same
    prompt's sha256, the same profile; None: any), newest first."""
    out = []
    for e in sorted(entries, key=_written_at, reverse=True):
        job = e.data.get("job")
        if e.base != phase.report or not isinstance(job, Mapping):
            continue
        if profile is not None and e.profile != profile:
            continue
        if not _same_file(job.get("input"), opts.input, root):
            continue
        if job.get("id_column") == opts.id_column and e.prompt_sha256 == prompt_sha256:
            out.append(e)
    return out


def _changed(opts: ValidateOptions) -> float:
    """When the input or the prompt last changed (reports are stamped to the second)."""
    return int(
        max(
            (p.stat().st_mtime for p in (opts.input, opts.prompt) if p is not None and p.exists()),
            default=0.0,
        )
    )


def fresh_pass(
    entries: Sequence[ReportEntry],
    phase: Phase,
    opts: ValidateOptions,
    *,
    prompt_sha256: str,
    root: Path,
    profile: str | None = None,
) -> ReportEntry | None:
    """A passing report of `phase` that measured this job and is newer than its files: the
    same input and id column, the same prompt (sha256), the same profile (None: any)."""
    changed = _changed(opts)
    for e in _of_this_job(entries, phase, opts, prompt_sha256=prompt_sha256, root=root,
                          profile=profile):  # fmt: skip
        if e.result == "PASS" and _written_at(e) >= changed:
            return e
    return None


def why_not_passed(
    entries: Sequence[ReportEntry],
    phase: Phase,
    opts: ValidateOptions,
    *,
    prompt_sha256: str,
    root: Path,
    profile: str | None,
    report_dir: Path,
) -> str:
    """Why `phase` has no fresh passing report of this job: its newest report failed (its
    first failed criterion), it predates the files, or there is none."""
    mine = _of_this_job(entries, phase, opts, prompt_sha256=prompt_sha256, root=root,
                        profile=profile)  # fmt: skip
    if not mine:
        return f"no {phase.name} report of this job in {report_dir} (harness validate runs it)"
    newest = mine[0]
    if _written_at(newest) < _changed(opts):
        return (
            f"the {phase.name} report of this job ({newest.file}) predates the last change to "
            "the input or the prompt"
        )
    first = newest.failed[0] if newest.failed else newest.result
    return f"{phase.name} {newest.result} on this job ({newest.file}): {first}"


def measured_rate(
    entries: Sequence[ReportEntry], opts: ValidateOptions, root: Path, prompt_sha256: str
) -> float | None:
    """Rows per second of the newest finished scale report of this input and prompt, None
    without one."""
    for e in sorted(entries, key=_written_at, reverse=True):
        if e.prompt_sha256 != prompt_sha256:
            continue
        job = e.data.get("job")
        rate = e.data.get("throughput_rps")
        if (
            e.phase == "scale"
            and e.finished
            and isinstance(job, Mapping)
            and _same_file(job.get("input"), opts.input, root)
            and isinstance(rate, int | float)
            and rate > 0
        ):
            return float(rate)
    return None


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def validate(
    opts: ValidateOptions,
    *,
    root: Path,
    say: Callable[[str], None] = print,
    run: Callable[[list[str]], int] | None = None,
) -> int:
    """Run the job's phases as `harness validate` does (see the module docstring); `run`: how a
    command runs (default a subprocess in `root`, its output on this terminal)."""
    # The job is checked once, here: a bad file stops validation before any phase starts.
    prompt = load_prompt(opts.prompt)
    table = read_candidates_csv(opts.input, opts.id_column)
    prompt.check_columns(table.columns, table.path)
    say(f"harness validate: {opts.input} ({len(table.rows)} rows, id column {opts.id_column}), "
        f"prompt {prompt.path or prompt.name} (sha256 {prompt.sha256[:12]})")  # fmt: skip
    if opts.phases is not None:
        known = {p.marker: p for p in PHASES}
        unknown = [m for m in opts.phases if m not in known]
        if unknown:
            raise ValueError(f"unknown phase {', '.join(unknown)}: choose {', '.join(known)}")
        phases = tuple(known[m] for m in opts.phases)
    else:
        phases = default_phases(opts.backend)
        for marker, why in STAND_IN_SKIPS.items():
            if all(p.marker != marker for p in phases):
                say(f"  left out: {marker} ({why}); --phases names the phases to run")
    # The profile the phases run under (a report of another, production's say, is another
    # measurement, not this one's).
    profile = opts.profile or default_profile(opts.backend or "embedded")
    runner = run or (lambda cmd: run_phase(cmd, root))
    report_dir = opts.report_dir if opts.report_dir.is_absolute() else root / opts.report_dir
    failed: list[str] = []
    for i, phase in enumerate(phases, 1):
        entries = read_reports(report_dir) if report_dir.is_dir() else []
        done = fresh_pass(entries, phase, opts, prompt_sha256=prompt.sha256, root=root,
                          profile=profile)  # fmt: skip
        head = f"[{i}/{len(phases)}] {phase.name}"
        if done is not None:
            say(f"{head}: skipped, a fresh passing report of this job: {done.file} "
                f"({done.generated_at})")  # fmt: skip
            continue
        cmd = phase_command(opts, phase)
        say(f"{head}: {' '.join(cmd[2:]) if cmd[:1] == [sys.executable] else ' '.join(cmd)}")
        rate = measured_rate(entries, opts, root, prompt.sha256)
        if rate is not None and phase.rows is not None:
            say(f"  {phase.rows} rows at {rate:.2f} rows/s (measured so far): about "
                f"{_duration(phase.rows / rate)}")  # fmt: skip
        if opts.dry_run:
            continue
        start = time.monotonic()
        try:
            rc = runner(cmd)
        except KeyboardInterrupt:
            say("harness validate: interrupted; run the same command again to go on where it "
                "stopped (finished phases are skipped)")  # fmt: skip
            return 130
        say(f"  {phase.name}: {'PASS' if rc == 0 else f'FAIL (pytest exit {rc})'} in "
            f"{_duration(time.monotonic() - start)}")  # fmt: skip
        if rc == PYTEST_INTERRUPTED:
            say("harness validate: interrupted; run the same command again to go on")
            return 130
        if rc == PYTEST_USAGE_ERROR:
            return 2  # the next phase's command would be refused the same way
        if rc != 0:
            failed.append(phase.name)
    if opts.dry_run:
        return 0
    config = opts.config or root / DEFAULT_CONFIG_PATH
    say("")
    for line in verdict(report_dir, config, prompt=opts.prompt).lines():
        say(line)
    record_job(
        config,
        JobRecord(
            input=opts.input.resolve(),
            prompt=opts.prompt.resolve() if opts.prompt is not None else None,
            prompt_sha256=prompt.sha256,
            id_column=opts.id_column,
            profile=profile,
            backend=opts.backend or "embedded",
            model=opts.model or default_model(opts.backend or "embedded"),
            base_url=opts.base_url,
            report_dir=report_dir,
            validated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
    )
    say(f"harness validate: job recorded in {config}: `harness run {opts.input}` runs it "
        "with no flags")  # fmt: skip
    if failed:
        say(f"harness validate: failed: {', '.join(failed)}")
    return 1 if failed else 0


@dataclass(frozen=True, slots=True)
class Validation:
    """What `harness run`'s banner says of the job it is about to run (`validation_status`)."""

    state: str
    """`GO`, `stand-in` (every phase passed on the stand-in: not measured for production) or
    `not validated`."""
    line: str

    @property
    def go(self) -> bool:
        return self.state == "GO"


def _first(reasons: Sequence[str]) -> str:
    return reasons[0] if reasons else "no reason given"


def validation_status(
    config: Path,
    input: Path,
    *,
    prompt: Path | None,
    prompt_sha256: str,
    id_column: str,
    profile: str,
    backend: str,
    model: str | None = None,
    root: Path | None = None,
) -> Validation:
    """Whether the job `harness run` is about to run is the one `harness validate` recorded in
    `config`, with a fresh passing report of it for every phase its profile requires, and what
    the verdict of that report folder is. The first reason it is not comes first."""
    record = find_job(config, input)
    shown = "the packaged rubric"
    if record is None:
        return Validation("not validated", f"not validated: no `harness validate {input}` "
                          f"recorded in {config}")  # fmt: skip
    if record.prompt_sha256 != prompt_sha256:
        return Validation(
            "not validated",
            f"not validated: the prompt {prompt or shown} (sha256 {prompt_sha256[:12]}) is not "
            f"the one validated, {record.prompt or shown} (sha256 {record.prompt_sha256[:12]})",
        )
    differ = [
        f"{what} {now!r}, validated with {then!r}"
        for what, now, then in (
            ("id column", id_column, record.id_column),
            ("profile", profile, record.profile),
            ("backend", backend, record.backend),
            ("model", model, record.model),
        )
        if then is not None and now is not None and now != then
    ]
    if differ:
        return Validation("not validated", f"not validated: {'; '.join(differ)}")
    report_dir = record.report_dir
    if not report_dir.is_dir():
        return Validation("not validated", f"not validated: {report_dir} is gone")
    entries = read_reports(report_dir)
    opts = ValidateOptions(input=input, prompt=prompt, id_column=id_column)
    where = root or Path.cwd()
    for phase in default_phases(record.backend or backend):
        if fresh_pass(entries, phase, opts, prompt_sha256=prompt_sha256, root=where,
                      profile=record.profile) is None:  # fmt: skip
            why = why_not_passed(entries, phase, opts, prompt_sha256=prompt_sha256, root=where,
                                 profile=record.profile, report_dir=report_dir)  # fmt: skip
            return Validation("not validated", f"not validated: {why}")
    when = record.validated_at[:10]
    if record.profile != PRODUCTION_PROFILE:
        return Validation(
            "stand-in",
            f"validated on the stand-in: not measured for production ({report_dir}, {when}; "
            f"profile {record.profile})",
        )
    result = verdict(report_dir, config, prompt=prompt)
    if result.decision == "GO":
        return Validation("GO", f"validated: GO ({report_dir}, {when})")
    return Validation(
        "not validated", f"not validated: verdict {result.decision}: {_first(result.reasons)}"
    )
