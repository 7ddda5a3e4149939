"""Hostile batch files: each fails fast with its reason and line, in `harness run` and in
`harness api`, and the service keeps answering.

The same files go to both tools, which read them through one streaming reader
(`harness.inputs`): a line nested 100,000 deep (Python's JSON parser raises RecursionError), a
2 GB line (a sparse file: no disk, no 2 GB of memory), binary garbage, UTF-16, an empty file.
`harness run` exits 2 with one line naming the file and line; the API fails the batch with the
line number (or refuses the upload where the upload itself is the problem: empty, over the
size limit, over the storage quota). A batch never stays `validating`: any exception of the
validation, or a deadline passed (restarts included), fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_api import (
    ApiProcess,
    client_for,
    create,
    double_settings,
    in_thread,
    in_thread_app,
    wait_batch,
)

from harness.api.store import BatchRow, FileRow, Store, new_batch_id, new_file_id, now
from harness.api.validate import check_input
from harness.cli import main
from harness.testing import InProcessDouble

GOOD = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}\n'  # noqa: E501
TWO_GB = 2 * 1024**3


def nested(path: Path) -> None:
    path.write_bytes(GOOD + b"[" * 100_000 + b"]" * 100_000 + b"\n")


def two_gb_line(path: Path) -> None:
    with path.open("wb") as fh:
        fh.write(GOOD)
        fh.truncate(len(GOOD) + TWO_GB)  # sparse: 2 GB of NUL bytes, no newline, no disk


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(64 * 1024))


def utf16(path: Path) -> None:
    path.write_bytes(GOOD.decode().encode("utf-16"))


HOSTILE: list[tuple[str, Callable[[Path], None], int, str, str]] = [
    # (case, writer, line, what harness run's line says, the batch error's code)
    ("nested 100,000 deep", nested, 2, "JSON nested too deeply to parse", "invalid_json_line"),
    ("a 2 GB line", two_gb_line, 2, "longer than 16000000 bytes", "line_too_long"),
    ("binary garbage", garbage, 1, "save the file as UTF-8", "invalid_file_format"),
    ("UTF-16", utf16, 1, "the file is UTF-16", "invalid_file_format"),
]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def memory_cap(headroom: int) -> Iterator[None]:
    """Address space capped for this process at what it maps now plus `headroom`: a reader
    that loaded the 2 GB line would fail. Not an absolute cap: late in a full test run the
    process already maps more than 1.5 GB (threads' stacks, libraries), and an absolute cap
    there left no room for the stack to grow, which is a segfault, not a MemoryError (seen
    once in `make test`, at this test's nested-100,000 case)."""
    mapped = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + headroom
    resource.setrlimit(
        resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard)
    )
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize(
    ("writer", "line", "says"),
    [pytest.param(w, n, says, id=case) for case, w, n, says, _ in HOSTILE]
    + [pytest.param(lambda p: p.write_bytes(b""), None, "input file is empty", id="empty")],
)
def test_harness_run_exits_2_with_one_line_naming_the_line(
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    writer: Callable[[Path], None],
    line: int | None,
    says: str,
) -> None:
    path = in_tmp / "b.jsonl"
    writer(path)
    started = time.monotonic()
    code = main(["run", "b.jsonl", "--model", "tiny-gemma3", "--no-progress"])
    took = time.monotonic() - started
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    where = f"b.jsonl:{line}: " if line is not None else "b.jsonl: "
    assert lines[0].startswith(f"harness run: error: {where}"), lines[0]
    assert says in lines[0]
    assert sorted(p.name for p in in_tmp.iterdir()) == ["b.jsonl"]  # nothing created
    print(f"\nharness run on {path.stat().st_size} bytes: exit 2 in {took:.2f} s: {lines[0]}")


@pytest.mark.parametrize(
    ("writer", "line", "code"),
    [pytest.param(w, n, code, id=case) for case, w, n, _, code in HOSTILE],
)
def test_validation_names_the_line_and_reads_in_bounded_memory(
    tmp_path: Path, writer: Callable[[Path], None], line: int, code: str
) -> None:
    path = tmp_path / "b.jsonl"
    writer(path)
    with memory_cap(1024**3):  # below the 2 GB line: it is never held whole
        checked = check_input(path)
    assert [(e.code, e.line) for e in checked.errors][:1] == [(code, line)]
    assert all(e.message for e in checked.errors)


def declared_only(url: str, length: int) -> tuple[int, bytes]:
    """POST /v1/files declaring `length` bytes and sending none of them; (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            reply += piece
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def upload_and_fail(client: openai.OpenAI, data: bytes) -> list[tuple[str, int | None]]:
    """Upload `data`, make it a batch, wait for it to fail; its errors' (code, line)."""
    b = wait_batch(client, create(client, data).id, lambda x: x.status == "failed", 60)
    assert b.in_progress_at is None and b.output_file_id is None
    return [(e.code or "", e.line) for e in (b.errors.data if b.errors else []) or []]


def test_hostile_uploads_fail_their_batch_fast_with_the_line_and_the_service_answers(
    tmp_path: Path,
) -> None:
    files = tmp_path / "hostile"
    files.mkdir()
    settings = double_settings(tmp_path, max_request_bytes=300_000, max_upload_bytes=1_000_000)
    double = InProcessDouble()
    with in_thread(settings, double) as url, httpx.Client(base_url=url, timeout=60) as http:
        client = client_for(url)
        for case, writer, line, _, code in HOSTILE:
            if writer is two_gb_line:
                continue  # an upload that size is refused at the door: below
            path = files / f"{case}.jsonl"
            writer(path)
            started = time.monotonic()
            assert upload_and_fail(client, path.read_bytes())[:1] == [(code, line)], case
            print(f"\n{case}: batch failed in {time.monotonic() - started:.2f} s")
            assert http.get("/health").status_code == 200  # still answering
        # A line over the per-line cap (one request: at most --max-request-bytes).
        long_line = GOOD.replace(b'"hi"', b'"' + b"x" * 400_000 + b'"')
        got = upload_and_fail(client, GOOD.replace(b'"a"', b'"b"') + long_line)
        assert got == [("line_too_long", 2)]
        # A 2 GB upload is refused by its declared length, before a byte of it is read.
        started = time.monotonic()
        status, body = declared_only(url, TWO_GB)
        assert status == 413 and b'"file_too_large"' in body
        assert time.monotonic() - started < 5
        # An empty file is refused at upload.
        with pytest.raises(openai.BadRequestError) as empty:
            client.files.create(file=("e.jsonl", b""), purpose="batch")
        assert empty.value.body["code"] == "empty_file"  # type: ignore[index]
        assert http.get("/health").status_code == 200
        assert double.calls == 0  # nothing ran


def test_storage_and_count_quotas_refuse_with_the_limit_and_how_to_raise_it(
    tmp_path: Path,
) -> None:
    settings = double_settings(
        tmp_path, max_stored_bytes=3 * len(GOOD), max_files=3, max_queued_batches=1
    )
    data = tmp_path / "data"
    with in_thread(settings, InProcessDouble()) as url:
        client = client_for(url)
        a = client.files.create(file=("a.jsonl", GOOD), purpose="batch")
        client.files.create(file=("b.jsonl", GOOD), purpose="batch")
        # Over the bytes kept: refused as it streams in, nothing kept.
        with pytest.raises(openai.APIStatusError) as full:
            client.files.create(file=("c.jsonl", GOOD + GOOD), purpose="batch")
        assert full.value.status_code == 413
        body = full.value.body
        assert body["code"] == "storage_quota_exceeded"  # type: ignore[index]
        assert "--max-stored-bytes" in body["message"]  # type: ignore[index]
        assert len(list((data / "files").iterdir())) == 2
        client.files.create(file=("c.jsonl", GOOD), purpose="batch")
        # Files kept: refused before a byte is stored.
        with pytest.raises(openai.BadRequestError) as many:
            client.files.create(file=("d.jsonl", b"x"), purpose="batch")
        assert many.value.body["code"] == "files_quota_exceeded"  # type: ignore[index]
        assert "--max-files" in many.value.body["message"]  # type: ignore[index]
        assert client.files.delete(a.id).deleted  # deleting makes room, as the message says
        client.files.create(file=("d.jsonl", GOOD), purpose="batch")
    # Batches not yet ended: the second waiting one is refused.
    settings = double_settings(tmp_path / "q", max_queued_batches=1)
    from harness.testing import ApiSeams

    with in_thread(settings, InProcessDouble(), ApiSeams(hold=1)) as url:
        client = client_for(url)
        lines = GOOD + GOOD.replace(b'"a"', b'"b"')
        first = create(client, lines)
        wait_batch(client, first.id, lambda x: x.status == "in_progress", 30)
        with pytest.raises(openai.BadRequestError) as queued:
            create(client, lines)
        assert queued.value.body["code"] == "batch_quota_exceeded"  # type: ignore[index]
        assert "--max-queued-batches" in queued.value.body["message"]  # type: ignore[index]
        client.batches.cancel(first.id)
        wait_batch(client, first.id, lambda x: x.status == "cancelled", 30)
        create(client, lines)  # room again


def test_a_full_disk_during_an_upload_is_a_507_naming_the_data_dir_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.api import uploads

    def full(fh: object, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    real_to_thread = asyncio.to_thread

    async def to_thread(func: Callable[..., object], *args: object, **kw: object) -> object:
        if getattr(func, "__name__", "") == "write":
            full(None, b"")
        return await real_to_thread(func, *args, **kw)

    settings = double_settings(tmp_path)
    with in_thread_app(settings, InProcessDouble()) as (url, svc):
        client = client_for(url)
        monkeypatch.setattr(uploads.asyncio, "to_thread", to_thread)
        with pytest.raises(openai.InternalServerError) as info:
            client.files.create(file=("a.jsonl", GOOD * 10), purpose="batch")
        monkeypatch.undo()
        assert info.value.status_code == 507
        error = info.value.body
        assert error["code"] == "insufficient_storage"  # type: ignore[index]
        assert str(tmp_path / "data") in error["message"]  # type: ignore[index]
        assert list((tmp_path / "data" / "files").iterdir()) == []  # nothing half-written
        assert client.files.list().data == []
        assert svc.counters.uploads_refused == 1
        client.files.create(file=("a.jsonl", GOOD), purpose="batch")  # fine again


def test_a_disk_that_fills_while_a_batch_runs_fails_it_naming_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results file cannot grow (ENOSPC after two lines): the run fails, is retried, and
    the batch ends `failed` with `insufficient_storage` naming the data dir, its two finished
    lines in its output file, the rest as errors: nothing half-written."""
    from harness.engine.store import ResultsStore
    from harness.errors import OutputError

    real_write = ResultsStore.write
    written: list[str] = []

    def write(self: ResultsStore, record: object) -> None:
        if len(written) >= 2:
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                raise OutputError(f"cannot append to results file {self.path}") from exc
        written.append("x")
        real_write(self, record)  # type: ignore[arg-type]

    monkeypatch.setattr(ResultsStore, "write", write)
    lines = b"".join(GOOD.replace(b'"a"', f'"r{i}"'.encode()) for i in range(5))
    with in_thread_app(double_settings(tmp_path), InProcessDouble()) as (url, svc):
        svc.worker.retry_base_s = 0.01
        client = client_for(url)
        b = wait_batch(client, create(client, lines).id, lambda x: x.status == "failed", 60)
        (error,) = (b.errors.data if b.errors else []) or []
        assert error.code == "insufficient_storage"
        assert str(tmp_path / "data") in (error.message or "")
        assert b.request_counts is not None
        assert (b.request_counts.completed, b.request_counts.failed) == (2, 3)
        assert not [p for p in (tmp_path / "data" / "files").iterdir() if p.name.endswith(".tmp")]


def test_a_batch_never_stays_validating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception of the validation fails the batch; a batch found `validating` past its
    deadline (a restart after a crash while validating) fails with `validation_timeout`."""

    def crash(*args: object, **kw: object) -> object:
        raise RuntimeError("validation blew up")

    monkeypatch.setattr("harness.api.runner.check_input", crash)
    with in_thread(double_settings(tmp_path / "a"), InProcessDouble()) as url:
        client = client_for(url)
        b = wait_batch(client, create(client, GOOD).id, lambda x: x.status == "failed", 30)
        assert [(e.code, e.message) for e in (b.errors.data if b.errors else []) or []] == [
            ("validation_error", "Validation failed (RuntimeError).")
        ]
    monkeypatch.undo()
    # A service that died while validating left this batch; restarted past the deadline.
    store = Store(tmp_path / "b" / "data")
    file_id = new_file_id()
    store.blob_path(file_id).write_bytes(GOOD)
    store.add_file(FileRow(file_id, "in.jsonl", "batch", len(GOOD), 1, now()))
    stuck = store.add_batch(
        BatchRow(
            id=new_batch_id(), input_file_id=file_id, endpoint="/v1/chat/completions",
            completion_window="24h", status="validating", created_at=now() - 3600,
        )
    )  # fmt: skip
    store.close()
    settings = double_settings(tmp_path / "b", validation_timeout_s=600)
    with in_thread(settings, InProcessDouble()) as url:
        client = client_for(url)
        b = wait_batch(client, stuck.id, lambda x: x.status == "failed", 30)
        (error,) = (b.errors.data if b.errors else []) or []
        assert error.code == "validation_timeout" and "600 s" in (error.message or "")


def test_the_same_file_fails_the_same_way_in_both_tools(tmp_path: Path) -> None:
    """One reader: for each hostile file, harness run's line number is the batch error's."""
    for case, writer, line, says, code in HOSTILE:
        if writer is two_gb_line:
            continue  # covered above, without writing 2 GB twice
        path = tmp_path / f"{case}.jsonl"
        writer(path)
        checked = check_input(path)
        assert (checked.errors[0].code, checked.errors[0].line) == (code, line), case
        assert says.lower().split()[0] in checked.errors[0].message.lower(), case
    assert os.path.exists(tmp_path)


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the process started), in bytes, from the kernel."""
    out = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_200_mb_upload_leaves_the_services_memory_bounded(
    tmp_path: Path, tiny_server: object
) -> None:
    """A real `harness api` receives a 190 MB file (1,900 requests of 100 KB) and validates it
    (its last line is broken, so the whole file is read and nothing runs): the service's peak
    resident memory (the kernel's VmHWM) grows by far less than the file. The figures are
    printed (the note of issue 27 quotes them)."""
    mb = 1000 * 1000
    path = tmp_path / "big.jsonl"
    text = "x" * 100_000
    with path.open("w", encoding="utf-8") as fh:
        for i in range(1899):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}) + "\n")
        fh.write('{"method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    size = path.stat().st_size
    assert 150 * mb < size <= 200 * mb
    url = getattr(tiny_server, "url", None)
    api = ApiProcess(
        tmp_path, tmp_path / "data", "--backend", "openai", "--base-url", f"{url}/v1",
        model_args=(),
    )  # fmt: skip
    try:
        api.start()
        assert api.proc is not None
        before = memory_of(api.proc.pid)
        client = client_for(api.url)
        started = time.monotonic()
        with path.open("rb") as fh:
            f = client.files.create(file=("big.jsonl", fh), purpose="batch")
        uploaded = time.monotonic() - started
        assert f.bytes == size
        after_upload = memory_of(api.proc.pid)
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        started = time.monotonic()
        b = wait_batch(client, b.id, lambda x: x.status == "failed", 300)
        validated = time.monotonic() - started
        after = memory_of(api.proc.pid)
        errors = [(e.code, e.line) for e in (b.errors.data if b.errors else []) or []]
        assert errors[0] == ("missing_required_parameter", 1900)
        assert {line for _, line in errors} == {1900}
        with httpx.Client(base_url=api.url, timeout=30) as http:
            assert http.get("/health").status_code == 200  # still answering
        assert api.stop() == 0
    finally:
        left = api.cleanup()
    assert left == []
    grew = after["VmHWM"] - before["VmHWM"]
    print(
        f"\n200 MB upload: file {size / mb:.1f} MB; service RSS {before['VmRSS'] / mb:.1f} MB "
        f"before, peak (VmHWM) {before['VmHWM'] / mb:.1f} MB before, "
        f"{after_upload['VmHWM'] / mb:.1f} MB after the upload ({uploaded:.1f} s), "
        f"{after['VmHWM'] / mb:.1f} MB after validation ({validated:.1f} s): the peak grew "
        f"{grew / mb:.1f} MB; RSS now {after['VmRSS'] / mb:.1f} MB (kernel /proc/<pid>/status)"
    )
    assert grew < size / 4, "the service's memory grew with the file"
