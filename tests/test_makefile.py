"""`make test` fails when a selection runs no tests (pytest's exit code 5)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("target", "selection"),
    # Registered markers that select nothing there: what a renamed marker would leave.
    [
        ("test-unit", "UNIT_MARK=scale_170k"),
        ("test-suites", "SUITES_MARK=quality"),
        ("test-quality", "QUALITY_MARK=scale_170k"),
    ],
)
def test_an_empty_selection_fails_make_test(target: str, selection: str) -> None:
    done = subprocess.run(
        ["make", "-s", target, selection],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "deselected" in done.stdout  # pytest ran, selected nothing (exit 5), make failed
