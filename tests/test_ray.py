"""`harness run --executor ray` on a local Ray instance (this machine's 2 CPUs) against two
embedded tiny-gemma3 servers: the same ids, statuses and (near-ties aside) scores as the local
executor on the same input, and killed with SIGKILL then run again, every id once.

Ray is the `ray` extra (`pip install -e '.[ray]'`, which `make install` installs). `make test`
runs the first test at 60 rows (about a minute and a half on 2 cores); the acceptance size (300
rows) and the server-kill test take minutes and run on purpose: `pytest tests/test_ray.py -m slow`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.batch import BatchOptions, run_batch
from harness.engine.store import read_results
from harness.workload import write_candidates_csv

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
pytestmark = [pytest.mark.integration]

SHORT_PROMPT = Path(__file__).parent / "data" / "batch" / "short_prompt.yaml"


def scores(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {row.get("id") or row["custom_id"]: row for row in csv.DictReader(fh)}


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_tree(proc: subprocess.Popen[str]) -> int:
    """SIGKILL the run and everything it started (Ray's processes, the servers): a SIGKILL
    gives it no chance to stop them. Returns how many descendants were left to kill."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            kid.kill()
    psutil.wait_procs(kids, timeout=30)
    return len(kids)


@pytest.mark.parametrize(
    ("rows", "kill_at"),
    [pytest.param(60, 20, id="ci"), pytest.param(300, 60, id="300", marks=pytest.mark.slow)],
)
def test_ray_executor_matches_the_local_one_and_resumes_after_sigkill(
    tmp_path: Path, rows: int, kill_at: int
) -> None:
    src = write_candidates_csv(tmp_path / "c.csv", rows)
    common = {
        "model": "tiny-gemma3",
        "prompt": SHORT_PROMPT,
        "threads": 1,
        "servers": 2,
        "progress": False,
        "config": tmp_path / "no-harness.yaml",
    }
    t0 = time.perf_counter()
    local = run_batch(BatchOptions(src, output=tmp_path / "local.csv", **common))  # type: ignore[arg-type]
    local_s = time.perf_counter() - t0
    assert local.done == rows

    argv = [sys.executable, "-m", "harness", "run", str(src), "--executor", "ray"]
    argv += ["--servers", "2", "--threads", "1", "--model", "tiny-gemma3", "--no-progress"]
    argv += ["--prompt", str(SHORT_PROMPT), "--output", str(tmp_path / "ray.csv")]
    argv += ["--config", str(tmp_path / "no-harness.yaml")]
    results = tmp_path / "ray_results.jsonl"
    log = (tmp_path / "ray-1.err").open("w")
    first = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=log, text=True)
    deadline = time.monotonic() + 300
    while lines_in(results) < kill_at:
        assert first.poll() is None, (tmp_path / "ray-1.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "the Ray run wrote no results in 300 s"
        time.sleep(0.05)
    left = kill_tree(first)
    log.close()
    at_kill = lines_in(results)
    assert at_kill < rows, "the kill must land mid-run"

    t1 = time.perf_counter()
    second = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    ray_s = time.perf_counter() - t1
    assert second.returncode == 0, second.stderr[-3000:]

    ids = Counter(line["custom_id"] for line in read_results(results))
    assert len(ids) == rows and set(ids.values()) == {1}, "every id exactly once"
    mine, theirs = scores(tmp_path / "ray.csv"), scores(tmp_path / "local.csv")
    assert mine.keys() == theirs.keys()
    assert {k: v["status"] for k, v in mine.items()} == {k: v["status"] for k, v in theirs.items()}
    same = sum(mine[k]["score"] == theirs[k]["score"] for k in mine)
    # The results file is append-only: lines after the kill are the rerun's (its own servers).
    endpoints = {line["harness"].get("endpoint") for line in list(read_results(results))[at_kill:]}
    print(
        f"\nlocal executor: {rows} rows in {local_s:.1f} s; Ray: killed at {at_kill} result "
        f"lines ({left} processes left behind, killed by the test), rerun finished the "
        f"{rows - at_kill} others in {ray_s:.1f} s (Ray start included); scores equal for "
        f"{same}/{rows} rows ({same / rows:.1%}); servers seen: {len(endpoints)}\n"
        + second.stdout[-1500:]
    )
    assert same >= 0.98 * rows
    # The rerun's summary lists its two servers and how many rows each answered.
    summary = re.finditer(r"^endpoint (\S+): (\d+) rows", second.stdout, re.M)
    listed = {m[1]: int(m[2]) for m in summary}
    assert len(listed) == 2 and sum(listed.values()) == rows - at_kill, second.stdout[-1500:]
    assert None not in endpoints and endpoints <= listed.keys()
    if rows - at_kill >= 100:
        # Enough batches that both actors take some; with a few dozen rows one actor may take
        # them all while the other starts.
        assert len(endpoints) == 2


@pytest.mark.slow
def test_ray_executor_goes_on_when_one_of_two_servers_is_killed(tmp_path: Path) -> None:
    """A server SIGKILLed mid-run: the actor that had it as its own sends its rows to the
    other (its pool's failover); every id once, and the report shows when the server left."""
    import json
    import threading

    from harness.backends.embedded import EmbeddedServer
    from harness.backends.server import ServerSettings

    rows = 200
    servers = [
        EmbeddedServer(ServerSettings(model="tiny-gemma3", n_ctx=4096, threads=1)) for _ in range(2)
    ]
    try:
        for s in servers:
            s.start()
        src = write_candidates_csv(tmp_path / "c.csv", rows)
        results = tmp_path / "k_results.jsonl"
        killed: dict[str, Any] = {}

        def kill_at_60() -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if lines_in(results) >= 60:
                    killed["url"], killed["at"] = servers[1].url, time.time()
                    servers[1].kill()  # SIGKILL
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_at_60, daemon=True)
        watcher.start()
        argv = [sys.executable, "-m", "harness", "run", str(src), "--executor", "ray"]
        argv += ["--backend", "openai", "--base-url", ",".join(s.url or "" for s in servers)]
        argv += ["--prompt", str(SHORT_PROMPT), "--output", str(tmp_path / "k.csv")]
        argv += ["--config", str(tmp_path / "no-harness.yaml"), "--no-progress"]
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        watcher.join(timeout=5)
    finally:
        for s in servers:
            s.stop()
    assert killed, "the kill must land mid-run"
    ids = Counter(line["custom_id"] for line in read_results(results))
    assert len(ids) == rows and set(ids.values()) == {1}, "every id exactly once"
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{rows} done, 0 failed" in run.stdout, run.stdout[-2000:]
    report = json.loads((tmp_path / "k_results.endpoints.json").read_text())
    gone = next(ep for ep in report["endpoints"] if ep["endpoint"] == killed["url"])
    assert gone["up"] is False and gone["down_at"] >= killed["at"] - 0.5 and gone["down_reason"]
    late = [
        ln
        for ln in read_results(results)
        if ln["harness"].get("endpoint") == killed["url"]
        and ln["harness"]["started"] > gone["down_at"]
    ]
    assert not late, "no row may be sent to the server after it left"
    print(f"\nRay run with {killed['url']} SIGKILLed at 60 results:\n{run.stdout[-1500:]}")
