"""`harness run` killed and run again, on a real tiny-gemma3 server in a child process.

Every test here starts `python -m harness run ...` as a subprocess. Ctrl-C and SIGTERM stop it
cleanly (server included). SIGKILL gives the harness no chance to stop its embedded llama.cpp
server, which runs in its own session (`start_new_session=True`) and is left orphaned: these
tests capture the harness's child processes before the kill and kill them too (and say how many
were orphaned).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.engine.store import read_results
from harness.workload import write_candidates_csv

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data" / "batch"
SHORT_PROMPT = DATA / "short_prompt.yaml"


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Runs:
    """Starts `python -m harness run` children and cleans up every process they left."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.leftovers: list[psutil.Process] = []
        self.orphaned: list[str] = []

    def start(self, cwd: Path, *args: str, log: str = "run") -> subprocess.Popen[str]:
        n = len(self.procs)
        with (cwd / f"{log}-{n}.out").open("w") as out, (cwd / f"{log}-{n}.err").open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "harness", "run", *args],
                cwd=cwd,
                stdout=out,
                stderr=err,
                text=True,
                # Ctrl-C works as in a terminal's foreground job even when the tests run in a
                # background job (`cmd &` starts its children with SIGINT ignored).
                preexec_fn=_sigint_default,
            )
        self.procs.append(proc)
        return proc

    def children(self, proc: subprocess.Popen[str]) -> list[psutil.Process]:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.leftovers += kids
        return kids

    def sigkill(self, proc: subprocess.Popen[str]) -> list[str]:
        """SIGKILL the harness, then the server it leaves behind; returns the orphans."""
        kids = self.children(proc)  # before the kill: afterwards they are re-parented
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        orphans = []
        for kid in kids:
            try:
                if kid.is_running() and kid.status() != psutil.STATUS_ZOMBIE:
                    orphans.append(f"pid {kid.pid} ({' '.join(kid.cmdline()[1:6])})")
                    kid.kill()
                    kid.wait(timeout=30)
            except psutil.NoSuchProcess:
                pass
        self.orphaned += orphans
        return orphans

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.children(proc)
                proc.kill()
                proc.wait(timeout=30)
        for kid in self.leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                kid.kill()


@pytest.fixture
def runs() -> Iterator[Runs]:
    r = Runs()
    try:
        yield r
    finally:
        r.cleanup()


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_lines(
    proc: subprocess.Popen[str], path: Path, n: int, timeout_s: float = 600.0
) -> int:
    """Wait until `path` has `n` complete lines; fail if the run ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        have = complete_lines(path)
        if have >= n:
            return have
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) with {have} of {n} lines")
        time.sleep(0.02)
    pytest.fail(f"{path} did not reach {n} lines in {timeout_s:.0f} s")


def by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in read_results(path)}


def all_ids(path: Path) -> list[str]:
    """custom_id of every line of the file, complete or not (a cut line fails json)."""
    return [json.loads(ln)["custom_id"] for ln in path.read_text().splitlines() if ln.strip()]


def scores_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def finish(proc: subprocess.Popen[str], timeout_s: float = 900.0) -> int:
    return proc.wait(timeout=timeout_s)


# One server thread: on a 2-core machine shared with other busy processes, llama.cpp's default
# (every core) spin-waits on its thread barrier and runs ~10x slower (0.95 vs 13.8 req/s seen).
TINY = ["--backend", "embedded", "--model", "tiny-gemma3", "--threads", "1"]


def test_sigkill_mid_run_then_resume_keeps_finished_rows_and_runs_each_id_once(
    tmp_path: Path, runs: Runs
) -> None:
    """Acceptance: killed with SIGKILL mid-run and run again: every id exactly once, and the
    rows finished before the kill keep their scores."""
    n = 16
    write_candidates_csv(tmp_path / "c.csv", n, seed=31)
    results = tmp_path / "c_results.jsonl"
    args = ["c.csv", *TINY, "--structured", "grammar"]
    proc = runs.start(tmp_path, *args)
    wait_for_lines(proc, results, 5)
    orphans = runs.sigkill(proc)
    before = by_id(results)
    assert 5 <= len(before) < n, "the kill must land mid-run"
    assert all(isinstance(ln["harness"]["parsed"]["score"], int) for ln in before.values())
    # The scores CSV was written as the rows finished: whole, one line per finished row.
    killed = scores_csv(tmp_path / "c_scores.csv")
    assert {r["id"] for r in killed} <= set(before) and len(killed) >= len(before) - 1
    assert all(None not in r.values() and int(r["score"]) >= 1 for r in killed)

    again = runs.start(tmp_path, *args)
    assert finish(again) == 0, (tmp_path / "run-1.err").read_text()[-2000:]
    ids = all_ids(results)
    dupes = [cid for cid, k in Counter(ids).items() if k > 1]
    assert not dupes
    assert sorted(ids) == [f"C{i:06d}" for i in range(n)]
    after = by_id(results)
    for cid, line in before.items():
        assert after[cid] == line, f"{cid} changed after the resume"
    rows = {r["id"]: r for r in scores_csv(tmp_path / "c_scores.csv")}
    assert len(rows) == n
    for cid, line in before.items():
        assert int(rows[cid]["score"]) == line["harness"]["parsed"]["score"]
    summary = (tmp_path / "run-1.out").read_text()
    assert f"{n} done, 0 failed of {n} rows ({len(before)} resumed from earlier runs)" in summary
    print(
        f"\nkilled after {len(before)} of {n} results; orphaned by SIGKILL (killed by the "
        f"test): {orphans or 'none'}\n{summary.strip()}"
    )


def test_two_runs_of_one_csv_started_together_one_runs_the_other_exits_2_naming_it(
    tmp_path: Path, runs: Runs
) -> None:
    """Acceptance (issue 27): two `harness run`s of one 40-row CSV started together (a second
    terminal, a cron job): one runs, the other exits 2 with one line naming the first's pid,
    and the results file has every id once. SIGKILL the first, start the second again: it
    runs and resumes (the lock died with the first)."""
    n = 40
    write_candidates_csv(tmp_path / "c.csv", n, seed=33)
    results = tmp_path / "c_results.jsonl"
    args = ["c.csv", *TINY, "--structured", "grammar", "--no-progress"]
    a = runs.start(tmp_path, *args, log="a")
    b = runs.start(tmp_path, *args, log="b")
    deadline = time.monotonic() + 120
    while a.poll() is None and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    assert loser.wait(timeout=60) == 2, "the second writer must exit 2"
    err_name = "a-0.err" if loser is a else "b-1.err"
    (line,) = (tmp_path / err_name).read_text().splitlines()
    assert line.startswith("harness run: error: the results file c_results.jsonl is in use")
    assert f"pid {winner.pid} (" in line and "c.csv" in line
    wait_for_lines(winner, results, 5)
    # SIGKILL the run alone: its llama.cpp server lives on, orphaned, while the second run
    # starts (it must not hold the lock: the descriptor is not inherited).
    kids = runs.children(winner)
    os.kill(winner.pid, signal.SIGKILL)
    winner.wait(timeout=30)
    orphans = [f"pid {k.pid}" for k in kids if k.is_running()]
    before = by_id(results)
    assert 5 <= len(before) < n, "the kill must land mid-run"
    again = runs.start(tmp_path, *args, log="again")
    assert finish(again) == 0, (tmp_path / "again-2.err").read_text()[-2000:]
    for kid in kids:  # the orphaned server, alive all along
        with contextlib.suppress(psutil.NoSuchProcess):
            kid.kill()
    ids = all_ids(results)
    assert not [cid for cid, k in Counter(ids).items() if k > 1]
    assert sorted(ids) == [f"C{i:06d}" for i in range(n)]
    summary = (tmp_path / "again-2.out").read_text()
    assert f"{n} done, 0 failed of {n} rows ({len(before)} resumed from earlier runs)" in summary
    assert not (tmp_path / "c_results.jsonl.lock").exists()
    print(
        f"\nstarted together: pid {loser.pid} exited 2: {line}\nSIGKILLed pid {winner.pid} "
        f"after {len(before)} of {n} (its server, orphaned and alive while the run resumed: "
        f"{orphans or 'none'}); then: {summary.strip()}"
    )


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_ctrl_c_or_sigterm_stops_cleanly_keeps_results_and_stops_the_server(
    tmp_path: Path, runs: Runs, signum: signal.Signals, code: int
) -> None:
    write_candidates_csv(tmp_path / "c.csv", 30, seed=32)
    results = tmp_path / "c_results.jsonl"
    proc = runs.start(tmp_path, "c.csv", *TINY, "--structured", "grammar")
    wait_for_lines(proc, results, 3)
    kids = runs.children(proc)
    assert kids, "the embedded server should be a child of the harness"
    os.kill(proc.pid, signum)
    assert finish(proc, 120) == code
    err = (tmp_path / "run-0.err").read_text()
    kept = len(list(read_results(results)))
    assert kept < 30
    assert (
        f"interrupted: {kept} results kept in c_results.jsonl; run the same command again to resume"
    ) in err
    assert "Traceback" not in err
    assert "run interrupted: " in (tmp_path / "run-0.out").read_text()
    assert len(scores_csv(tmp_path / "c_scores.csv")) == kept
    # A clean stop: the server child is gone too (no orphan).
    time.sleep(0.5)
    alive = [k.pid for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"server processes left running after {signum.name}: {alive}"


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_2000_requests_killed_three_times_resume_to_the_uninterrupted_replies(
    tmp_path: Path, runs: Runs
) -> None:
    """The engine issue's resume test: 2,000 requests, SIGKILL at three points, resumed to the
    end; every id exactly once, and (temperature 0, fixed seed) each reply equals the one of
    an uninterrupted run."""
    n = 2000
    kill_points = (400, 900, 1400)
    killed = tmp_path / "killed"
    straight = tmp_path / "straight"
    for d in (killed, straight):
        d.mkdir()
        write_candidates_csv(d / "c.csv", n, seed=2000)
    args = [
        "c.csv",
        *TINY,
        "--prompt",
        str(SHORT_PROMPT),
        "--structured",
        "none",
        "--max-tokens",
        "4",
        "--seed",
        "7",
        "--no-progress",
    ]
    results = killed / "c_results.jsonl"
    kept: dict[str, dict[str, Any]] = {}
    at_kill: list[int] = []
    orphans: list[str] = []
    first_after_restart: list[str] = []
    for point in kill_points:
        if at_kill:
            # The first request a restarted server sees runs on a cold prefix cache.
            first_after_restart.append(f"C{len(kept):06d}")
        proc = runs.start(killed, *args, log="killed")
        wait_for_lines(proc, results, point)
        orphans += runs.sigkill(proc)
        now = by_id(results)
        at_kill.append(len(now))
        assert point <= len(now) < n, "each kill must land mid-run"
        for cid, line in kept.items():
            assert now[cid] == line, f"{cid} changed after a resume"
        kept = now
    first_after_restart.append(f"C{len(kept):06d}")
    started = time.monotonic()
    last = runs.start(killed, *args, log="killed")
    assert finish(last) == 0
    resumed_s = time.monotonic() - started

    started = time.monotonic()
    ref = runs.start(straight, *args, log="straight")
    assert finish(ref) == 0
    straight_s = time.monotonic() - started

    ids = all_ids(results)
    assert not [cid for cid, k in Counter(ids).items() if k > 1], "duplicate ids"
    assert sorted(ids) == [f"C{i:06d}" for i in range(n)]
    got, want = by_id(results), by_id(straight / "c_results.jsonl")
    for cid, line in kept.items():
        assert got[cid] == line
    assert all(ln["error"] is None for ln in got.values())
    differ = [
        cid
        for cid in sorted(want)
        if got[cid]["harness"]["content"] != want[cid]["harness"]["content"]
    ]
    summary = (straight / f"straight-{len(runs.procs) - 1}.out").read_text().strip()
    print(
        f"\nkilled at {at_kill} result lines; orphaned servers killed by the test: "
        f"{len(orphans)}; last resume ran {n - at_kill[-1]} requests in {resumed_s:.0f} s; "
        f"uninterrupted run {straight_s:.0f} s\nuninterrupted: {summary}\n"
        f"replies differing from the uninterrupted run: {len(differ)} of {n}"
        + (
            f" (first: {differ[:10]}; first requests after restarts: {first_after_restart})"
            if differ
            else ""
        )
    )
    assert not differ, (
        f"{len(differ)} replies differ from the uninterrupted run, e.g. "
        + "; ".join(
            f"{cid}: {got[cid]['harness']['content']!r} != {want[cid]['harness']['content']!r}"
            for cid in differ[:5]
        )
    )
