"""The HTML report renders in a real browser (headless Chromium) with every plot loaded.

Chromium is Debian's `chromium` package. When /usr/bin/chromium is missing, the set-up runs
scripts/install-chromium.sh once (it needs root or passwordless sudo, and network access to the
Debian mirror); if that fails, the test is skipped with the script's message. The report dir is
served by a stdlib HTTP server on 127.0.0.1; each Chromium run has a 60 s timeout, runs in its own
session, and anything it leaves behind in that session is killed and checked gone.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import psutil
import pytest

from harness.htmlreport import build_index
from harness.plots import (
    EfficiencyRow,
    MemoryPoint,
    SavingsRow,
    plot_efficiency,
    plot_memory_vs_context,
    plot_savings_by_strategy,
    plot_throughput_over_run,
)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-chromium.sh"
TIMEOUT_S = 60
INSTALL_TIMEOUT_S = 600
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIB = 1024 * 1024

# Without the networking flags Chromium tries to reach Google services and logs failures; QUIC
# and the sandbox (needs user namespaces, absent when running as root in a container) are off.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """/usr/bin/chromium, installed by scripts/install-chromium.sh on first use if missing."""
    if not CHROMIUM.exists():
        try:
            proc = subprocess.run(
                ["bash", str(INSTALL_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"chromium missing and {INSTALL_SCRIPT.name} could not run: {exc}")
        if proc.returncode != 0 or not CHROMIUM.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            pytest.skip(
                f"chromium missing and {INSTALL_SCRIPT.name} failed "
                f"(exit {proc.returncode}): {' | '.join(tail)}"
            )
    return CHROMIUM


def _session_processes(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in session `sid`."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _kill_session(sid: int) -> list[psutil.Process]:
    """Kill every live process of session `sid` (Chromium's helpers); return the survivors."""
    for proc in _session_processes(sid):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + 5
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def run_chromium(chromium: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run with a timeout; nothing of it is left running afterwards."""
    cmd = [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: every helper it forks can be found and killed
        cwd=profile,
    )
    sid = proc.pid
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish in {TIMEOUT_S} s: {' '.join(cmd)}")
    finally:
        survivors = _kill_session(sid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert survivors == [], f"chromium processes left running: {survivors}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (an ephemeral port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="report-http", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _BodyAttrs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] | None = None
        self.imgs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and self.body is None:
            self.body = dict(attrs)
        elif tag == "img":
            self.imgs += 1


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report dir with all four plots (one in a subfolder), JSON reports and a broken one."""
    d = tmp_path_factory.mktemp("browser-report")
    points = [MemoryPoint(n, 300 * MIB + 36_864 * n) for n in (2048, 4096, 8192)]
    plot_memory_vs_context(points, 36_864, 300 * MIB, d / "memory.png", max_context=40_000)
    finish = [i * 0.1 for i in range(200)]
    latency: list[float | None] = [50.0 + (i % 17) for i in range(200)]
    plot_throughput_over_run(finish, latency, d / "phase2" / "throughput over run.png")
    plot_savings_by_strategy([SavingsRow("a", 0.4, 0.8), SavingsRow("b", 0.7, 0.75)], d / "s.png")
    plot_efficiency([EfficiencyRow("x", 8.0, 10.0, 2.0)], d / "efficiency.png")
    (d / "phase1.json").write_text(
        '{"throughput_rps": 3.5, "criteria": [{"metric": "error_rate", "op": "<=", '
        '"threshold": 0.01, "value": 0.2, "passed": false}]}'
    )
    (d / "phase2" / "broken.json").write_text("{")
    return d


def test_report_renders_with_every_image_loaded(
    chromium: Path, report_dir: Path, tmp_path: Path
) -> None:
    build_index(report_dir, check_images=True)
    n_png = len(list(report_dir.rglob("*.png")))
    assert n_png == 4

    with serve(report_dir) as base:
        proc = run_chromium(
            chromium, tmp_path, "--virtual-time-budget=5000", "--dump-dom", base + "index.html"
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = _BodyAttrs()
        dom.feed(proc.stdout)
        assert dom.body is not None, f"no <body> in the dumped DOM: {proc.stdout[:500]!r}"
        assert dom.imgs == n_png
        assert dom.body.get("data-images-total") == str(n_png), dom.body
        assert dom.body.get("data-images-ok") == str(n_png), (
            f"broken images: {dom.body.get('data-images-broken')!r}"
        )

        shot = tmp_path / "shot.png"
        proc = run_chromium(
            chromium,
            tmp_path,
            "--virtual-time-budget=5000",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            base + "index.html",
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000, len(data)
    from matplotlib import image

    height, width = image.imread(str(shot)).shape[:2]
    assert (width, height) == (1200, 2000)
