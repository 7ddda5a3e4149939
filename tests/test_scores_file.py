"""The scores CSV is the user's (their id column's name, the columns they keep), written as the
run goes and whole at any SIGKILL; bad rows listed or set aside (`--on-bad-row skip`, the
rejects file, exit 3); resume follows an edited CSV row by row (`harness.run.rows`)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.errors import ConfigError
from harness.records import RequestRecord
from harness.run import execute
from harness.run.result import BAD_ROWS_SKIPPED
from harness.run.settings import RunConfig
from harness.scoresfile import ScoresAppender, ScoresLayout, kept_columns, write_scores
from harness.testing import InProcessDouble
from harness.workload import write_candidates_csv

COLUMNS = ("candidate_id", "name", "years", "skills", "resume")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def write_rows(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def candidates(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "candidate_id": f"K{i:05d}",
            "name": f"Name {i}",
            "years": str(i % 20),
            "skills": "python, sql" if i % 2 else "java",
            "resume": f"Worked {i % 20} years; led team {i}.",
        }
        for i in range(start, start + n)
    ]


PROMPT = """\
name: users-own
system: Score the candidate from 1 to 10. Reply as JSON.
user_template: |
  Name: {name}
  Years: {years}
  Skills: {skills}
  Resume: {resume}
output_schema:
  type: object
  properties:
    score: {type: integer, minimum: 1, maximum: 10}
  required: [score]
"""


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("rubric.yaml").write_text(PROMPT, encoding="utf-8")

    def make(cfg: RunConfig) -> InProcessDouble:
        return InProcessDouble()

    monkeypatch.setattr(execute, "open_backend", make)
    return tmp_path


ARGS = ["--no-progress", "--prompt", "rubric.yaml", "--id-column", "candidate_id"]


# -- the scores file is the user's -------------------------------------------------------------


def test_scores_keep_the_users_id_name_and_the_columns_asked_for_in_input_order(job: Path) -> None:
    rows = candidates(12)
    write_rows(Path("c.csv"), rows)
    assert main(["run", "c.csv", *ARGS, "--keep-columns", "name,years"]) == 0
    assert header(Path("c_scores.csv"))[:4] == ["candidate_id", "name", "years", "score"]
    assert "score_expected" not in header(Path("c_scores.csv"))  # decode gives no p
    got = read_csv(Path("c_scores.csv"))
    assert [r["candidate_id"] for r in got] == [r["candidate_id"] for r in rows]
    assert [(r["name"], r["years"]) for r in got] == [(r["name"], r["years"]) for r in rows]
    assert all(r["status"] == "ok" and r["score"] for r in got)
    assert main(["run", "c.csv", *ARGS, "--keep-columns", "all", "--output", "all.csv"]) == 0
    assert header(Path("all.csv"))[:5] == ["candidate_id", "name", "years", "skills", "resume"]


def test_a_kept_column_named_like_one_the_harness_writes_is_refused_naming_it(job: Path) -> None:
    with pytest.raises(ConfigError, match=r"column 'status' has the name of a column"):
        kept_columns("name,status", ("candidate_id", "name", "status"), "candidate_id", ("score",))
    with pytest.raises(ConfigError, match=r"'nope' is not a column of the input"):
        kept_columns("nope", ("candidate_id", "name"), "candidate_id", ("score",))
    assert kept_columns("all", ("candidate_id", "a", "b"), "candidate_id", ("score",)) == ("a", "b")
    write_rows(Path("c.csv"), [{**r, "years": r["years"]} for r in candidates(3)])
    before = sorted(p.name for p in job.iterdir())
    Path("s.csv").write_text("candidate_id,score,name\nK1,3,x\n", encoding="utf-8")
    assert main(["run", "s.csv", *ARGS, "--keep-columns", "all"]) == 2
    assert sorted(p.name for p in job.iterdir()) == sorted([*before, "s.csv"])  # nothing made


def test_a_batch_file_keeps_custom_id(job: Path) -> None:
    line = {"custom_id": "a1", "body": {"messages": [{"role": "user", "content": "hi"}]}}
    Path("b.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    assert main(["run", "b.jsonl", "--no-progress", "--structured", "none"]) == 0
    assert header(Path("b_scores.csv"))[0] == "custom_id"


def _record(cid: str, score: int) -> RequestRecord:
    return RequestRecord(cid, "ok", content=f'{{"score": {score}}}', parsed={"score": score})


def test_the_appender_writes_each_row_as_it_finishes_and_the_end_puts_them_in_input_order(
    tmp_path: Path,
) -> None:
    layout = ScoresLayout("candidate_id", ("name",))
    scores, results = tmp_path / "s.csv", tmp_path / "r.jsonl"
    kept = {"a": ("Ann",), "b": ("Bo",), "c": ("Cy",)}
    app = ScoresAppender(scores, layout, kept)
    with results.open("w") as fh:
        for i, cid in enumerate(["c", "a"]):  # finish order, not input order
            rec = _record(cid, 3 + i)
            fh.write(json.dumps(rec.to_batch_line(i)) + "\n")
            app.add(rec)
            # open at any time: a whole CSV, every row so far
            got = read_csv(scores)
            assert [r["candidate_id"] for r in got] == ["c", "a"][: i + 1]
    app.close()
    counts = write_scores(
        [("a", ("Ann",)), ("b", ("Bo",)), ("c", ("Cy",))], layout, results, scores
    )
    got = read_csv(scores)
    assert [(r["candidate_id"], r["name"], r["score"]) for r in got] == [
        ("a", "Ann", "4"),
        ("c", "Cy", "3"),
    ]
    assert (counts.done, counts.failed, counts.scored, counts.foreign) == (2, 0, 2, 0)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


KILLED = """
import sys
from harness.cli import main
from harness.run import execute
from harness.testing import InProcessDouble
execute.open_backend = lambda cfg: InProcessDouble(delay_s=0.002)
sys.exit(main(sys.argv[1:]))
"""


def test_the_scores_file_is_whole_at_any_sigkill(job: Path) -> None:
    """SIGKILL `harness run` at several points of a 3,000-row run (kept columns make lines of
    different lengths): each time the scores CSV parses, every line has every column, and its
    ids are ids of finished rows; the run resumed to its end gives every row once, in order."""
    rows = candidates(3000)
    write_rows(Path("c.csv"), rows)
    Path("kill.py").write_text(KILLED, encoding="utf-8")
    argv = [sys.executable, "kill.py", "run", "c.csv", *ARGS, "--keep-columns", "all"]
    seen: list[int] = []
    for more in (40, 400, 900):  # kill once the results grew by this many lines
        start = _lines(Path("c_results.jsonl"))
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _lines(Path("c_results.jsonl")) < start + more and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        cols = header(Path("c_scores.csv"))
        with Path("c_scores.csv").open(newline="", encoding="utf-8") as fh:
            lines = [line for line in list(csv.reader(fh))[1:] if line]  # blank: page padding
        cut = [line for line in lines if len(line) != len(cols)]
        assert not cut, f"lines cut short: {cut}"
        finished = {
            json.loads(raw)["custom_id"]
            for raw in Path("c_results.jsonl").read_bytes().splitlines(keepends=True)
            if raw.endswith(b"\n")
        }
        assert {line[0] for line in lines} <= finished
        seen.append(len(lines))
    assert 0 < seen[0] < seen[-1] < len(rows), f"the kills must land mid-run: {seen}"
    last = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert last.returncode == 0, last.stderr[-2000:]
    assert b"\n\n" not in Path("c_scores.csv").read_bytes()  # the end's rebuild: no padding
    got = read_csv(Path("c_scores.csv"))
    assert [r["candidate_id"] for r in got] == [r["candidate_id"] for r in rows]
    assert [r["resume"] for r in got] == [r["resume"] for r in rows]


# -- bad rows -----------------------------------------------------------------------------------


def _with_bad_rows(n: int, bad_every: int) -> tuple[str, int]:
    lines = [",".join(COLUMNS)]
    bad = 0
    for i, r in enumerate(candidates(n)):
        if i % bad_every == bad_every - 1:
            lines.append(f"{r['candidate_id']},only two")
            bad += 1
        else:
            lines.append(",".join(r[c] for c in COLUMNS).replace("python, sql", "python"))
    return "\n".join(lines) + "\n", bad


def test_every_bad_row_is_listed_in_one_error_or_set_aside_with_skip(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, bad = _with_bad_rows(60, 5)
    Path("c.csv").write_text(text, encoding="utf-8")
    assert main(["run", "c.csv", *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"{bad} bad rows in all" in err and "c.csv:6:" in err
    assert not Path("c_scores.csv").exists() and not Path("c_results.jsonl").exists()
    code = main(["run", "c.csv", *ARGS, "--on-bad-row", "skip"])
    out, err = capsys.readouterr()
    assert code == BAD_ROWS_SKIPPED == 3
    rejects = read_csv(Path("c_rejects.csv"))
    assert len(rejects) == bad
    assert rejects[0] == {
        "line": "6",
        "candidate_id": "K00004",
        "reason": "row has 2 fields, the header has 5",
    }
    assert len(read_csv(Path("c_scores.csv"))) == 60 - bad
    assert f"{60 - bad} done, 0 failed of {60 - bad} rows" in out
    assert f"{bad} bad input rows set aside" in out


# -- resume follows an edited CSV ---------------------------------------------------------------


def _sent(path: Path) -> list[str]:
    return [json.loads(raw)["custom_id"] for raw in path.read_text().splitlines()]


def test_rows_appended_to_a_finished_csv_run_alone(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(Path("c.csv"), candidates(10))
    assert main(["run", "c.csv", *ARGS]) == 0
    write_rows(Path("c.csv"), candidates(14))  # the next day's candidates appended
    capsys.readouterr()
    assert main(["run", "c.csv", *ARGS]) == 0
    assert "(10 resumed from earlier runs)" in capsys.readouterr().out
    assert _sent(Path("c_results.jsonl")) == [f"K{i:05d}" for i in range(14)]
    assert len(read_csv(Path("c_scores.csv"))) == 14


def test_a_row_changed_under_a_finished_id_refuses_naming_it_unless_rescore_changed(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = candidates(8)
    write_rows(Path("c.csv"), rows)
    assert main(["run", "c.csv", *ARGS]) == 0
    rows[3] = {**rows[3], "resume": "Rewritten resume."}
    rows.pop(6)
    write_rows(Path("c.csv"), rows)
    before = Path("c_results.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["run", "c.csv", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "1 row(s) changed since they were scored" in err and "'K00003' (line 5)" in err
    assert "--rescore-changed" in err
    assert Path("c_results.jsonl").read_bytes() == before  # nothing touched
    assert main(["run", "c.csv", *ARGS, "--rescore-changed"]) == 0
    out, err = capsys.readouterr()
    assert "1 rows changed since they were scored: scored again" in err
    assert "1 rows scored earlier are no longer in the input" in err
    assert "(6 resumed from earlier runs)" in out
    assert _sent(Path("c_results.replaced.jsonl")) == ["K00003"]
    assert _sent(Path("c_results.jsonl")).count("K00003") == 1
    assert [r["candidate_id"] for r in read_csv(Path("c_scores.csv"))] == [
        r["candidate_id"] for r in rows
    ]
    capsys.readouterr()
    assert main(["run", "c.csv", *ARGS]) == 0  # the rescored row is now the recorded one
    assert "(7 resumed from earlier runs)" in capsys.readouterr().out


def test_results_written_before_row_identities_still_resume_and_the_banner_says_so(
    job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rows(Path("c.csv"), candidates(6))
    assert main(["run", "c.csv", *ARGS, "--sample", "3"]) == 0
    Path("c_results.rows.json").unlink()  # as an earlier version left it
    capsys.readouterr()
    assert main(["run", "c.csv", *ARGS]) == 0
    out, err = capsys.readouterr()
    assert "(3 resumed from earlier runs)" in out
    assert "these results predate row identities: resumed by id as before" in err
    recorded: dict[str, Any] = json.loads(Path("c_results.rows.json").read_text())
    assert sorted(recorded) == [f"K{i:05d}" for i in range(6)]


def test_generated_candidates_keep_their_id_column_name(job: Path) -> None:
    write_candidates_csv("g.csv", 3, seed=1)
    assert main(["run", "g.csv", "--no-progress"]) == 0
    assert header(Path("g_scores.csv"))[0] == "id"


# -- memory per row ------------------------------------------------------------------------------


def _long_rows(path: Path, n: int, text_bytes: int) -> None:
    rows = candidates(n)
    for r in rows:
        r["resume"] = (r["resume"] + " ") * (text_bytes // len(r["resume"]))
    write_rows(path, rows)


def test_load_input_keeps_an_offset_per_row_not_its_text(job: Path) -> None:
    """3,000 rows of ~4 KB (12 MB): what load_input keeps is under 400 bytes a row (ids,
    identities, offsets, lines), never the rows' text; each item is built from the file."""
    import tracemalloc

    from harness.batchfiles import RowItems, load_input
    from harness.run.options import BatchOptions

    _long_rows(Path("big.csv"), 3000, 4000)
    assert Path("big.csv").stat().st_size > 11_000_000
    opts = BatchOptions(input=Path("big.csv"), prompt=Path("rubric.yaml"), id_column="candidate_id")
    tracemalloc.start()
    try:
        data = load_input(opts)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(data.items, RowItems) and len(data.items) == 3000
    print(f"\nload_input holds {held / 3000:.0f} bytes per row of ~4 KB (tracemalloc)")
    assert held / 3000 < 400, f"{held / 3000:.0f} bytes per row held"
    item = data.items[1234]
    assert item.custom_id == "K01234" and "led team 1234" in item.messages[-1]["content"]
    assert [it.custom_id for it in data.items[10:13]] == ["K00010", "K00011", "K00012"]


def test_a_row_edited_during_the_run_fails_naming_it_instead_of_sending_other_text(
    job: Path,
) -> None:
    from harness.batchfiles import load_input
    from harness.errors import InputError
    from harness.run.options import BatchOptions

    rows = candidates(5)
    write_rows(Path("c.csv"), rows)
    data = load_input(
        BatchOptions(input=Path("c.csv"), prompt=Path("rubric.yaml"), id_column="candidate_id")
    )
    assert data.items[2].custom_id == "K00002"
    rows[2]["resume"] = "Edited while the run read it."
    write_rows(Path("c.csv"), rows)
    with pytest.raises(InputError, match=r"row 'K00002' is not what it was .* changed during"):
        data.items[2]
    assert data.items[0].custom_id == "K00000"  # rows before it are where they were


def test_a_csv_whose_lines_end_in_cr_alone_runs_like_any_other(job: Path) -> None:
    """Excel's "CSV (Macintosh)" ends lines in CR alone (a quoted field may hold a newline)."""
    Path("mac.csv").write_bytes(
        b'candidate_id,name,years,skills,resume\rK1,a,1,b,"two\nlines"\rK2,c,2,d,e\rK3,f,3,g,h\r'
    )
    assert main(["run", "mac.csv", *ARGS, "--keep-columns", "resume"]) == 0
    got = read_csv(Path("mac_scores.csv"))
    assert [(r["candidate_id"], r["resume"]) for r in got] == [
        ("K1", "two\nlines"),
        ("K2", "e"),
        ("K3", "h"),
    ]


# -- the rows to review (logprobs mode) -----------------------------------------------------------


def test_a_logprobs_run_writes_the_least_confident_rows_to_review_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 39: the rows to read by hand. A third of the rows (by their text) get two scores
    within 0.03 of each other: exactly those are in <stem>_review.csv, least probable first."""
    import math
    import zlib

    from harness.backends.base import TokenChoice
    from harness.scoresfile import REVIEW_MARGIN, REVIEW_P

    def unsure(text: str) -> bool:
        return zlib.crc32(text.encode()) % 3 == 0

    def logprobs(request: Any, intended: str) -> list[TokenChoice]:
        first, second = (0.36, 0.33) if unsure(request.messages[-1]["content"]) else (0.8, 0.1)
        other = next(c for c in "5432167890" if c != intended)
        rest = 1.0 - first - second
        top = [(intended, first), (other, second), ("}", rest)]
        return [TokenChoice(c, math.log(p), ord(c)) for c, p in top][: request.top_logprobs or 1]

    monkeypatch.chdir(tmp_path)
    Path("rubric.yaml").write_text(PROMPT, encoding="utf-8")
    from harness.testing.doubles import char_tokenize

    def double(cfg: RunConfig) -> InProcessDouble:
        return InProcessDouble(logprobs=logprobs, tokenizer=char_tokenize)

    monkeypatch.setattr(execute, "open_backend", double)
    rows = candidates(30)
    write_rows(Path("c.csv"), rows)
    assert main(["run", "c.csv", *ARGS, "--score-mode", "logprobs"]) == 0
    assert "review: " in capsys.readouterr().out
    review = read_csv(Path("c_review.csv"))
    lines = [json.loads(x) for x in Path("c_results.jsonl").read_text().splitlines()]
    want = set()
    for line in lines:
        dist = sorted(line["harness"]["scoring"]["distribution"].values(), reverse=True)
        if dist[0] - dist[1] <= REVIEW_MARGIN or dist[0] < REVIEW_P:
            want.add(line["custom_id"])
    assert want and {r["candidate_id"] for r in review} == want
    assert len(want) < len(rows)  # the confident rows are not in it
    ps = [float(r["score_p"]) for r in review]
    assert ps == sorted(ps) and all("near-tie" in r["why"] for r in review)


def test_no_line_the_run_appends_crosses_a_page_so_a_kill_cannot_cut_one(tmp_path: Path) -> None:
    """A write within one page is copied whole or not at all when the process is killed: the
    appender starts a line that would cross a 4 KiB boundary on the next page (blank lines
    before it, which CSV readers skip)."""
    from harness.scoresfile import PAGE

    kept = {f"r{i}": ("x" * (50 + i * 7),) for i in range(300)}
    app = ScoresAppender(tmp_path / "s.csv", ScoresLayout("id", ("note",)), kept)
    for i in range(300):
        app.add(_record(f"r{i}", 1 + i % 10))
    app.close()
    data = (tmp_path / "s.csv").read_bytes()
    pos, crossing = 0, 0
    for line in data.splitlines(keepends=True):
        crossing += bool(line.strip()) and pos // PAGE != (pos + len(line) - 1) // PAGE
        pos += len(line)
    assert crossing == 0 and len(data) > 100 * PAGE
    assert [r["id"] for r in read_csv(tmp_path / "s.csv")] == [f"r{i}" for i in range(300)]
