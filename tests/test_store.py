"""The exactly-once results store and progress reporting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from harness.engine.progress import Progress, format_duration
from harness.engine.store import ResultsStore, read_results
from harness.errors import OutputError
from harness.fileio import atomic_write_json, atomic_write_text
from harness.records import RequestRecord


def rec(cid: str, ok: bool = True) -> RequestRecord:
    return RequestRecord(
        cid,
        "ok" if ok else "error",
        content='{"score": 3}',
        error=None if ok else "boom",
        error_type=None if ok else "TransientServerError",
        prompt_tokens=100,
        cached_tokens=90,
        raw={"server": "own body"} if ok else None,
        completion={"object": "chat.completion", "choices": []} if ok else None,
    )


def test_lines_are_openai_batch_output_plus_measurements(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultsStore(path) as store:
        store.write(rec("a"))
        store.write(rec("b", ok=False))
    a, b = list(read_results(path))
    assert a["custom_id"] == "a" and a["error"] is None
    # The body is the harness's chat.completion; the server's own reply is kept beside it,
    # under the harness's object, never as the body.
    assert a["response"]["status_code"] == 200
    assert a["response"]["body"] == {"object": "chat.completion", "choices": []}
    assert a["harness"]["server_reply"] == {"server": "own body"}
    assert a["harness"]["cached_tokens"] == 90
    assert b["response"] is None and "server_reply" not in b["harness"]
    assert b["error"] == {"code": "TransientServerError", "message": "boom"}


def test_resume_skips_done_ids_and_drops_a_cut_short_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultsStore(path) as store:
        store.write(rec("a"))
        store.write(rec("b", ok=False))
    with path.open("a") as fh:
        fh.write('{"id": "batch_req_3", "custom_id": "c", "respo')  # a crash mid-write
    store = ResultsStore(path).open()
    assert store.done == {"a", "b"}
    assert (store.previous_ok, store.previous_errors) == (1, 1)
    store.write(rec("c"))
    store.close()
    assert [line["custom_id"] for line in read_results(path)] == ["a", "b", "c"]
    assert path.read_text().count("\n") == 3


def test_a_line_cut_inside_a_character_is_dropped_not_an_error(tmp_path: Path) -> None:
    """A full disk (the reliability suite's 20 KB RLIMIT_FSIZE) can cut a line inside a
    multi-byte character: the complete lines are read, the torn one is skipped, and resuming
    drops it. A complete line that is not UTF-8 is still named as corrupt."""
    path = tmp_path / "r.jsonl"
    with ResultsStore(path) as store:
        store.write(rec("a"))
    torn = json.dumps({"custom_id": "b", "content": "Ø"}, ensure_ascii=False).encode()
    with path.open("ab") as fh:
        fh.write(torn[: torn.index("Ø".encode()) + 1])  # the first of Ø's two bytes
    assert [line["custom_id"] for line in read_results(path)] == ["a"]
    store = ResultsStore(path).open()
    assert store.done == {"a"}
    store.close()
    assert path.read_bytes().count(b"\n") == 1  # resuming cut the torn line off
    with path.open("ab") as fh:
        fh.write(b"\xd8\n")
    with pytest.raises(OutputError, match=r"r\.jsonl:2: results line is corrupt"):
        list(read_results(path))


def test_an_id_is_never_written_twice(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.jsonl") as store:
        store.write(rec("a"))
        with pytest.raises(OutputError, match="twice"):
            store.write(rec("a"))


def test_a_corrupt_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        json.dumps({"custom_id": "a"}) + "\n{not json}\n" + json.dumps({"custom_id": "c"}) + "\n"
    )
    with pytest.raises(OutputError, match=r"r\.jsonl:2: results line is corrupt"):
        ResultsStore(path).open()


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot open results file"):
        ResultsStore(blocker / "sub" / "r.jsonl").open()


def test_atomic_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_text(target, '{"a": 2}\n')
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_progress_logs_rate_savings_and_eta_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(4, desc="run", stream=out, tty=False, log_every_s=0.0)
    for i in range(4):
        progress.update(rec(f"x{i}"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("run: 4/4 (100.0%)")
    assert "savings 90.0%" in lines[-1] and "ETA 0:00:00" in lines[-1]


def test_eta_uses_the_recent_window() -> None:
    progress = Progress(1000, stream=io.StringIO(), tty=False, window_s=10.0)
    progress._window.clear()
    # 100 requests in the first minute, then 100 in the last 10 s: the ETA follows the latter.
    progress._window.extend([(0.0, 0), (60.0, 100)])
    progress._window.clear()
    progress._window.extend([(60.0, 100), (70.0, 200)])
    progress.done = 200
    assert progress.rate() == pytest.approx(10.0)
    assert progress.eta_s() == pytest.approx(80.0)
    assert format_duration(3723) == "1:02:03" and format_duration(None) == "?"


def test_progress_draws_a_bar_with_rate_and_eta_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(50, desc="run", stream=out, tty=True)
    for i in range(50):
        progress.update(rec(f"x{i}"))
    progress.close()
    text = out.getvalue()
    assert "run: 100%" in text and "50/50" in text
    assert "req/s" in text and "<00:00" in text  # rate, then elapsed<remaining (the ETA)
    assert "savings=90.0%" in text
