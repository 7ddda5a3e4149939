"""The reliability suite's case guard (suites/reliability/conftest.py): a case that raises before
recording its figures enters the report as a failed case with its exception, and one that skips
says why — so a crash can never leave a case absent and the report PASS without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]

CASES_MODULE = """
import pytest

CASES = {"test_boom": "boom", "test_skipped": "skippy", "test_fine": "fine"}


def test_boom(cases):
    raise RuntimeError("the server went away before any figure")


def test_skipped(cases):
    pytest.skip("an Ollama case (--harness-backend ollama)")


def test_fine(cases):
    cases["fine"] = {"passed": True, "failed_checks": []}


def test_zz_report(cases, skipped_cases):
    assert cases["boom"]["passed"] is False
    assert cases["boom"]["failed_checks"] == ["raised"]
    assert "RuntimeError: the server went away before any figure" in cases["boom"]["error"]
    assert cases["fine"]["passed"] is True
    assert skipped_cases == {"skippy": "an Ollama case (--harness-backend ollama)"}
"""


def test_a_crashed_case_is_a_failed_case_and_a_skipped_one_says_why(
    pytester: pytest.Pytester,
) -> None:
    shutil.copy(ROOT / "suites" / "reliability" / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(test_cases=CASES_MODULE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:harness")
    result.assert_outcomes(passed=2, failed=1, skipped=1)


INTERRUPTED_MODULE = """
CASES = {"test_interrupted": "interrupted"}


def test_interrupted(cases):
    raise KeyboardInterrupt
"""


def test_a_case_interrupted_by_ctrl_c_ends_the_session_without_a_guard_error(
    pytester: pytest.Pytester,
) -> None:
    """Ctrl-C during a case left the guard a passed setup and no call report: it crashed on
    the missing traceback (IndexError) in the middle of pytest's interrupted teardown."""
    shutil.copy(ROOT / "suites" / "reliability" / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(test_cases=INTERRUPTED_MODULE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:harness")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "IndexError" not in result.stdout.str() + result.stderr.str()
