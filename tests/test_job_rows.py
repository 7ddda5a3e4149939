"""Your job in every phase: the user's CSV, prompt and id column laid over each scenario.

`--harness-input`, `--harness-prompt` and `--harness-id-column` make every phase draw its rows
from the user's file (a seeded sample; a phase larger than the file cycles it, each repeat
marked so no prefix cache serves it as new) and send the user's prompt, and every report names
them; without them a report says its rows were generated, not the user's.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from harness.phases.common import (
    GENERATED_ROWS,
    REPEAT_MARK,
    items_for,
    job_identity,
    prompt_for,
    reply_tokens,
    table_for,
)
from harness.scenarios import load_scenario

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]

RUBRIC = """\
name: my-rubric-v1
system: |
  You score candidates for a data platform role from 1 to 10. Reply with JSON: {"score": N}.
user_template: |
  Years: {years}
  {resume_text}
output_schema:
  type: object
  properties:
    score: {type: integer, minimum: 1, maximum: 10}
  required: [score]
  additionalProperties: false
"""


def make_job(folder: Path, rows: int = 12) -> tuple[Path, Path]:
    """A candidates CSV of the user's shape (`candidate_id,resume_text,years`) and a rubric."""
    cands = folder / "cands.csv"
    with cands.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["candidate_id", "resume_text", "years"])
        for i in range(rows):
            w.writerow([f"U{i:04d}", f"Résumé {i}: built pipelines, " * (5 + i % 7), i % 12])
    rubric = folder / "rubric.yaml"
    rubric.write_text(RUBRIC, encoding="utf-8")
    return cands, rubric


def job_of(cands: Path, rubric: Path) -> dict[str, str]:
    return {"candidates": str(cands), "prompt": str(rubric), "id_column": "candidate_id"}


def test_the_job_replaces_each_profiles_rows_prompt_and_id_column(tmp_path: Path) -> None:
    cands, rubric = make_job(tmp_path)
    quality = load_scenario(ROOT / "scenarios" / "quality.yaml")
    assert prompt_for(quality, "embedded").name == "quality-probe-v1"  # the profile's own
    mine = quality.with_job(job_of(cands, rubric))
    for profile in mine.profiles:
        wl = mine.workload_for(profile)
        assert (wl.candidates, wl.prompt, wl.id_column) == (str(cands), str(rubric), "candidate_id")
        assert prompt_for(mine, profile).name == "my-rubric-v1"
    assert mine.profile("embedded").options == quality.profile("embedded").options  # the phase's
    assert quality.with_job({}) is quality
    with pytest.raises(ValueError, match="not a job setting: strategy"):
        quality.with_job({"strategy": "stateless"})


def test_a_phase_draws_a_seeded_sample_of_your_rows_in_input_order(tmp_path: Path) -> None:
    cands, rubric = make_job(tmp_path, rows=12)
    scale = load_scenario(ROOT / "scenarios" / "phase2_scale_100.yaml").with_job(
        job_of(cands, rubric)
    )
    table = table_for(scale, "embedded", 5)
    ids = [r["candidate_id"] for r in table.rows]
    assert len(set(ids)) == 5 and ids == sorted(ids)  # distinct, in input order
    assert ids == [r["candidate_id"] for r in table_for(scale, "embedded", 5).rows]  # seeded
    assert ids != [f"U{i:04d}" for i in range(5)]  # a sample, not the head of the file
    items = items_for(scale, "embedded", 5)
    assert [it.custom_id for it in items] == ids
    assert items[0].messages[0]["content"].startswith("You score candidates")


def test_a_phase_larger_than_your_input_cycles_it_and_marks_each_repeat(tmp_path: Path) -> None:
    cands, rubric = make_job(tmp_path, rows=4)
    scale = load_scenario(ROOT / "scenarios" / "phase2_scale_100.yaml").with_job(
        job_of(cands, rubric)
    )
    items = items_for(scale, "embedded", 10)
    ids = [it.custom_id for it in items]
    assert ids == [*(f"U{i:04d}" for i in range(4)), *(f"U{i:04d}#1" for i in range(4)),
                   "U0000#2", "U0001#2"]  # fmt: skip
    first, again = items[0].messages[1]["content"], items[4].messages[1]["content"]
    assert first != again and again.replace(REPEAT_MARK.format(k=1), "", 1) == first
    # The repeat parts from its first sending right after the rubric: "Years: ..." is the
    # template's first shown column, so the mark sits at the very start of the user turn.
    assert again.startswith("Years: " + REPEAT_MARK.format(k=1))
    assert len({it.messages[1]["content"] for it in items}) == 10


def test_each_report_names_your_input_or_says_its_rows_were_generated(tmp_path: Path) -> None:
    cands, rubric = make_job(tmp_path, rows=7)
    scale = load_scenario(ROOT / "scenarios" / "phase2_scale_100.yaml")
    generated = job_identity(scale, "embedded")
    assert generated == {"input": None, "rows": GENERATED_ROWS, "given": [],
                         "structured": "none", "max_tokens": 8, "as_harness_run": {}}  # fmt: skip
    yours = job_identity(scale.with_job(job_of(cands, rubric)), "embedded", tmp_path)
    assert yours["input"] == "cands.csv" and yours["rows"] == "your input"
    assert yours["id_column"] == "candidate_id" and yours["input_rows"] == 7
    assert yours["given"] == ["candidates", "id_column", "prompt"]
    assert "seed" in yours["draw"] and "repeat" in yours["draw"]


# The real scale suite, its backend replaced by the in-process double (no server needed).
DOUBLE_CONFTEST = """\
from harness.pytest import HarnessSession
from harness.testing import InProcessDouble

HarnessSession.backend = lambda self, cfg: InProcessDouble()
"""


@pytest.fixture
def scale_project(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(ROOT / "scenarios", pytester.path / "scenarios")
    shutil.copy(ROOT / "suites" / "scale" / "test_scale.py", pytester.path / "test_scale.py")
    pytester.makeconftest(DOUBLE_CONFTEST)
    return pytester


def the_report(folder: Path) -> dict[str, object]:
    (path,) = (folder / "reports").glob("performance_benchmarks_100.embedded.*.json")
    report: dict[str, object] = json.loads(path.read_text())
    return report


def test_the_scale_suite_sends_your_rows_and_prompt_and_its_report_says_so(
    scale_project: pytest.Pytester,
) -> None:
    cands, rubric = make_job(scale_project.path, rows=30)
    result = scale_project.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "scale_100", "--harness-input", str(cands),
        "--harness-prompt", str(rubric), "--harness-id-column", "candidate_id",
    )  # fmt: skip
    assert result.ret in (0, 1), result.stderr.str()  # ran (the double's figures may not pass)
    report = the_report(scale_project.path)
    job = report["job"]
    assert isinstance(job, dict) and job["input"] == "cands.csv" and job["rows"] == "your input"
    assert job["id_column"] == "candidate_id" and job["input_rows"] == 30
    prompt = report["prompt"]
    assert isinstance(prompt, dict) and prompt["name"] == "my-rubric-v1"
    assert prompt["file"] == "rubric.yaml"
    # What the phase sends otherwise than harness run would, said: the stand-in's scale phase
    # sends Ollama's text form, harness run on the embedded server token ids.
    assert list(job["unlike_harness_run"]) == ["request_path"], job["unlike_harness_run"]
    assert job["unlike_harness_run"]["request_path"].startswith("text (")
    assert "harness run: tokens (" in job["unlike_harness_run"]["request_path"]


def test_the_pytest_options_take_the_validated_jobs_prompt_and_id_column(
    scale_project: pytest.Pytester,
) -> None:
    """`--harness-input` alone: the job `harness validate` recorded for that file gives the
    prompt and the id column, as it does to `harness run`, and the report names what it gave."""
    from harness.config import JobRecord, record_job
    from harness.workload import load_prompt

    cands, rubric = make_job(scale_project.path, rows=30)
    config = scale_project.path / "harness.yaml"
    record_job(config, JobRecord(input=cands.resolve(), prompt=rubric.resolve(),
                                 prompt_sha256=load_prompt(rubric).sha256,
                                 id_column="candidate_id", profile="embedded",
                                 backend="embedded"))  # fmt: skip
    result = scale_project.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "scale_100", "--harness-input", str(cands),
        "--harness-config", str(config),
    )  # fmt: skip
    assert result.ret in (0, 1), result.stderr.str()
    report = the_report(scale_project.path)
    job, prompt = report["job"], report["prompt"]
    assert isinstance(job, dict) and job["id_column"] == "candidate_id"
    assert job["from_validated"] == ["prompt", "id_column"]
    assert isinstance(prompt, dict) and prompt["name"] == "my-rubric-v1"


def test_without_an_input_the_scale_report_says_its_rows_were_generated(
    scale_project: pytest.Pytester,
) -> None:
    scale_project.runpytest_subprocess("-p", "no:cacheprovider", "-m", "scale_100")
    job = the_report(scale_project.path)["job"]
    assert isinstance(job, dict) and job["rows"] == GENERATED_ROWS and job["input"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--harness-id-column", "candidate_id"], "*give both*"),
        (["--harness-input", "{cands}", "--harness-id-column", "nope"], "*cands.csv*nope*"),
        (["--harness-input", "{cands}"], "*cands.csv*"),  # no `id` column: the default's
        (["--harness-input", "{missing}"], "*missing.csv*not found*"),
    ],
)
def test_a_bad_job_stops_the_run_before_any_phase_naming_the_file(
    scale_project: pytest.Pytester, args: list[str], message: str
) -> None:
    cands, _ = make_job(scale_project.path)
    given = [a.format(cands=cands, missing=scale_project.path / "missing.csv") for a in args]
    result = scale_project.runpytest_subprocess("-p", "no:cacheprovider", "-m", "scale_100", *given)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert not (scale_project.path / "reports").exists()


def test_the_job_is_sent_as_harness_run_sends_it_and_the_report_says_what_was_replaced(
    tmp_path: Path,
) -> None:
    """A scale scenario sends free text, 8 tokens, a rolling conversation; the job's phases send
    what `harness run` sends (the schema's grammar, the tokens it needs, stateless unless
    harness.yaml says otherwise), and each report names what the scenario had."""
    from harness.run.resolve import resolve
    from harness.workload import load_prompt, tokens_for_schema

    cands, rubric = make_job(tmp_path)
    scale = load_scenario(ROOT / "scenarios" / "phase2_scale_100.yaml")
    assert scale.workload_for("embedded").structured == "none"
    assert scale.strategy_for("embedded").name == "conversation"
    mine = scale.with_job(job_of(cands, rubric))
    for profile in mine.profiles:
        wl = mine.workload_for(profile)
        assert (wl.structured, wl.max_tokens) == ("grammar", None)
        assert mine.strategy_for(profile).name == "stateless"
        assert mine.strategy_for(profile).trim_interval == 50  # the phase's own settings stay
    items = items_for(mine, "embedded", 5)
    want = tokens_for_schema(load_prompt(rubric).output_schema)
    assert {it.max_tokens for it in items} == {want} and want != 8
    # Every reply length a phase asks for is this one (phase 1's reuse sweep's too).
    assert reply_tokens(mine, "embedded") == want and reply_tokens(scale, "embedded") == 8
    assert all(it.grammar and it.output_schema for it in items)
    ident = job_identity(mine, "embedded", tmp_path)
    assert ident["structured"] == "grammar"
    assert set(ident["as_harness_run"]) == {"structured", "max_tokens", "strategy"}
    assert ident["as_harness_run"]["strategy"].startswith("conversation (the scenario) -> ")
    # The strategy is laid over as the default: harness.yaml's STRATEGY wins, as in the run.
    cfg = resolve(profile="embedded", config_path=tmp_path / "none.yaml", scenario=mine)
    assert cfg.strategy.value == "stateless"
    conf = tmp_path / "harness.yaml"
    conf.write_text("profiles:\n  embedded:\n    STRATEGY: conversation\n")
    cfg = resolve(profile="embedded", config_path=conf, scenario=mine)
    assert cfg.strategy.value == "conversation"
    # Without a job nothing changes.
    assert job_identity(scale, "embedded")["as_harness_run"] == {}
    assert items_for(scale, "embedded", 2)[0].max_tokens == 8


def test_phase_1_fits_the_longest_rows_of_your_input(tmp_path: Path) -> None:
    """Phase 1 counts the tokens of the input's longest rows (by the characters of the columns
    the prompt shows), not of a sample: the longest prompt must fit the safe context."""
    from harness.phases.common import longest_rows

    cands, rubric = make_job(tmp_path, rows=40)
    limits = load_scenario(ROOT / "scenarios" / "phase1_context_limits.yaml")
    mine = limits.with_job(job_of(cands, rubric))
    table = longest_rows(mine, "embedded", 5)
    every = table_for(mine, "embedded", 40).rows
    by_size = sorted(every, key=lambda r: len(r["resume_text"]) + len(r["years"]), reverse=True)
    assert {r["candidate_id"] for r in table.rows} == {r["candidate_id"] for r in by_size[:5]}
    ids = [r["candidate_id"] for r in table.rows]
    assert ids == sorted(ids)  # in input order
    # Without a job: the rows the phase draws.
    assert len(longest_rows(limits, "embedded", 5).rows) == 5
    assert "longest_prompt_fits >= 1" in limits.profile("embedded").criteria


def test_the_longest_prompt_gate_fails_a_prompt_past_the_safe_context() -> None:
    from harness.phases.context_limits import longest_prompt_figures

    shape = {"prefix_tokens": 418.0, "max_tokens_per_exchange": 767.0}
    fits = longest_prompt_figures(shape, 26_214, 20, "cands.csv")
    assert fits["longest_prompt_tokens"] == 1185 and fits["longest_prompt_fits"] is True
    assert "20 longest rows of cands.csv" in fits["longest_prompt_rows"]
    over = longest_prompt_figures(shape, 1184, 20, None)
    assert over["longest_prompt_fits"] is False
    assert "not your input" in over["longest_prompt_rows"]
