"""`harness validate INPUT`: the profile's phases on the user's job, skipping what already
passed on it, then the verdict. The phases' pytest runs are stood in for by a runner that
writes what a phase's report would say of the job (`job`, `prompt`, result)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_job_rows import make_job

from harness.cli import build_parser
from harness.config import find_job
from harness.run.given import given
from harness.run.options import BatchOptions, batch_config, with_validated_job
from harness.validate import (
    PHASES,
    ValidateOptions,
    default_phases,
    run_phase,
    validate,
    validation_status,
)
from harness.verdict import Verdict
from harness.workload import load_prompt

ROOT = Path(__file__).resolve().parent.parent


def marker_of(cmd: list[str]) -> str:
    """The phase's marker in its pytest command (`python -m pytest SUITE -m MARKER ...`)."""
    return cmd[cmd.index("-m", 3) + 1]


class Phases:
    """Runs nothing: notes each command and writes the report its phase would (PASS unless the
    phase's marker is in `fail`; pytest's `rc` for the one in `stop`)."""

    def __init__(
        self,
        root: Path,
        fail: tuple[str, ...] = (),
        stop: str | None = None,
        profile: str = "embedded",
    ) -> None:
        self.root, self.fail, self.stop, self.profile = root, fail, stop, profile
        self.ran: list[list[str]] = []

    def __call__(self, cmd: list[str]) -> int:
        self.ran.append(cmd)
        marker = marker_of(cmd)
        if marker == self.stop:
            return 2  # pytest's exit code for Ctrl-C
        phase = next(p for p in PHASES if p.marker == marker)
        arg = dict(itertools.pairwise(cmd))
        prompt = load_prompt(arg.get("--harness-prompt"))
        passed = marker not in self.fail
        report = {
            "phase": "scale" if marker.startswith("scale") else marker,
            "profile": self.profile,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "criteria": [{"metric": "x", "op": ">=", "threshold": 1, "value": 1,
                          "passed": passed}],
            "passed": passed,
            "backend": {"name": "embedded", "model": "gemma3-270m"},
            "prompt": {"name": prompt.name, "sha256": prompt.sha256},
            "job": {"input": arg["--harness-input"], "id_column": arg["--harness-id-column"]},
            "throughput_rps": 2.5,
        }  # fmt: skip
        folder = self.root / arg["--harness-report-dir"]
        folder.mkdir(parents=True, exist_ok=True)
        name = phase.report.replace(".json", f".{self.profile}.gemma3-270m.json")
        (folder / name).write_text(json.dumps(report))
        return 0 if passed else 1


def options(tmp: Path, **kw: object) -> ValidateOptions:
    cands, rubric = make_job(tmp, rows=20)
    return ValidateOptions(input=cands, prompt=rubric, id_column="candidate_id", **kw)  # type: ignore[arg-type]


def test_each_phase_runs_as_a_printed_pytest_command_on_your_job_then_the_verdict(
    tmp_path: Path,
) -> None:
    opts = options(tmp_path)
    runner, said = Phases(tmp_path), []
    assert validate(opts, root=tmp_path, say=said.append, run=runner) == 0
    markers = [marker_of(cmd) for cmd in runner.ran]
    assert markers == [p.marker for p in default_phases(None)]
    assert "scale_10k" not in markers  # the stand-in's: hours on a CPU, said so
    assert any("left out: scale_10k" in line for line in said)
    for cmd in runner.ran:
        assert cmd[1:3] == ["-m", "pytest"]
        assert cmd[cmd.index("--harness-input") + 1] == str(opts.input.resolve())
        assert cmd[cmd.index("--harness-prompt") + 1] == str(opts.prompt.resolve())  # type: ignore[union-attr]
        assert cmd[cmd.index("--harness-id-column") + 1] == "candidate_id"
        assert " ".join(cmd[2:]) in "\n".join(said)  # printed before it ran
        # Phase 1 writes what it measured: the scale phases compare memory with its line.
        assert ("--harness-write-config" in cmd) == (marker_of(cmd) == "context_limits")
    assert not any(" 100 rows at " in line for line in said)  # no scale rate measured yet
    assert any("1000 rows at 2.50 rows/s (measured so far): about 6m40s" in s for s in said)
    assert any(line.startswith("verdict:") for line in said), said


def test_a_rerun_skips_the_phases_that_passed_on_this_job_and_reruns_when_it_changed(
    tmp_path: Path,
) -> None:
    opts = options(tmp_path)
    first = Phases(tmp_path, fail=("quality",))
    assert validate(opts, root=tmp_path, say=lambda _: None, run=first) == 1
    again, said = Phases(tmp_path), []
    assert validate(opts, root=tmp_path, say=said.append, run=again) == 0
    assert [marker_of(c) for c in again.ran] == ["quality"]  # the one that failed
    assert sum("skipped, a fresh passing report of this job" in s for s in said) == 4
    # Another prompt is another job: nothing is skipped.
    other = tmp_path / "other.yaml"
    other.write_text(opts.prompt.read_text().replace("1 to 10", "one to ten"))  # type: ignore[union-attr]
    third = Phases(tmp_path)
    mine = ValidateOptions(input=opts.input, prompt=other, id_column="candidate_id")
    validate(mine, root=tmp_path, say=lambda _: None, run=third)
    assert len(third.ran) == len(default_phases(None))
    # Another profile's passing reports of the same job (production's) are another measurement.
    other_profile = tmp_path / "elsewhere"
    other_profile.mkdir()
    cands, rubric = make_job(other_profile, rows=20)
    mine = ValidateOptions(input=cands, prompt=rubric, id_column="candidate_id")
    validate(mine, root=other_profile, say=lambda _: None,
             run=Phases(other_profile, profile="gpu-gemma3-12b"))  # fmt: skip
    fifth = Phases(other_profile)
    validate(mine, root=other_profile, say=lambda _: None, run=fifth)
    assert len(fifth.ran) == len(default_phases(None))
    # The input changed after the reports: they are stale.
    later = time.time() + 5
    os.utime(opts.input, (later, later))
    fourth = Phases(tmp_path)
    validate(opts, root=tmp_path, say=lambda _: None, run=fourth)
    assert len(fourth.ran) == len(default_phases(None))


def test_an_interrupted_validation_stops_and_goes_on_where_it_stopped(tmp_path: Path) -> None:
    opts = options(tmp_path)
    said: list[str] = []
    assert (
        validate(opts, root=tmp_path, say=said.append, run=Phases(tmp_path, stop="quality")) == 130
    )
    assert "run the same command again" in said[-1]
    rest = Phases(tmp_path)
    assert validate(opts, root=tmp_path, say=lambda _: None, run=rest) == 0
    assert [marker_of(c) for c in rest.ran] == ["quality", "reliability"]


def test_a_production_backend_runs_every_phase_and_a_list_runs_those() -> None:
    assert [p.marker for p in default_phases("ollama")] == [p.marker for p in PHASES]
    assert "scale_10k" in [p.marker for p in default_phases("ollama")]


def test_harness_validate_refuses_a_bad_job_naming_the_file(tmp_path: Path) -> None:
    cands, rubric = make_job(tmp_path)
    for args, where in (
        ([str(cands), "--prompt", str(rubric)], "cands.csv:1: id column 'id' is missing"),
        ([str(cands), "--id-column", "candidate_id", "--phases", "scale_3"], "unknown phase"),
        ([str(tmp_path / "no.csv")], "no.csv"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "harness", "validate", *args, "--dry-run"],
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert where in done.stderr and done.stderr.count("\n") == 1


def test_a_dry_run_prints_the_commands_and_runs_nothing(tmp_path: Path) -> None:
    cands, rubric = make_job(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "harness", "validate", str(cands), "--prompt", str(rubric),
         "--id-column", "candidate_id", "--report-dir", str(tmp_path / "r"), "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("pytest suites/") == len(default_phases(None))
    assert not (tmp_path / "r").exists()


def status_of(opts: ValidateOptions, root: Path, prompt: Path | None = None, **kw: str) -> str:
    """What `harness run`'s banner would say of running `opts`'s job (`prompt` instead)."""
    used = prompt or opts.prompt
    args: dict[str, str] = {"id_column": "candidate_id", "profile": "embedded",
                            "backend": "embedded", **kw}  # fmt: skip
    return validation_status(
        root / "harness.yaml",
        opts.input,
        prompt=used,
        prompt_sha256=load_prompt(used).sha256,
        root=root,
        **args,  # type: ignore[arg-type]
    ).line


def test_a_validated_job_is_recorded_and_the_banner_says_what_it_is(tmp_path: Path) -> None:
    opts = options(tmp_path)
    assert status_of(opts, tmp_path).startswith("not validated: no `harness validate")
    said: list[str] = []
    assert validate(opts, root=tmp_path, say=said.append, run=Phases(tmp_path)) == 0
    assert any("job recorded in" in s for s in said)
    record = find_job(tmp_path / "harness.yaml", opts.input)
    assert record is not None
    assert (record.prompt, record.id_column, record.profile) == (
        opts.prompt.resolve(),  # type: ignore[union-attr]
        "candidate_id",
        "embedded",
    )
    line = status_of(opts, tmp_path)
    assert line.startswith("validated on the stand-in: not measured for production"), line
    # Another prompt: not validated, naming it.
    other = tmp_path / "other.yaml"
    other.write_text(opts.prompt.read_text().replace("1 to 10", "one to ten"))  # type: ignore[union-attr]
    line = status_of(opts, tmp_path, prompt=other)
    assert line.startswith("not validated: the prompt") and "other.yaml" in line, line
    # Another id column, another model: not validated, naming what differs.
    assert "id column 'id', validated with 'candidate_id'" in status_of(
        opts, tmp_path, id_column="id"
    )
    assert "model 'm2'" in status_of(opts, tmp_path, model="m2")
    # The input edited after the reports: they no longer measured it.
    later = time.time() + 5
    os.utime(opts.input, (later, later))
    line = status_of(opts, tmp_path)
    assert line.startswith("not validated: the context limits report of this job"), line
    assert line.endswith("predates the last change to the input or the prompt"), line


def test_a_failed_phase_leaves_the_job_not_validated(tmp_path: Path) -> None:
    opts = options(tmp_path)
    assert validate(opts, root=tmp_path, say=lambda _: None,
                    run=Phases(tmp_path, fail=("quality",))) == 1  # fmt: skip
    line = status_of(opts, tmp_path)
    assert line.startswith("not validated: quality FAIL on this job (quality_results."), line
    # A phase never run on this job: there is none to read.
    other = tmp_path / "other"
    other.mkdir()
    mine = options(other, phases=("context_limits",))
    assert validate(mine, root=other, say=lambda _: None, run=Phases(other)) == 0
    line = status_of(mine, other)
    assert line.startswith("not validated: no scale 100 report of this job in "), line


def test_on_production_only_the_verdict_makes_it_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(tmp_path, profile="gpu-gemma3-12b", backend="ollama")
    run = Phases(tmp_path, profile="gpu-gemma3-12b")
    assert validate(opts, root=tmp_path, say=lambda _: None, run=run) == 0
    assert len(run.ran) == len(PHASES)  # scale_10k too: a production backend
    kw = {"profile": "gpu-gemma3-12b", "backend": "ollama"}
    # These reports are not a production set (their model, their criteria): the verdict says
    # NO-GO or incomplete, and so does the banner.
    line = status_of(opts, tmp_path, **kw)
    assert line.startswith("not validated: verdict "), line
    import harness.validate as v

    go = Verdict("GO", ["every phase passed"], [], [], [])
    monkeypatch.setattr(v, "verdict", lambda *a, **k: go)
    validation = validation_status(
        tmp_path / "harness.yaml", opts.input, prompt=opts.prompt,
        prompt_sha256=load_prompt(opts.prompt).sha256, id_column="candidate_id",
        root=tmp_path, **kw,
    )  # fmt: skip
    assert validation.go and validation.line.startswith("validated: GO ("), validation
    # The verdict GO does not make a stand-in-validated job GO.
    assert not v.validation_status(
        tmp_path / "none.yaml", opts.input, prompt=opts.prompt,
        prompt_sha256=load_prompt(opts.prompt).sha256, id_column="candidate_id",
        root=tmp_path, **kw,
    ).go  # fmt: skip


def test_harness_run_runs_the_validated_job_with_no_flags_and_require_go_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(tmp_path)
    assert validate(opts, root=tmp_path, say=lambda _: None, run=Phases(tmp_path)) == 0
    monkeypatch.chdir(tmp_path)  # harness run reads harness.yaml where the user stands
    args = build_parser().parse_args(["run", str(opts.input)])
    kw = with_validated_job(opts.input, given(args, "run"))
    assert (kw["prompt"], kw["id_column"]) == (opts.prompt.resolve(), "candidate_id")  # type: ignore[union-attr]
    assert set(kw["from_validated"]) >= {"prompt", "id_column", "backend", "model"}
    # The banner says the validated job set them, not the command line.
    cfg = batch_config(BatchOptions(input=opts.input, **kw))
    assert cfg.model.source == cfg.backend.source == "the validated job, harness.yaml jobs"
    args = build_parser().parse_args(["run", str(opts.input), "--model", "gemma3-270m"])
    cfg = batch_config(
        BatchOptions(input=opts.input, **with_validated_job(opts.input, given(args, "run")))
    )
    assert cfg.model.source == "command line"
    # The command line wins over the record.
    args = build_parser().parse_args(["run", str(opts.input), "--id-column", "x"])
    assert with_validated_job(opts.input, given(args, "run"))["id_column"] == "x"
    # Nothing recorded for another input: the defaults.
    other = tmp_path / "other.csv"
    other.write_text("id,resume_text\n1,a\n")
    args = build_parser().parse_args(["run", str(other)])
    kw = with_validated_job(other, given(args, "run"))
    assert (kw["prompt"], kw["id_column"], kw["backend"]) == (None, "id", "embedded")
    # --require-go: exit 2 before anything is created, naming why (the stand-in is not GO).
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(opts.input), "--require-go"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--require-go: validated on the stand-in: not measured for production" in done.stderr
    assert not list(tmp_path.glob("cands_*"))  # no scores, no results


def test_with_no_prompt_named_the_phases_send_the_packaged_rubric_not_an_earlier_jobs(
    tmp_path: Path,
) -> None:
    """The pytest options take a validated job's prompt when none is named; `harness validate`
    without --prompt means the packaged rubric, so each phase's command names it."""
    from harness.workload import DEFAULT_PROMPT_PATH

    opts = options(tmp_path)
    assert validate(opts, root=tmp_path, say=lambda _: None, run=Phases(tmp_path)) == 0
    again = ValidateOptions(input=opts.input, id_column="candidate_id", dry_run=True)
    said: list[str] = []
    assert validate(again, root=tmp_path, say=said.append, run=Phases(tmp_path)) == 0
    commands = [line for line in said if "--harness-prompt" in line]
    assert commands and all(str(DEFAULT_PROMPT_PATH.resolve()) in c for c in commands)


def test_harness_doctor_checks_the_validated_job_of_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import harness.doctor
    from harness.cli import main

    opts = options(tmp_path)
    assert validate(opts, root=tmp_path, say=lambda _: None, run=Phases(tmp_path)) == 0
    monkeypatch.chdir(tmp_path)  # where harness validate recorded it (harness.yaml)
    seen: list[BatchOptions] = []
    monkeypatch.setattr(harness.doctor, "doctor", lambda o: seen.append(o) or [])
    assert main(["doctor", str(opts.input)]) == 0
    (got,) = seen
    assert (got.prompt, got.id_column) == (opts.prompt.resolve(), "candidate_id")  # type: ignore[union-attr]
    assert {"prompt", "id_column", "backend", "model"} <= set(got.from_validated)
    assert "from the validated job" in capsys.readouterr().out
    # Without INPUT: generated rows, the defaults (no job to take).
    assert main(["doctor"]) == 0
    assert seen[1].id_column == "id" and seen[1].from_validated == ()


CHILD = """
import pathlib, signal, sys, time
here = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    with (here / "signals").open("a") as fh:
        fh.write("INT\\n")
    time.sleep(0.5)  # a teardown: stopping servers, writing what ran
    (here / "stopped").write_text("cleanly")
    sys.exit(2)
signal.signal(signal.SIGINT, stop if sys.argv[2] == "stops" else signal.SIG_IGN)
(here / "ready").write_text("")
time.sleep(60)
"""


@pytest.mark.parametrize("child", ["stops", "ignores"])
def test_ctrl_c_reaches_a_phase_once_and_waits_for_it_to_stop(tmp_path: Path, child: str) -> None:
    """A phase gets one SIGINT and its teardown's time; one that does not stop is killed after
    the grace period. (Before, validate killed pytest 0.25 s after Ctrl-C, mid-teardown.)"""
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C reaches validate only

    threading.Thread(target=interrupt, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_phase([sys.executable, str(script), str(tmp_path), child], tmp_path, grace_s=3)
    waited = time.monotonic() - start
    if child == "stops":
        assert (tmp_path / "signals").read_text() == "INT\n"  # once, from validate
        assert (tmp_path / "stopped").read_text() == "cleanly"
    else:
        assert not (tmp_path / "stopped").exists()
        assert waited >= 3  # the grace period, then killed
    assert waited < 30
