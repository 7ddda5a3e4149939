"""`harness run` on a real pseudo-terminal draws a progress bar with rate and ETA."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from harness.workload import write_candidates_csv

PROMPT = Path(__file__).resolve().parent.parent / "scenarios" / "prompts" / "short_screen.yaml"


@pytest.mark.integration
def test_harness_run_shows_a_bar_on_a_terminal(tmp_path: Path) -> None:
    write_candidates_csv(tmp_path / "c.csv", 20, seed=2)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # 120 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(tmp_path / "c.csv"), "--model", "tiny-gemma3",
         "--prompt", str(PROMPT), "--structured", "none", "--max-tokens", "4", "--ctx", "2048"],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(leader, 4096)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "\r" in screen  # the bar redraws in place
    assert "20/20" in screen and "req/s" in screen and "<" in screen  # count, rate, ETA
