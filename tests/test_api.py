"""`harness api`: OpenAI's Files and Batches API over the engine, driven by the official client.

The acceptance tests start `python -m harness.api` as a child process on 127.0.0.1 over the
embedded tiny model (tiny-gemma3, a real llama.cpp server) and talk to it only through the
`openai` client, as a user would. One service serves the module (its tests run in file order:
the cancel test first, then the browser test while the 200-line batch runs, then that batch's
checks); the kill-and-restart test starts its own. The logic tests at the top (settings, key,
limits, files, error shapes, the runner's rules) run the same app in a thread over the
in-process double: no model.

No test depends on timing windows: a batch is held at a known count of finished requests by a
test seam (`harness.testing.seams.ApiSeams(hold=N)`: nothing in flight then) until the test
writes its release file, as `ApiSeams(finalize_delay_s=...)` holds a batch while it finalizes.
The service reads no test hook from its environment: the seams are handed to the app in a
thread, or to a child process through tests/api_seamed.py.

SIGKILL gives the service no chance to stop its llama.cpp server (a child in its own session):
the restarted service stops the one it noted, and every test checks that no process it started
is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import html
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import uvicorn
from openai import OpenAI
from openai.types import Batch
from openai.types.chat import ChatCompletion

# The browser helpers of the report page's test: same Chromium, same install-or-skip, same
# clean-up of every process Chromium starts.
from test_report_browser import PNG_SIGNATURE, chromium, run_chromium  # noqa: F401

from harness.api import ApiSettings, create_app
from harness.api.cli import READY_PREFIX, main
from harness.api.runner import REQUESTED_MODEL_KEY, RESULTS_NAME, BatchWorker
from harness.api.schemas import OUTPUT_LINE_KEYS
from harness.api.servers import SCRUBBED_ENV, SERVERS_NOTE, ServerNotes, reap
from harness.api.store import DB_NAME, BatchRow, FileRow, Store, new_batch_id, new_file_id, now
from harness.api.validate import LineCounter, check_input, read_items
from harness.backends.base import Backend, ChatRequest, ChatResult
from harness.backends.openai import OpenAIBackend
from harness.batch import batch_config
from harness.cli import main as harness_main
from harness.engine import read_results
from harness.errors import ConfigError, ModelNotFound
from harness.testing import RELEASE_NAME, ApiSeams, InProcessDouble
from harness.workload import items_from_batch, read_batch_jsonl

SHORT_PROMPT = Path(__file__).parent / "data" / "batch" / "short_prompt.yaml"
SEAMED = Path(__file__).parent / "api_seamed.py"
"""`harness api` with test seams (the service itself reads no test hook)."""
MODEL_ARGS = ("--model", "tiny-gemma3", "--ctx", "1024")
START_TIMEOUT_S = 180.0
TERMINAL = ("completed", "failed", "cancelled", "expired")
KEY = "hk-test-0123456789abcdef"


# -- helpers ----------------------------------------------------------------------------------


def make_batch_file(tmp: Path, rows: int, name: str = "batch") -> Path:
    """`harness generate` + `harness convert` (the short rubric): `rows` OpenAI Batch lines."""
    csv_path, out = tmp / f"{name}.csv", tmp / f"{name}.jsonl"
    assert harness_main(["generate", str(rows), str(csv_path)]) == 0
    assert harness_main(["convert", str(csv_path), str(out), "--prompt", str(SHORT_PROMPT)]) == 0
    return out


_OPEN: list[OpenAI] = []


def client_for(url: str, key: str = "unused", *, keep: bool = False) -> OpenAI:
    """The official client for a service; closed after the test (`keep`: by its owner)."""
    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60.0)
    if not keep:
        _OPEN.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def wait_batch(
    client: OpenAI, batch_id: str, until: Callable[[Batch], bool], timeout_s: float = 600.0
) -> Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        if batch.status in TERMINAL or time.monotonic() > deadline:
            pytest.fail(f"batch {batch_id} is {batch.status} ({batch.request_counts})")
        time.sleep(0.25)


def done_count(batch: Batch) -> int:
    rc = batch.request_counts
    return rc.completed + rc.failed if rc else 0


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines()]


def check_output_line(line: dict[str, Any], *, ok: bool, model: bool = True) -> None:
    """A line of a batch's output (ok) or error file, as OpenAI's BatchRequestOutput; `model`:
    the reply came from a real model server (a full chat.completion body)."""
    assert tuple(line) == OUTPUT_LINE_KEYS, line.keys()
    assert isinstance(line["id"], str) and line["id"].startswith("batch_req_")
    assert isinstance(line["custom_id"], str) and line["custom_id"]
    if ok:
        assert line["error"] is None
        resp = line["response"]
        assert set(resp) == {"status_code", "request_id", "body"}
        assert resp["status_code"] == 200
        assert isinstance(resp["request_id"], str) and resp["request_id"]
        body = resp["body"]
        assert isinstance(body["choices"][0]["message"]["content"], str)
        if model:
            assert body["object"] == "chat.completion"
            assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(body["usage"])
    else:
        assert line["response"] is None
        assert set(line["error"]) == {"code", "message"}
        assert isinstance(line["error"]["message"], str)


def check_replies(out: list[dict[str, Any]], results: Path) -> None:
    """Every output line's body is a chat.completion (as the official client's type reads it)
    whose `choices[0].message.content` is the reply the engine got (its results file); the
    server's own body is not in the output."""
    got = {line["custom_id"]: line["harness"] for line in read_results(results)}
    for line in out:
        body = line["response"]["body"]
        reply = ChatCompletion.model_validate(body)
        assert reply.object == "chat.completion" and reply.usage is not None
        assert reply.choices[0].message.content == got[line["custom_id"]]["content"]
        assert body != got[line["custom_id"]]["server_reply"]


def score_of(line: dict[str, Any]) -> int:
    content = line["response"]["body"]["choices"][0]["message"]["content"]
    score = json.loads(content)["score"]
    assert isinstance(score, int)
    return score


def check_finished(
    client: OpenAI, batch: Batch, *, model: bool = True, inputs: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every line valid, every custom_id once, request_counts = the output and error lines;
    with `inputs`, the lines are exactly the input's custom_ids (unrun ones as errors)."""
    out = read_lines(client, batch.output_file_id)
    err = read_lines(client, batch.error_file_id)
    for line in out:
        check_output_line(line, ok=True, model=model)
    for line in err:
        check_output_line(line, ok=False, model=model)
    ids = Counter(line["custom_id"] for line in out + err)
    assert [cid for cid, n in ids.items() if n > 1] == []
    assert batch.request_counts is not None
    assert batch.request_counts.completed == len(out)
    assert batch.request_counts.failed == len(err)
    if inputs is not None:
        assert sorted(ids) == sorted(inputs)
        assert batch.request_counts.total == len(inputs)
    return out, err


def error_codes(lines: list[dict[str, Any]]) -> Counter[str]:
    return Counter(line["error"]["code"] for line in lines)


def release(data_dir: Path, batch_id: str) -> None:
    """Let a batch held by the `hold` seam go on."""
    (data_dir / "batches" / batch_id / RELEASE_NAME).touch()


def files_in(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ApiProcess:
    """`python -m harness.api` children on 127.0.0.1; every process they start is cleaned up."""

    def __init__(
        self, workdir: Path, data_dir: Path, *args: str, model_args: Sequence[str] = MODEL_ARGS
    ) -> None:
        self.workdir, self.data_dir, self.args = workdir, data_dir, args
        self.model_args = tuple(model_args)
        """The model options (default: the embedded tiny model), before `args`."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0
        self.seen: list[psutil.Process] = []
        self.logs: list[Path] = []

    def start(
        self,
        env: dict[str, str] | None = None,
        *,
        hold_at: int | None = None,
        finalize_delay_s: float = 0.0,
    ) -> str:
        """Start the service; with `hold_at` / `finalize_delay_s`, through tests/api_seamed.py
        (the same command line, with those test seams)."""
        n = self.starts = self.starts + 1
        out, err = self.workdir / f"api-{n}.out", self.workdir / f"api-{n}.err"
        self.logs += [out, err]
        seamed = hold_at is not None or finalize_delay_s > 0
        launcher = (
            [str(SEAMED), *(["--hold-at", str(hold_at)] if hold_at is not None else []),
             "--finalize-delay", str(finalize_delay_s), "--"]
            if seamed
            else ["-m", "harness.api"]
        )  # fmt: skip
        cmd = [
            sys.executable, *launcher, "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(self.data_dir), *self.model_args, *self.args,
        ]  # fmt: skip
        with out.open("wb") as fo, err.open("wb") as fe:
            self.proc = subprocess.Popen(
                cmd, stdout=fo, stderr=fe, cwd=self.workdir, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = out.read_text(errors="replace")
            if READY_PREFIX in text:
                self.url = text.split(READY_PREFIX, 1)[1].split()[0]
                break
            if self.proc.poll() is not None:
                pytest.fail(f"harness api exited {self.proc.returncode}: {err.read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            pytest.fail(f"harness api did not start in {START_TIMEOUT_S:.0f} s")
        self._note_children()
        with httpx.Client(timeout=5.0) as http:
            for _ in range(100):
                if http.get(f"{self.url}/health").status_code == 200:
                    return self.url
                time.sleep(0.1)
        pytest.fail("/health did not answer 200")

    def _note_children(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen += kids
        return kids

    def sigkill(self) -> list[psutil.Process]:
        """SIGKILL the service; returns its children (now orphans: the model server)."""
        assert self.proc is not None
        kids = self._note_children()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return [k for k in kids if alive(k)]

    def stop(self) -> int:
        """SIGTERM: the service stops its model server and exits."""
        assert self.proc is not None
        self._note_children()
        self.proc.terminate()
        return self.proc.wait(timeout=60)

    def cleanup(self) -> list[psutil.Process]:
        """Kill whatever is left; returns what was left (should be nothing)."""
        left = []
        if self.proc is not None and self.proc.poll() is None:
            self._note_children()
            self.proc.kill()
            self.proc.wait(timeout=30)
        for kid in self.seen:
            if alive(kid):
                left.append(kid)
                with contextlib.suppress(psutil.NoSuchProcess):
                    kid.kill()
        return left


@contextlib.contextmanager
def in_thread(
    settings: ApiSettings, backend: Backend, seams: ApiSeams | None = None
) -> Iterator[str]:
    """The app on 127.0.0.1 (a free port) in a thread, over the in-process double."""
    with in_thread_app(settings, backend, seams) as (url, _):
        yield url


@contextlib.contextmanager
def in_thread_app(
    settings: ApiSettings, backend: Backend, seams: ApiSeams | None = None
) -> Iterator[tuple[str, Any]]:
    """`in_thread`, also yielding the app's `Service` (to reach into its state); `seams`: the
    test seams the service gets."""
    app = create_app(settings, backend=backend, seams=seams or ApiSeams())
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "app did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def double_settings(tmp: Path, **kw: Any) -> ApiSettings:
    return ApiSettings(data_dir=tmp / "data", backend="embedded", model="tiny-gemma3", **kw)


# -- settings and the command line ------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_non_loopback_host_without_a_key_exits_2_with_one_line(
    host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HARNESS_API_KEY", raising=False)
    assert main(["--host", host, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert host in err and "--api-key" in err and "HARNESS_API_KEY" in err
    assert not (tmp_path / "d").exists()


def test_real_process_refuses_a_non_loopback_host_without_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.api", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("harness api: error: --host 0.0.0.0 is not a loopback")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--backend", "nope"], "--backend 'nope'"),
        (["--strategy", "nope"], "--strategy 'nope'"),
        (["--model", "no-such-model"], "--model 'no-such-model'"),
        (["--max-lines", "0"], "--max-lines 0"),
        (["--port", "x"], "not a whole number"),
        (["--backend", "ollama", "--request-path", "chat"], "--request-path is for llama.cpp"),
        (["--server-flags", "nope"], "--server-flags: invalid choice: 'nope'"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.suppress(SystemExit):
        assert main([*argv, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for opt in (
        "--host", "--port", "--backend", "--model", "--base-url", "--data-dir", "--api-key",
        "--max-upload-bytes", "--max-request-bytes", "--max-lines", "--config", "--profile",
        "--request-path", "--server-flags",
    ):  # fmt: skip
        assert opt in out


def test_the_server_options_of_harness_run_reach_the_batches_settings(tmp_path: Path) -> None:
    """`--request-path` and `--server-flags`, declared once for `harness run` and `harness api`
    (`harness.run.given.OPTIONS`), resolve the same way: the command line first."""
    from harness.api.cli import build_parser, settings_from

    args = build_parser().parse_args(
        ["--request-path", "chat", "--server-flags", "harness", "--config", str(tmp_path / "n")]
    )
    cfg = settings_from(args).validate()
    assert (cfg.request_path.value, cfg.request_path.source) == ("chat", "command line")
    assert (cfg.server_flags.value, cfg.server_flags.source) == ("harness", "command line")
    default = settings_from(build_parser().parse_args(["--config", str(tmp_path / "n")]))
    cfg = default.validate()  # harness run's rule: the embedded server's fastest path
    assert (cfg.request_path.value, cfg.server_flags.value) == ("tokens", "ollama")


# -- the app over the in-process double: key, limits, files, error shapes ----------------------


def test_with_a_key_requests_without_it_get_401_in_openai_shape(tmp_path: Path) -> None:
    settings = double_settings(tmp_path, api_key=KEY)
    with in_thread(settings, InProcessDouble()) as url:
        with pytest.raises(openai.AuthenticationError) as info:
            client_for(url, key="wrong-key-123").batches.list()
        assert info.value.status_code == 401
        assert info.value.body == {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        with httpx.Client(base_url=url) as http:
            for method, path in [
                ("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/batches"),
                ("POST", "/v1/batches"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                ("GET", "/metrics"), ("GET", "/v1/files/x/content"),
            ]:  # fmt: skip
                r = http.request(method, path)
                assert r.status_code == 401, (method, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
            # The page's routes ask a browser for the key (HTTP Basic: the key as password).
            for path in ("/", "/batches/batch_000000000000000000000000/throughput.png"):
                r = http.get(path)
                assert r.status_code == 401, path
                assert r.headers["www-authenticate"].startswith('Basic realm="harness api"')
                assert "API key" in r.text and "password" in r.text
                assert http.get(path, auth=("anyone", "wrong-key-123")).status_code == 401
            page = http.get("/", auth=("anyone", KEY))
            assert page.status_code == 200 and "harness api: batches" in page.text
            assert "needs its API key" in page.text and "api_key=os.environ[" in page.text
            # Basic credentials are for the page only; the API takes the Bearer token.
            assert http.get("/v1/batches", auth=("anyone", KEY)).status_code == 401
            assert http.get("/health").status_code == 200
        # With the key, the whole round trip works; the key is nowhere on disk.
        client = client_for(url, key=KEY)
        data = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'  # noqa: E501
        f = client.files.create(file=("in.jsonl", data), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        b = wait_batch(client, b.id, lambda x: x.status == "completed", 30)
        assert read_lines(client, b.output_file_id)[0]["custom_id"] == "a"
    blobs = files_in(tmp_path)
    assert blobs and not any(KEY.encode() in v for v in blobs.values())


def test_a_foreign_host_or_origin_is_refused_and_the_page_and_client_still_work(
    tmp_path: Path,
) -> None:
    """On loopback, a web page is no caller: a request through another hostname (DNS
    rebinding) or from another web origin is refused before any route runs; the service's own
    addresses (127.0.0.1, localhost, with its port), its page and the openai client work."""
    with in_thread_app(double_settings(tmp_path), InProcessDouble()) as (url, svc):
        port = url.rsplit(":", 1)[1]
        client = client_for(url)
        f = client.files.create(file=("in.jsonl", lines_of(1)), purpose="batch")
        with httpx.Client(base_url=url) as http:
            refused = [
                ("GET", "/v1/files", {"host": "evil.example"}),
                ("GET", f"/v1/files/{f.id}/content", {"host": f"evil.example:{port}"}),
                ("GET", "/", {"host": "evil.example"}),
                ("GET", "/v1/batches", {"host": "127.0.0.1:1"}),  # not its port
                ("GET", "/v1/batches", {"host": "127.0.0.1"}),  # no port
                ("GET", "/health", {"host": "evil.example"}),
                ("GET", "/v1/batches", {"origin": "http://evil.example"}),
                ("GET", "/", {"origin": "http://evil.example"}),
                ("GET", "/v1/batches", {"origin": "null"}),
                ("GET", "/v1/batches", {"origin": f"http://localhost:{port}"}),  # not its host
                ("POST", "/v1/files", {"origin": "http://evil.example"}),
                ("POST", "/v1/batches", {"origin": "http://evil.example",
                                         "content-type": "application/x-www-form-urlencoded"}),
            ]  # fmt: skip
            for method, path, headers in refused:
                r = http.request(method, path, headers=headers, content=b"x=1")
                assert r.status_code == 403, (method, path, headers, r.text)
                error = r.json()["error"]
                assert error["code"] == "caller_not_allowed" and error["type"]
            assert svc.counters.callers_refused == len(refused)
            for headers in (
                {}, {"host": f"localhost:{port}"}, {"host": f"127.0.0.1:{port}"},
                {"origin": f"http://127.0.0.1:{port}"},
                {"host": f"localhost:{port}", "origin": f"http://localhost:{port}"},
            ):  # fmt: skip
                assert http.get("/v1/files", headers=headers).status_code == 200, headers
            page = http.get("/")
            assert page.status_code == 200 and "harness api: batches" in page.text
            text = html.unescape(page.text)
            assert "No API key" in text and f'OpenAI(base_url="{url}/v1"' in text
            metrics = http.get("/metrics").text
            assert f"harness_api_callers_refused_total {len(refused)}" in metrics
        assert [x.id for x in client.files.list()] == [f.id]


def test_json_routes_take_only_a_json_content_type(tmp_path: Path) -> None:
    """A page can send a form or text/plain body without a preflight, never JSON: routes that
    read JSON refuse other types (415), before the body is read."""
    with in_thread(double_settings(tmp_path), InProcessDouble()) as url:
        client = client_for(url)
        f = client.files.create(file=("in.jsonl", lines_of(1)), purpose="batch")
        body = json.dumps(
            {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        )
        chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        with httpx.Client(base_url=url) as http:
            for path, content in (("/v1/batches", body), ("/v1/chat/completions", chat)):
                for kind in (None, "text/plain", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x"):  # fmt: skip
                    headers = {"content-type": kind} if kind else {}
                    r = http.post(path, content=content, headers=headers)
                    assert r.status_code == 415, (path, kind)
                    error = r.json()["error"]
                    assert error["code"] == "unsupported_media_type"
                    assert "application/json" in error["message"]
            assert client.batches.list().data == []  # nothing was created
            r = http.post(
                "/v1/batches",
                content=body,
                headers={"content-type": "application/json; charset=utf-8"},
            )
            assert r.status_code == 200 and r.json()["object"] == "batch"


def test_off_loopback_the_key_guards_and_a_foreign_origin_is_still_refused(
    tmp_path: Path,
) -> None:
    settings = double_settings(tmp_path, host="0.0.0.0", api_key=KEY)
    with in_thread(settings, InProcessDouble()) as url, httpx.Client(base_url=url) as http:
        auth = {"authorization": f"Bearer {KEY}"}
        # Reached by a name of its own (it listens on every address): the key decides.
        assert http.get("/v1/files", headers={**auth, "host": "box.example:1"}).status_code == 200
        assert http.get("/v1/files", headers={"host": "box.example:1"}).status_code == 401
        r = http.get("/v1/files", headers={**auth, "origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "caller_not_allowed"


def test_upload_limits_are_refused_in_openai_shape_and_keep_nothing(tmp_path: Path) -> None:
    settings = double_settings(tmp_path, max_upload_bytes=2000, max_lines=5)
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    with in_thread(settings, InProcessDouble()) as url:
        client = client_for(url)
        with pytest.raises(openai.APIStatusError) as big:
            client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
        assert big.value.status_code == 413
        assert big.value.body["code"] == "file_too_large"  # type: ignore[index]
        assert "2000 bytes" in big.value.body["message"]  # type: ignore[index]
        # Within the size but over the line limit.
        with pytest.raises(openai.BadRequestError) as many:
            client.files.create(file=("many.jsonl", line * 6), purpose="batch")
        assert many.value.body["code"] == "too_many_lines"  # type: ignore[index]

        # A streamed body without a length is cut off as it comes in.
        def chunks() -> Iterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
            for _ in range(200):
                yield b"y" * 1024

        with httpx.Client(base_url=url) as http:
            r = http.post(
                "/v1/files",
                content=chunks(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        with pytest.raises(openai.BadRequestError) as purpose:
            client.files.create(file=("a.jsonl", line), purpose="fine-tune")
        assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
        assert client.files.list().data == []
        ok = client.files.create(file=("ok.jsonl", line * 5), purpose="batch")
        assert ok.bytes == 5 * len(line)
        assert [x.id for x in client.files.list()] == [ok.id]
    assert [p.name for p in (tmp_path / "data" / "files").iterdir()] == [ok.id]


def test_files_round_trip_with_opaque_ids_and_paging(tmp_path: Path) -> None:
    with in_thread(double_settings(tmp_path), InProcessDouble()) as url:
        client = client_for(url)
        made = [
            client.files.create(
                file=(f"../../etc/in-{i}.jsonl", b"{}\n" * (i + 1)), purpose="batch"
            )
            for i in range(5)
        ]
        f = made[0]
        assert f.object == "file" and f.purpose == "batch" and f.bytes == 3
        assert f.filename == "in-0.jsonl"  # a name, never a path
        assert f.id.startswith("file-") and len(f.id) == 29
        assert client.files.retrieve(f.id) == f
        assert client.files.content(f.id).content == b"{}\n"
        page = client.files.list(limit=2)
        assert [x.id for x in page.data] == [made[4].id, made[3].id] and page.has_more
        assert [x.id for x in client.files.list(limit=2)] == [m.id for m in reversed(made)]
        asc = client.files.list(order="asc", limit=3, after=made[0].id)
        assert [x.id for x in asc.data] == [m.id for m in made[1:4]]
        assert client.files.delete(f.id).deleted is True
        for bad in (f.id, "../" + DB_NAME, "file-..%2F..%2Fharness-api.sqlite3", "files"):
            with pytest.raises(openai.NotFoundError) as nf:
                client.files.retrieve(bad)
            assert nf.value.body["type"] == "invalid_request_error"  # type: ignore[index]
            with pytest.raises(openai.NotFoundError):
                client.files.content(bad)
        with httpx.Client(base_url=url) as http:
            r = http.get("/v1/no-such-route")
            assert r.status_code == 404 and set(r.json()["error"]) == {
                "message", "type", "param", "code",
            }  # fmt: skip
            r = http.post(
                "/v1/batches", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        for kwargs, param in [
            ({"input_file_id": made[1].id, "endpoint": "/v1/embeddings"}, "endpoint"),
            ({"input_file_id": "file-000000000000000000000000"}, "input_file_id"),
            ({"input_file_id": made[1].id, "completion_window": "1h"}, "completion_window"),
        ]:
            args = {"endpoint": "/v1/chat/completions", "completion_window": "24h", **kwargs}
            with pytest.raises(openai.APIStatusError) as bad_batch:
                client.batches.create(**args)  # type: ignore[arg-type]
            assert bad_batch.value.body["param"] == param  # type: ignore[index]


def test_cancel_of_a_finished_batch_and_deleting_a_running_input_are_conflicts(
    tmp_path: Path,
) -> None:
    line = '{"custom_id": "%d", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'  # noqa: E501
    data = "".join(line % i for i in range(20)).encode()
    with in_thread(double_settings(tmp_path), InProcessDouble(), ApiSeams(hold=1)) as url:
        client = client_for(url)
        f = client.files.create(file=("a.jsonl", data), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_batch(client, b.id, lambda x: done_count(x) == 1, 30)  # held: still running
        with pytest.raises(openai.ConflictError) as busy:
            client.files.delete(f.id)
        assert b.id in busy.value.message
        release(tmp_path / "data", b.id)
        b = wait_batch(client, b.id, lambda x: x.status == "completed", 30)
        with pytest.raises(openai.ConflictError) as done:
            client.batches.cancel(b.id)
        assert "completed" in done.value.message
        assert client.files.delete(f.id).deleted


def lines_of(n: int, prefix: str = "r") -> bytes:
    line = '{"custom_id": "%s%d", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi %d"}], "max_tokens": 4}}\n'  # noqa: E501
    return "".join(line % (prefix, i, i) for i in range(n)).encode()


def create(client: OpenAI, data: bytes) -> Batch:
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def ids_of(n: int, prefix: str = "r") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_a_second_service_on_the_data_dir_of_a_running_one_exits_2_and_the_batch_completes(
    tmp_path: Path,
) -> None:
    """One service per data dir (over the double, in seconds; the module's service repeats
    it over the tiny model): while a batch is held mid-run, `harness api` on the same dir
    exits 2 with one line naming this process, and the batch then completes, every
    custom_id once."""
    settings = double_settings(tmp_path)
    with in_thread(settings, InProcessDouble(), ApiSeams(hold=3)) as url:
        client = client_for(url)
        b = create(client, lines_of(12))
        wait_batch(client, b.id, lambda x: done_count(x) == 3, 30)
        lock = settings.data_dir / "harness-api.lock"
        assert lock.read_text().split("\n")[0] == str(os.getpid())
        names = sorted(str(p) for p in settings.data_dir.rglob("*"))
        second = subprocess.run(
            [sys.executable, "-m", "harness.api", "--port", "0", "--data-dir",
             str(settings.data_dir), "--model", "tiny-gemma3"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert second.returncode == 2 and second.stdout == ""
        (line,) = second.stderr.splitlines()
        assert f"the data dir {settings.data_dir} is in use by another process" in line
        assert f"pid {os.getpid()} (" in line and "--data-dir" in line
        assert sorted(str(p) for p in settings.data_dir.rglob("*")) == names  # nothing new
        assert done_count(client.batches.retrieve(b.id)) == 3  # still held, untouched
        release(settings.data_dir, b.id)
        b = wait_batch(client, b.id, lambda x: x.status == "completed", 30)
        check_finished(client, b, model=False, inputs=ids_of(12))
    assert not lock.exists()  # let go when the service stopped


def test_batches_past_their_window_expire_keeping_their_finished_lines(tmp_path: Path) -> None:
    seams = ApiSeams(hold=3)
    with in_thread_app(double_settings(tmp_path), InProcessDouble(), seams) as (url, svc):
        client = client_for(url)
        short = create(client, lines_of(50))
        wait_batch(client, short.id, lambda x: done_count(x) == 3, 30)  # held at 3
        late = create(client, lines_of(10, "l"))  # queued behind it
        wait_batch(client, late.id, lambda x: x.status == "in_progress", 30)
        svc.store.update_batch(late.id, expires_at=int(time.time()) - 1)
        svc.store.update_batch(short.id, expires_at=int(time.time()) - 1)  # seen within 1 s
        short = wait_batch(client, short.id, lambda x: x.status == "expired", 30)
        out, err = check_finished(client, short, model=False, inputs=ids_of(50))
        assert len(out) == 3 and error_codes(err) == {"batch_expired": 47}
        assert "completion window expired" in err[0]["error"]["message"]
        # Never started: every request is an error line of its own, none in the output.
        late = wait_batch(client, late.id, lambda x: x.status == "expired", 30)
        assert late.expired_at is not None and late.output_file_id is None
        out, err = check_finished(client, late, model=False, inputs=ids_of(10, "l"))
        assert out == [] and error_codes(err) == {"batch_expired": 10}


def test_a_run_that_keeps_failing_ends_failed_with_its_finished_lines(tmp_path: Path) -> None:
    def fail(call: int, request: object) -> Exception | None:
        return ModelNotFound("the model went away") if call > 3 else None

    with in_thread_app(double_settings(tmp_path), InProcessDouble(fail=fail)) as (url, svc):
        svc.worker.retry_base_s = 0.01
        client = client_for(url)
        b = create(client, lines_of(10))
        b = wait_batch(client, b.id, lambda x: x.status == "failed", 30)
        assert b.failed_at is not None and b.errors is not None
        error = (b.errors.data or [])[0]
        assert error.code == "server_error" and "the model went away" in (error.message or "")
        assert "after 5 tries" in (error.message or "")
        out, err = check_finished(client, b, model=False, inputs=ids_of(10))
        assert len(out) == 3 and error_codes(err) == {"batch_failed": 7}


# -- the runner's rules, the pass-through, the model servers (over doubles) --------------------


def test_a_cancelled_batch_writes_its_unrun_requests_to_the_error_file(tmp_path: Path) -> None:
    with in_thread(double_settings(tmp_path), InProcessDouble(), ApiSeams(hold=3)) as url:
        client = client_for(url)
        b = create(client, lines_of(20))
        wait_batch(client, b.id, lambda x: done_count(x) == 3, 30)
        client.batches.cancel(b.id)
        b = wait_batch(client, b.id, lambda x: x.status == "cancelled", 30)
        out, err = check_finished(client, b, model=False, inputs=ids_of(20))
        assert len(out) == 3 and error_codes(err) == {"batch_cancelled": 17}
        assert [line["custom_id"] for line in err] == ids_of(20)[3:]  # in input order
        assert len({line["id"] for line in out + err}) == 20


def finalize_worker(tmp_path: Path, status: str, n: int = 3) -> tuple[Store, BatchWorker, BatchRow]:
    """A store with one batch of `n` lines in `status` (validated), and a worker not running."""
    store = Store(tmp_path / "data")
    file_id = new_file_id()
    data = lines_of(n)
    store.blob_path(file_id).write_bytes(data)
    store.add_file(FileRow(file_id, "in.jsonl", "batch", len(data), n, now()))
    row = store.add_batch(
        BatchRow(
            id=new_batch_id(), input_file_id=file_id, endpoint="/v1/chat/completions",
            completion_window="24h", status=status, created_at=now(), in_progress_at=now(),
            total=n,
        )
    )  # fmt: skip
    config = batch_config(double_settings(tmp_path).batch_options())
    return store, BatchWorker(store, InProcessDouble(), config), row


def test_finalizing_never_overwrites_a_cancel_that_came_first(tmp_path: Path) -> None:
    store, worker, row = finalize_worker(tmp_path, "cancelling")
    blobs = sorted(p.name for p in store.files_dir.iterdir())
    for status in ("failed", "expired"):
        done = asyncio.run(worker._finalize(row, status, allowed=("in_progress",)))
        assert done is False
        got = store.get_batch(row.id)
        assert got is not None and got.status == "cancelling" and got.error_file_id is None
        assert sorted(p.name for p in store.files_dir.iterdir()) == blobs  # nothing left
    assert asyncio.run(worker._finalize(row, "cancelled", allowed=("cancelling",))) is True
    got = store.get_batch(row.id)
    assert got is not None and got.status == "cancelled" and got.cancelled_at is not None
    assert (got.completed, got.failed) == (0, 3)
    assert got.error_file_id is not None
    lines = store.blob_path(got.error_file_id).read_text().splitlines()
    assert [json.loads(x)["error"]["code"] for x in lines] == ["batch_cancelled"] * 3
    store.close()


def test_the_retry_back_off_is_not_cut_short_by_other_batches(tmp_path: Path) -> None:
    calls: list[float] = []

    def fail(call: int, request: object) -> Exception | None:
        calls.append(time.monotonic())
        return ModelNotFound("the model went away") if call == 1 else None

    with in_thread_app(double_settings(tmp_path), InProcessDouble(fail=fail)) as (url, svc):
        svc.worker.retry_base_s = 1.5
        client = client_for(url)
        b = create(client, lines_of(2))
        deadline = time.monotonic() + 30
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        other = create(client, lines_of(1, "o"))  # wakes the worker during the back-off
        wait_batch(client, other.id, lambda x: x.status == "in_progress", 30)
        b = wait_batch(client, b.id, lambda x: x.status == "completed", 30)
        assert calls[1] - calls[0] >= 1.5 - 0.05  # the whole back-off
        wait_batch(client, other.id, lambda x: x.status == "completed", 30)


def test_unknown_list_cursors_are_a_400_not_the_first_page_again(tmp_path: Path) -> None:
    with in_thread(double_settings(tmp_path), InProcessDouble()) as url:
        client = client_for(url)
        f = client.files.create(file=("a.jsonl", lines_of(1)), purpose="batch")
        for call in (
            lambda: client.files.list(after="file-000000000000000000000000"),
            lambda: client.batches.list(after="batch_000000000000000000000000"),
            lambda: client.batches.list(after=f.id),  # a file id is no batch cursor
        ):
            with pytest.raises(openai.BadRequestError) as bad:
                call()
            assert bad.value.body["param"] == "after"  # type: ignore[index]
            assert bad.value.body["code"] == "invalid_cursor"  # type: ignore[index]
            assert isinstance(bad.value.body, dict)
            assert set(bad.value.body) == {"message", "type", "param", "code"}
        assert [x.id for x in client.files.list(after=f.id)] == []


def test_every_request_body_has_a_limit(tmp_path: Path) -> None:
    settings = double_settings(tmp_path, max_request_bytes=1000)
    big = b'{"input_file_id": "' + b"x" * 2000 + b'"}'

    def streamed() -> Iterator[bytes]:
        for _ in range(20):
            yield b"x" * 100

    with (
        in_thread_app(settings, InProcessDouble()) as (url, svc),
        httpx.Client(base_url=url) as http,
    ):
        # Refused by its length before it is read; a body without a length (chunked) as it
        # streams in, past the limit (a route that reads no body never buffers one).
        cases: list[tuple[str, bytes | Iterator[bytes]]] = [
            ("/v1/batches", big), ("/v1/batches", streamed()),
            ("/v1/chat/completions", big), ("/v1/chat/completions", streamed()),
            ("/v1/batches/x/cancel", big),
        ]  # fmt: skip
        for path, content in cases:
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, (path, r.text)
            assert r.json()["error"]["code"] == "request_too_large"
            assert "--max-request-bytes" in r.json()["error"]["message"]
        assert svc.counters.bodies_refused == 5
        # Within the limit: the route answers as usual; uploads have their own (larger) limit.
        r = http.post(
            "/v1/batches", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        client = client_for(url)
        f = client.files.create(file=("big.jsonl", lines_of(20)), purpose="batch")
        assert f.bytes > 1000
        metrics = http.get("/metrics").text
        assert "harness_api_bodies_refused_total 5" in metrics


class _Upstream:
    """A tiny OpenAI-compatible server on 127.0.0.1 answering gzip-encoded bodies; records the
    Authorization header of each request."""

    def __init__(self, name: str) -> None:
        seen = self.seen = []  # type: list[tuple[str, str | None]]

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: dict[str, Any]) -> None:
                seen.append((self.path, self.headers.get("authorization")))
                data = gzip.compress(json.dumps(body).encode())
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer({"object": "list", "data": [{"id": name, "object": "model"}]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self._answer(
                    {
                        "id": "c", "object": "chat.completion", "created": 0, "model": name,
                        "choices": [{
                            "index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"from {name}"},
                        }],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    }
                )  # fmt: skip

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def upstreams(*names: str) -> Iterator[list[_Upstream]]:
    made = [_Upstream(n) for n in names]
    try:
        yield made
    finally:
        for u in made:
            u.close()


def _sleeper() -> subprocess.Popen[bytes]:
    """A process whose command line looks like a model server's (`harness ... serve`)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "harness", "serve"],
        start_new_session=True,
    )


class RelaunchingDouble(InProcessDouble):
    """A double that launches a 'server' at each start: a new process on a new address (the
    previous one died), like the embedded backend relaunching llama.cpp."""

    def __init__(self, urls: Sequence[str], **kw: Any) -> None:
        super().__init__(**kw)
        self.urls = list(urls)
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.append(_sleeper())
        self.info.extra["server_pid"] = self.procs[-1].pid
        self.info.base_url = self.urls[min(len(self.procs), len(self.urls)) - 1]

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_relaunched_server_is_noted_and_the_passthrough_follows_it(tmp_path: Path) -> None:
    def fail(call: int, request: object) -> Exception | None:
        return ModelNotFound("the server died") if call == 1 else None

    with upstreams("first", "second") as (a, b):
        double = RelaunchingDouble([a.url, b.url], fail=fail)
        with in_thread_app(double_settings(tmp_path), double) as (url, svc):
            svc.worker.retry_base_s = 0.01
            client = client_for(url)
            note = svc.store.get_meta(SERVERS_NOTE)
            assert [s["pid"] for s in note["servers"]] == [double.procs[0].pid]
            assert [m.id for m in client.models.list().data] == ["first"]  # gzip, decoded
            batch = wait_batch(
                client, create(client, lines_of(3)).id, lambda x: x.status == "completed", 30
            )
            assert len(double.procs) == 2  # relaunched after the failed run
            note = svc.store.get_meta(SERVERS_NOTE)
            new_pid = double.procs[1].pid
            assert [(s["role"], s["pid"]) for s in note["servers"]] == [("model", new_pid)]
            assert [m.id for m in client.models.list().data] == ["second"]
            reply = client.chat.completions.create(
                model="second", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "from second"
            assert batch.request_counts is not None and batch.request_counts.completed == 3
            # A SIGKILLed service leaves this note: the next start stops the server it names.
            other = Store(tmp_path / "data")
            try:
                assert reap(other) == 1
            finally:
                other.close()
            assert double.procs[1].wait(timeout=30) is not None


def test_the_reaper_stops_only_the_noted_servers_that_are_still_the_same_process(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "data")
    model, helper, other = _sleeper(), _sleeper(), _sleeper()
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        notes = ServerNotes(store)
        notes.note("model", model.pid)
        notes.note("tokenizer", helper.pid)
        notes.note("plain", plain.pid)
        notes.note("other", other.pid)
        notes.note("other", None)  # stopped: forgotten
        assert reap(store) == 3
        assert model.wait(timeout=30) is not None and helper.wait(timeout=30) is not None
        assert plain.poll() is None, "a process that is not a model server is left alone"
        assert other.poll() is None, "a server no longer noted is left alone"
        assert store.get_meta(SERVERS_NOTE) is None
        # The note of earlier versions (one server) is read too.
        store.set_meta("embedded_server", {"pid": other.pid, "create_time": 0.0})
        assert reap(store) == 1 and other.poll() is None  # another start time: not ours
    finally:
        for proc in (model, helper, other, plain):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        store.close()


def test_harness_api_servers_builds_harness_runs_pool(tmp_path: Path) -> None:
    """`harness api --servers N` is `harness run --servers N`: the same option (declared once,
    `harness.run.given`), resolved the same way, built by the same factory into a pool of N
    embedded servers (not started here)."""
    from harness.api.cli import build_parser, settings_from
    from harness.backends.embedded import EmbeddedBackend
    from harness.backends.pool import PoolBackend
    from harness.run.factory import open_backend

    args = build_parser().parse_args(
        ["--servers", "2", "--threads", "1", "--concurrency", "2", "--config", str(tmp_path / "n")]
    )
    settings = settings_from(args)
    assert settings.servers == 2
    cfg = settings.validate()
    assert (cfg.servers.value, cfg.servers.source) == (2, "command line")
    backend = open_backend(cfg)
    assert isinstance(backend, PoolBackend)
    assert len(backend.members) == 2
    assert all(isinstance(m, EmbeddedBackend) for m in backend.members)
    # `harness run`'s checks hold for the service too: several servers are embedded ones.
    bad = build_parser().parse_args(["--servers", "2", "--backend", "ollama"])
    with pytest.raises(ConfigError, match="--servers starts embedded servers"):
        settings_from(bad).validate()


def test_every_server_of_a_pool_is_noted_and_reaped_after_a_kill(tmp_path: Path) -> None:
    """A service over a pool (`--servers 2`) notes each server it started (role and index),
    runs its batches over them, and a SIGKILLed service's next start stops them all, not only
    the first (a pool's own info carries its first member's pid only)."""
    from harness.backends.pool import PoolBackend

    members = [RelaunchingDouble([f"http://127.0.0.1:9/m{i}"], delay_s=0.05) for i in range(2)]
    pool = PoolBackend(members, health_interval_s=0)
    with in_thread_app(double_settings(tmp_path, concurrency=2), pool) as (url, svc):
        note = svc.store.get_meta(SERVERS_NOTE)
        first = [m.procs[0].pid for m in members]
        assert [(s["role"], s["index"], s["pid"]) for s in note["servers"]] == [
            ("model", 0, first[0]),
            ("model", 1, first[1]),
        ]
        client = client_for(url)
        batch = wait_batch(
            client, create(client, lines_of(4)).id, lambda x: x.status == "completed", 30
        )
        assert batch.request_counts is not None and batch.request_counts.completed == 4
        assert all(m.calls for m in members), "the batch ran over both servers"
        # A SIGKILLed service leaves this note: the next start stops every server it names.
        other = Store(tmp_path / "data")
        try:
            assert reap(other) == 2
        finally:
            other.close()
        for m in members:
            assert m.procs[-1].wait(timeout=30) is not None


def _mock_openai_backend(seen: list[httpx.Request]) -> OpenAIBackend:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        if request.url.path == "/props":
            return httpx.Response(404, json={"error": "not found"})
        return httpx.Response(
            200,
            json={
                "id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )  # fmt: skip

    return OpenAIBackend("http://127.0.0.1:9/v1", transport=httpx.MockTransport(handler))


def test_passthrough_that_would_spend_the_upstream_key_needs_a_key_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-secret")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    seen: list[httpx.Request] = []
    with in_thread_app(double_settings(tmp_path / "a"), _mock_openai_backend(seen)) as (url, svc):
        with httpx.Client(base_url=url) as http:
            for r in (http.post("/v1/chat/completions", json=chat), http.get("/v1/models")):
                assert r.status_code == 403
                error = r.json()["error"]
                assert error["code"] == "passthrough_needs_api_key"
                assert "--api-key" in error["message"] and "OPENAI_API_KEY" in error["message"]
        assert [r.url.path for r in seen if r.url.path == "/v1/chat/completions"] == []
        assert svc.counters.passthrough_refused == 2
    # With a key of its own the service passes requests on, with the upstream's key.
    seen.clear()
    settings = double_settings(tmp_path / "b", api_key=KEY)
    with in_thread(settings, _mock_openai_backend(seen)) as url:
        reply = client_for(url, KEY).chat.completions.create(**chat)  # type: ignore[call-overload]
        assert reply.choices[0].message.content == "ok"
    sent = [r for r in seen if r.url.path == "/v1/chat/completions"]
    assert [r.headers["authorization"] for r in sent] == ["Bearer sk-upstream-secret"]
    # No upstream key: nothing to spend, no key needed.
    monkeypatch.delenv("OPENAI_API_KEY")
    seen.clear()
    with in_thread(double_settings(tmp_path / "c"), _mock_openai_backend(seen)) as url:
        assert client_for(url).chat.completions.create(**chat).choices  # type: ignore[call-overload]


class _EnvDouble(InProcessDouble):
    """Records the secrets visible while it starts (a server it launched would inherit them)."""

    async def start(self) -> None:
        self.env_at_start = {name: os.environ.get(name) for name in SCRUBBED_ENV}


def test_servers_the_service_starts_never_see_its_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-secret")
    monkeypatch.setenv("HARNESS_API_KEY", KEY)
    double = _EnvDouble()
    with in_thread(double_settings(tmp_path, api_key=KEY), double):
        assert os.environ["OPENAI_API_KEY"] == "sk-upstream-secret"  # put back after
    assert double.env_at_start == dict.fromkeys(SCRUBBED_ENV)
    assert os.environ["HARNESS_API_KEY"] == KEY


class _ReasoningDouble(InProcessDouble):
    async def chat(self, request: ChatRequest) -> ChatResult:
        result = await super().chat(request)
        raw = dict(result.raw)
        raw["usage"] = {**raw["usage"], "completion_tokens_details": {"reasoning_tokens": 2}}
        result.raw = raw
        return result


class _PartlyReportingDouble(InProcessDouble):
    """Reports cached tokens on every other reply only."""

    async def chat(self, request: ChatRequest) -> ChatResult:
        result = await super().chat(request)
        if self.calls % 2:
            result.usage.cached_tokens, result.usage.cached_source = None, "unknown"
        return result


def test_cached_tokens_not_reported_are_unknown_never_zero(tmp_path: Path) -> None:
    def page_row(http: httpx.Client, batch_id: str) -> dict[str, str | None]:
        dom = _Rows()
        dom.feed(http.get("/").text)
        return dom.rows[batch_id]

    with in_thread(double_settings(tmp_path / "a"), InProcessDouble(simulate_cache=False)) as url:
        client = client_for(url)
        b = wait_batch(client, create(client, lines_of(4)).id, lambda x: x.status == "completed")
        assert b.usage is not None and b.usage.input_tokens > 0
        details = b.usage.input_tokens_details
        cached: int | None = details.cached_tokens  # null: unknown (the client's type says int)
        assert cached is None
        assert details.model_extra == {
            "cached_tokens_source": "unknown", "cached_tokens_coverage": 0.0,
        }  # fmt: skip
        # Not reported by the replies: absent, never a 0 that was not measured.
        assert "reasoning_tokens" not in b.usage.output_tokens_details.model_fields_set
        with httpx.Client(base_url=url) as http:
            row = page_row(http, b.id)
            assert row["data-savings"] == "unknown"
            assert "unknown (not reported)" in http.get("/").text
            metrics = http.get("/metrics").text
        assert f'harness_api_batch_cached_tokens_total{{batch="{b.id}"}}' not in metrics
        assert f'harness_api_batch_cached_coverage{{batch="{b.id}",source="unknown"}} 0' in metrics

    with in_thread(double_settings(tmp_path / "b"), _ReasoningDouble()) as url:
        client = client_for(url)
        b = wait_batch(client, create(client, lines_of(4)).id, lambda x: x.status == "completed")
        assert b.usage is not None
        details = b.usage.input_tokens_details
        assert isinstance(details.cached_tokens, int)
        assert details.model_extra == {
            "cached_tokens_source": "double", "cached_tokens_coverage": 1.0,
        }  # fmt: skip
        assert b.usage.output_tokens_details.reasoning_tokens == 8  # from the replies
        with httpx.Client(base_url=url) as http:
            assert page_row(http, b.id)["data-savings"] not in ("unknown", "")
            metrics = http.get("/metrics").text
        assert f'harness_api_batch_cached_tokens_total{{batch="{b.id}"}}' in metrics

    with in_thread(double_settings(tmp_path / "c"), _PartlyReportingDouble()) as url:
        client = client_for(url)
        b = wait_batch(client, create(client, lines_of(4)).id, lambda x: x.status == "completed")
        assert b.usage is not None
        details = b.usage.input_tokens_details
        partial: int | None = details.cached_tokens
        assert partial is None  # a sum over half the replies is no total
        assert details.model_extra is not None
        assert details.model_extra["cached_tokens_coverage"] == 0.5
        assert isinstance(details.model_extra["cached_tokens_reported"], int)
        with httpx.Client(base_url=url) as http:
            assert "50% of replies reported it" in http.get("/").text


def test_a_batch_naming_a_model_not_served_fails_unless_any_model_is_served(
    tmp_path: Path,
) -> None:
    """The model a line names is the model that runs: another name fails validation with
    `model_not_found` naming it; `--serve-any-model` runs it on the served model, and the batch
    says so (its `model`, and the name asked for in its metadata)."""
    named = lines_of(2).replace(b'"body": {', b'"body": {"model": "gpt-4o-mini", ')
    served = lines_of(2, "s").replace(b'"body": {', b'"body": {"model": "double", ')
    with in_thread(double_settings(tmp_path / "strict"), InProcessDouble()) as url:
        client = client_for(url)
        b = wait_batch(client, create(client, named).id, lambda x: x.status == "failed", 30)
        assert b.errors is not None and b.in_progress_at is None
        (error,) = b.errors.data or []
        assert (error.code, error.line, error.param) == ("model_not_found", 1, "body.model")
        assert "'gpt-4o-mini'" in (error.message or "") and "'double'" in (error.message or "")
        assert "--serve-any-model" in (error.message or "")
        ok = wait_batch(client, create(client, served).id, lambda x: x.status == "completed", 30)
        assert ok.model == "double" and ok.metadata is None
    settings = double_settings(tmp_path / "any", serve_any_model=True)
    with in_thread(settings, InProcessDouble()) as url:
        client = client_for(url)
        f = client.files.create(file=("in.jsonl", named), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"mine": "kept"},
        )  # fmt: skip
        b = wait_batch(client, b.id, lambda x: x.status == "completed", 30)
        assert b.model == "double"
        assert b.metadata == {"mine": "kept", REQUESTED_MODEL_KEY: "gpt-4o-mini"}
        out, _ = check_finished(client, b, inputs=ids_of(2))
        assert {line["response"]["body"]["model"] for line in out} == {"double"}
        plain = wait_batch(
            client, create(client, lines_of(2)).id, lambda x: x.status == "completed"
        )
        assert plain.model == "double" and plain.metadata is None


def test_prompts_that_cannot_fit_the_context_fail_the_batch_before_it_runs(
    tmp_path: Path,
) -> None:
    line = '{"custom_id": "%s", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "%s"}], "max_tokens": 4}}\n'  # noqa: E501
    double = InProcessDouble(n_ctx_per_slot=64)
    with in_thread(double_settings(tmp_path), double) as url:
        client = client_for(url)
        long = "".join(line % (f"x{i}", "word " * 200) for i in range(3)).encode()
        b = wait_batch(client, create(client, long).id, lambda x: x.status == "failed", 30)
        assert b.errors is not None and b.in_progress_at is not None
        error = (b.errors.data or [])[0]
        assert error.code == "context_too_small"
        assert "64" in (error.message or "") and "tokens" in (error.message or "")
        out, err = check_finished(client, b, model=False, inputs=["x0", "x1", "x2"])
        assert out == [] and error_codes(err) == {"batch_failed": 3}
        assert double.calls == 0  # nothing was sent
        # One long row among short ones: that row's error, never sent; the others run.
        mixed = lines_of(9) + (line % ("long", "word " * 200)).encode()
        b = wait_batch(client, create(client, mixed).id, lambda x: x.status == "completed", 30)
        out, err = check_finished(client, b, model=False, inputs=[*ids_of(9), "long"])
        assert len(out) == 9 and [x["custom_id"] for x in err] == ["long"]
        assert err[0]["error"]["code"] == "ContextOverflow"
        assert double.calls == 9


@pytest.mark.parametrize(
    "data",
    [
        b"a\n\nb\n",
        b"a\r\n\r\n  \r\nb",
        b"\xef\xbb\xbfa\n \t\nb\n\n",
        "a\n\u00a0\u2028\nb\u2028c\n\u00e9\n".encode(),
        b"\n\n\n",
        b"x",
    ],
)
def test_upload_line_counts_agree_with_validation(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    expected = check_input(path).lines
    for size in (1, 2, 3, len(data)):
        counter = LineCounter()
        for i in range(0, len(data), size):
            counter.feed(data[i : i + size])
        assert counter.finish() == expected, size


def test_uploads_count_request_lines_as_validation_does(tmp_path: Path) -> None:
    settings = double_settings(tmp_path, max_lines=2)
    two = lines_of(2).replace(b"\n", b"\n\n  \r\n", 1)  # blank lines between: still 2 requests
    with in_thread(settings, InProcessDouble()) as url:
        client = client_for(url)
        f = client.files.create(file=("two.jsonl", two), purpose="batch")
        b = wait_batch(client, client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id, lambda x: x.status == "completed", 30)  # fmt: skip
        assert b.request_counts is not None and b.request_counts.total == 2
        with pytest.raises(openai.BadRequestError) as many:
            client.files.create(file=("three.jsonl", lines_of(3)), purpose="batch")
        assert many.value.body["code"] == "too_many_lines"  # type: ignore[index]


def test_validation_names_the_parameter_at_fault(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5", '
        '"seed": 1.5, "temperature": "hot"}}\n'
    )
    got = [(e.param, e.message) for e in check_input(path).errors]
    assert got == [
        ("body.max_tokens", "`body.max_tokens` must be an integer."),
        ("body.seed", "`body.seed` must be an integer."),
        ("body.temperature", "`body.temperature` must be a number."),
    ]


def test_a_batch_input_is_parsed_once_per_pass_as_the_engine_reads_it_and_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation parses each line once and keeps no request (a queued batch holds none in
    memory); the run reads the file again into the items `harness run` would build."""
    path = make_batch_file(tmp_path, 6)
    loads = json.loads
    parsed: list[int] = []

    def counting(text: str | bytes, **kw: Any) -> Any:
        parsed.append(1)
        return loads(text, **kw)

    monkeypatch.setattr(json, "loads", counting)
    checked = check_input(path)
    assert checked.ok and checked.lines == 6 and len(parsed) == 6  # one parse per line
    assert not hasattr(checked, "items")  # the result holds no requests
    items = read_items(path)
    assert len(parsed) == 12  # read again, once, for the run
    monkeypatch.setattr(json, "loads", loads)
    assert items == items_from_batch(read_batch_jsonl(path))
    # The rubric, the same on every line, is one string object in every item.
    assert len({id(it.messages[0]["content"]) for it in items}) == 1

    checks: list[str] = []
    reads: list[str] = []

    def counted(p: Path, **kw: Any) -> Any:
        checks.append(p.name)
        return check_input(p, **kw)

    def counted_read(p: Path, **kw: Any) -> Any:
        reads.append(p.name)
        return read_items(p, **kw)

    monkeypatch.setattr("harness.api.runner.check_input", counted)
    monkeypatch.setattr("harness.api.runner.read_items", counted_read)
    with in_thread(double_settings(tmp_path), InProcessDouble()) as url:
        client = client_for(url)
        f = client.files.create(file=(path.name, path.read_bytes()), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_batch(client, b.id, lambda x: x.status == "completed", 30)
    assert checks == [f.id] and reads == [f.id]  # validated once; read once for its run


def test_the_throughput_plot_is_drawn_once_and_never_read_half_written(tmp_path: Path) -> None:
    with in_thread(double_settings(tmp_path), InProcessDouble()) as url:
        client = client_for(url)
        b = wait_batch(client, create(client, lines_of(5)).id, lambda x: x.status == "completed")
        got: list[bytes] = []

        def fetch() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                r = http.get(f"/batches/{b.id}/throughput.png")
                assert r.status_code == 200
                got.append(r.content)

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(got) == 4 and len(set(got)) == 1 and got[0][:8] == PNG_SIGNATURE
    left = [p.name for p in (tmp_path / "data" / "batches" / b.id).iterdir()]
    assert sorted(left) == ["results.jsonl", "throughput.png"]


# -- the service over the embedded tiny model --------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def batch_200(workdir: Path) -> Path:
    """200 OpenAI Batch lines made by `harness convert`."""
    return make_batch_file(workdir, 200)


HOLD_AT = 5
"""The module's service holds each batch of more than 5 requests once 5 are done."""


@pytest.fixture(scope="module")
def service(workdir: Path) -> Iterator[ApiProcess]:
    api = ApiProcess(workdir, workdir / "data")
    try:
        api.start(hold_at=HOLD_AT)
        yield api
        assert api.stop() == 0
    finally:
        left = api.cleanup()
    assert left == [], f"processes left running: {left}"


@pytest.fixture(scope="module")
def client(service: ApiProcess) -> Iterator[OpenAI]:
    with client_for(service.url, keep=True) as c:
        yield c


@pytest.mark.integration
def test_cancel_a_running_batch_keeps_its_finished_lines(
    client: OpenAI, workdir: Path, batch_200: Path
) -> None:
    small = workdir / "cancel.jsonl"
    small.write_text("".join(batch_200.read_text().splitlines(keepends=True)[:40]))
    f = client.files.create(file=(small.name, small.read_bytes()), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    held = wait_batch(client, b.id, lambda x: done_count(x) == HOLD_AT, 120)
    assert held.status == "in_progress"
    cancelling = client.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    b = wait_batch(client, b.id, lambda x: x.status == "cancelled", 60)
    assert b.cancelled_at is not None and b.completed_at is None
    inputs = [json.loads(x)["custom_id"] for x in small.read_text().splitlines()]
    out, err = check_finished(client, b, inputs=inputs)
    # The 5 that ran are in the output (or errors of their own); the 35 others never ran.
    cancelled = [line for line in err if line["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) == 40 - HOLD_AT and len(out) + len(err) - len(cancelled) == HOLD_AT


@pytest.fixture(scope="module")
def big_batch(client: OpenAI, batch_200: Path) -> Batch:
    """The 200-line batch, created (not waited for)."""
    f = client.files.create(file=(batch_200.name, batch_200.read_bytes()), purpose="batch")
    assert f.bytes == batch_200.stat().st_size
    return client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"test": "200 lines"},
    )


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str | None]] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-batch"):
            self.rows[str(a["data-batch"])] = a

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.integration
def test_a_second_service_on_a_busy_data_dir_exits_2_and_touches_nothing(
    client: OpenAI, service: ApiProcess, big_batch: Batch
) -> None:
    """One service per data dir: a second `harness api` on it, while the first runs a batch
    (held at HOLD_AT), exits 2 with one line naming the first's pid and command, before it
    reads the dir or stops the first one's model server; the batch goes on untouched (the
    module's later tests check it completes with every custom_id once)."""
    wait_batch(client, big_batch.id, lambda x: done_count(x) == HOLD_AT, 180)
    assert service.proc is not None
    servers = [p for p in service._note_children() if alive(p)]
    assert servers, "the first service's model server"
    results = service.data_dir / "batches" / big_batch.id / "results.jsonl"
    before = results.read_bytes()
    second = subprocess.run(
        [sys.executable, "-m", "harness.api", "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(service.data_dir), *MODEL_ARGS],
        capture_output=True, text=True, timeout=120, check=False, cwd=service.workdir,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert second.stdout == ""
    (line,) = second.stderr.splitlines()
    assert line.startswith(f"harness api: error: the data dir {service.data_dir} is in use")
    assert f"pid {service.proc.pid} (" in line and "harness" in line and "--data-dir" in line
    assert all(alive(p) for p in servers), "the second service stopped the first's server"
    held = client.batches.retrieve(big_batch.id)
    assert held.status == "in_progress" and done_count(held) == HOLD_AT
    assert results.read_bytes() == before
    print(f"\nsecond harness api on the busy data dir: exit 2: {line}")


@pytest.mark.integration
@pytest.mark.browser
def test_page_shows_the_running_batch_in_chromium(
    chromium: Path,  # noqa: F811
    service: ApiProcess,
    client: OpenAI,
    big_batch: Batch,
    tmp_path: Path,
) -> None:
    wait_batch(client, big_batch.id, lambda x: done_count(x) == HOLD_AT, 180)
    try:
        proc = run_chromium(
            chromium, tmp_path, "--virtual-time-budget=2000", "--dump-dom", service.url
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = _Rows()
        dom.feed(proc.stdout)
        row = dom.rows[big_batch.id]
        assert row["data-status"] == "in_progress", row
        assert row["data-total"] == "200"
        assert row["data-done"] == str(HOLD_AT), row  # held there: nothing in flight
        text = " ".join(dom.text)
        assert "req/s" in text and "(queued)" not in text
        shot = tmp_path / "page.png"
        proc = run_chromium(
            chromium, tmp_path, "--virtual-time-budget=2000", "--hide-scrollbars",
            f"--screenshot={shot}", "--window-size=1280,800", service.url,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        release(service.data_dir, big_batch.id)
    data = shot.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    from matplotlib import image

    pixels = image.imread(str(shot))
    assert pixels.shape[:2] == (800, 1280)
    # The progress bar's green (#2da44e) is on the page.
    green = (abs(pixels[..., 0] - 0x2D / 255) < 0.02) & (abs(pixels[..., 1] - 0xA4 / 255) < 0.02)
    assert green.sum() > 20


@pytest.fixture(scope="module")
def finished_200(
    client: OpenAI, service: ApiProcess, big_batch: Batch
) -> tuple[Batch, list[dict[str, Any]]]:
    wait_batch(client, big_batch.id, lambda x: done_count(x) >= HOLD_AT, 180)
    release(service.data_dir, big_batch.id)  # the browser test may not have run
    started = time.monotonic()
    b = wait_batch(client, big_batch.id, lambda x: x.status == "completed", 900)
    print(f"200-line batch: completed {time.monotonic() - started:.1f} s after the wait began")
    out, err = check_finished(client, b)
    assert err == []
    return b, out


@pytest.mark.integration
def test_200_line_batch_completes_every_custom_id_once(
    client: OpenAI,
    service: ApiProcess,
    batch_200: Path,
    finished_200: tuple[Batch, list[dict[str, Any]]],
) -> None:
    b, out = finished_200
    inputs = [json.loads(x)["custom_id"] for x in batch_200.read_text().splitlines()]
    assert len(out) == 200
    assert sorted(line["custom_id"] for line in out) == sorted(inputs)
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
        200, 200, 0,
    )  # fmt: skip
    assert b.error_file_id is None and b.errors is None
    assert b.metadata == {"test": "200 lines"}
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at  # type: ignore[operator]
    assert b.usage is not None and b.usage.output_tokens > 0
    assert b.usage.input_tokens == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in out)
    output = client.files.retrieve(b.output_file_id)  # type: ignore[arg-type]
    assert output.purpose == "batch_output"
    # The embedded default's lines are chat.completion bodies holding the model's reply,
    # naming the model as the batch does (not the file llama.cpp loaded).
    check_replies(out, service.data_dir / "batches" / b.id / RESULTS_NAME)
    assert {line["response"]["body"]["model"] for line in out} == {b.model} == {"tiny-gemma3"}


def harness_run_scores(workdir: Path, batch: Path, sample: int | None) -> dict[str, int]:
    out = workdir / f"run-{sample or 'all'}_scores.csv"
    argv = ["run", str(batch), *MODEL_ARGS, "--no-progress", "--output", str(out)]
    if sample is not None:
        argv += ["--sample", str(sample)]
    assert harness_main(argv) == 0
    with out.open(newline="") as fh:
        return {row["custom_id"]: int(row["score"]) for row in csv.DictReader(fh)}


@pytest.mark.integration
def test_scores_match_harness_run_on_a_sample_of_the_same_file(
    workdir: Path, batch_200: Path, finished_200: tuple[Batch, list[dict[str, Any]]]
) -> None:
    api = {line["custom_id"]: score_of(line) for line in finished_200[1]}
    run = harness_run_scores(workdir, batch_200, sample=30)
    assert len(run) == 30
    assert {cid: api[cid] for cid in run} == run


@pytest.mark.integration
@pytest.mark.slow
def test_scores_match_harness_run_on_every_line_of_the_same_file(
    workdir: Path, batch_200: Path, finished_200: tuple[Batch, list[dict[str, Any]]]
) -> None:
    api = {line["custom_id"]: score_of(line) for line in finished_200[1]}
    assert harness_run_scores(workdir, batch_200, sample=None) == api


MALFORMED = [
    '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}',  # noqa: E501
    '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [',
    '{"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}',  # noqa: E501
    "",
    '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}',  # noqa: E501
    '{"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"messages": [{"role": "user", "content": "hi"}]}}',  # noqa: E501
    '{"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": {"max_tokens": 5}}',  # noqa: E501
    '{"custom_id": "g", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "ok"}]}}',  # noqa: E501
]


@pytest.mark.integration
def test_malformed_input_fails_the_batch_with_line_numbered_errors_and_runs_nothing(
    client: OpenAI, service: ApiProcess
) -> None:
    f = client.files.create(
        file=("bad.jsonl", "\n".join(MALFORMED).encode() + b"\n"), purpose="batch"
    )
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait_batch(client, b.id, lambda x: x.status == "failed", 60)
    assert b.failed_at is not None and b.in_progress_at is None
    assert b.errors is not None and b.errors.object == "list"
    got = [(e.line, e.code, e.param) for e in b.errors.data or []]
    assert got == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "invalid_url", "url"),
        (7, "missing_required_parameter", "body.messages"),
    ]
    assert "line 1" in (b.errors.data or [])[2].message  # type: ignore[operator]
    assert b.output_file_id is None and b.error_file_id is None
    assert b.request_counts is not None and b.request_counts.completed == 0
    assert not (service.data_dir / "batches" / b.id).exists()  # nothing ran


@pytest.mark.integration
def test_batches_list_pages_newest_first(client: OpenAI) -> None:
    f = client.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch")
    made = [
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[:-3:-1] and first.has_more
    second = first.get_next_page()
    assert [b.id for b in second.data] == made[-3:-5:-1]
    every = [b.id for b in client.batches.list(limit=2)]  # auto-paging
    assert len(every) == len(set(every)) and every[:5] == made[::-1]
    assert len(every) == len(client.batches.list(limit=100).data)
    assert client.batches.list(limit=100).has_more is False


@pytest.mark.integration
def test_passthrough_page_metrics_and_health(
    client: OpenAI, service: ApiProcess, batch_200: Path
) -> None:
    models = client.models.list()
    assert len(models.data) >= 1
    reply = client.chat.completions.create(
        model=models.data[0].id, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    small = b"".join(batch_200.read_bytes().splitlines(keepends=True)[:2])
    done = wait_batch(client, create(client, small).id, lambda x: x.status == "completed", 120)
    with httpx.Client(base_url=service.url, timeout=60) as http:
        text = http.get("/metrics").text
        assert 'harness_api_batches{status="completed"}' in text
        assert "harness_api_passthrough_requests_total 2" in text
        label = f'{{batch="{done.id}",outcome="completed"}}'
        assert f"harness_api_batch_requests_total{label} 2" in text
        assert f'harness_api_batch_cached_tokens_total{{batch="{done.id}"}}' in text
        page = http.get("/")
        assert page.status_code == 200 and "harness api: batches" in page.text
        assert f'data-batch="{done.id}" data-status="completed" data-done="2"' in page.text
        png = http.get(f"/batches/{done.id}/throughput.png")
        assert png.status_code == 200 and png.content[:8] == PNG_SIGNATURE
        assert http.get("/health").json() == {"status": "ok"}


@pytest.mark.integration
def test_a_foreign_host_or_origin_is_refused_by_the_real_service(
    client: OpenAI, service: ApiProcess
) -> None:
    with httpx.Client(base_url=service.url, timeout=60) as http:
        for headers in ({"host": "evil.example"}, {"origin": "http://evil.example"}):
            for path in ("/v1/files", "/", "/v1/batches"):
                r = http.get(path, headers=headers)
                assert r.status_code == 403, (path, headers)
                assert r.json()["error"]["code"] == "caller_not_allowed"
        assert http.get("/").status_code == 200  # the page, on 127.0.0.1
        port = service.url.rsplit(":", 1)[1]
        assert http.get("/", headers={"host": f"localhost:{port}"}).status_code == 200
    assert client.batches.list(limit=1).data  # the openai client, on 127.0.0.1


# -- the same batch through the Ollama and OpenAI-compatible backends --------------------------


def run_on(api: ApiProcess, batch: Path) -> tuple[Batch, list[dict[str, Any]]]:
    client = client_for(api.url)
    f = client.files.create(file=(batch.name, batch.read_bytes()), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait_batch(client, b.id, lambda x: x.status == "completed", 300)
    out, err = check_finished(client, b)
    assert err == [] and len(out) == b.request_counts.total  # type: ignore[union-attr]
    check_replies(out, api.data_dir / "batches" / b.id / RESULTS_NAME)
    return b, out


@pytest.mark.integration
def test_the_official_client_reads_every_reply_on_a_replayed_ollama(
    tmp_path: Path, tiny_server: Any
) -> None:
    """`harness api --backend ollama` on a loopback server replaying recorded Ollama bodies
    (tests/ollama_replay.py; the reply text and each reply's token counts are set here, the
    counts by a real tokenizer as a server would count): every output line's
    `body.choices[0].message.content` holds the reply, and cached tokens appear as Ollama
    reported them (`prompt_eval_cached_count` → `prompt_tokens_details.cached_tokens`)."""
    from ollama_replay import OllamaReplay, counting

    batch = make_batch_file(tmp_path, 8, "ollama")
    content = '{"score": 7}'
    with OllamaReplay(version="0.34.0", content=content, counts=counting(tiny_server.url)) as r:
        api = ApiProcess(
            tmp_path, tmp_path / "data", "--backend", "ollama", "--base-url", r.url,
            model_args=("--model", "gemma3:12b", "--ctx", "4096"),
        )  # fmt: skip
        try:
            api.start()
            b, out = run_on(api, batch)
            assert api.stop() == 0
        finally:
            left = api.cleanup()
        chats = r.chats()
    assert left == []
    assert len(chats) == 8 and b.model == "gemma3:12b"
    for line in out:
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] == content
        assert body["model"] == "gemma3:12b" and body["choices"][0]["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 40


@pytest.mark.integration
def test_the_official_client_reads_every_reply_on_an_openai_compatible_server(
    tmp_path: Path, tiny_server: Any
) -> None:
    """`harness api --backend openai` on a real llama.cpp server (the tiny model's)."""
    batch = make_batch_file(tmp_path, 8, "openai")
    api = ApiProcess(
        tmp_path, tmp_path / "data", "--backend", "openai",
        "--base-url", f"{tiny_server.url}/v1", model_args=(),
    )  # fmt: skip
    try:
        api.start()
        _, out = run_on(api, batch)
        assert api.stop() == 0
    finally:
        left = api.cleanup()
    assert left == []
    assert all(isinstance(score_of(line), int) for line in out)


# -- killed and restarted ---------------------------------------------------------------------


@pytest.mark.integration
def test_sigkill_mid_batch_and_while_finalizing_then_restart_completes_exactly_once(
    tmp_path: Path,
) -> None:
    batch = make_batch_file(tmp_path, 16, "kill")
    data = tmp_path / "data"
    api = ApiProcess(tmp_path, data)
    env = {"HARNESS_API_KEY": KEY}
    try:
        client = client_for(api.start(env, hold_at=5), KEY)
        f = client.files.create(file=(batch.name, batch.read_bytes()), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        b = wait_batch(client, b.id, lambda x: done_count(x) == 5, 120)  # held: none in flight
        orphans = api.sigkill()
        assert orphans, "the model server should outlive a SIGKILLed service"
        results = data / "batches" / b.id / "results.jsonl"
        assert results.read_bytes().count(b"\n") == 5

        # Restart: the orphan is stopped, the batch resumes; kill it again while finalizing
        # (the pause between writing the output files and committing them).
        client = client_for(api.start(env, finalize_delay_s=60), KEY)
        assert not any(alive(p) for p in orphans), "the restart stops the server left behind"
        b = wait_batch(client, b.id, lambda x: x.status == "finalizing", 120)
        assert b.finalizing_at is not None and done_count(b) == 16
        time.sleep(1.0)  # inside the pause: the output files are written, not yet named
        orphans = api.sigkill()
        left_behind = {p.name for p in (data / "files").iterdir()}

        client = client_for(api.start(env), KEY)
        b = wait_batch(client, b.id, lambda x: x.status == "completed", 120)
        out, err = check_finished(client, b)
        ids = sorted(line["custom_id"] for line in out + err)
        assert ids == sorted(json.loads(x)["custom_id"] for x in batch.read_text().splitlines())
        assert b.request_counts is not None and b.request_counts.total == 16
        assert results.read_bytes().count(b"\n") == 16  # each request ran once
        stored = {x.id for x in client.files.list()}
        assert {p.name for p in (data / "files").iterdir()} == stored  # unnamed blobs swept
        # The killed finalization had written its files (never named); the rerun wrote new ones.
        assert len(left_behind) == len(stored) > 1 and left_behind & stored == {f.id}
        assert api.stop() == 0
    finally:
        left = api.cleanup()
    assert left == [], f"processes left running: {left}"
    written = files_in(data) | {str(p): p.read_bytes() for p in api.logs}
    assert not [p for p, v in written.items() if KEY.encode() in v], "the key was written"
