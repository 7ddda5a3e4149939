"""What the reliability cases share: the session's record of cases, and a guard so that every
case enters the report whatever happens — one that raised before recording its figures is a
failed case (with the exception), one that skipped says why. Cases are named by the test
module's `CASES` (test function → case name)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

OUTCOME = pytest.StashKey[dict[str, pytest.TestReport]]()
Cases = dict[str, dict[str, Any]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(OUTCOME, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def cases() -> Cases:
    """What each case measured, with its checks' verdict (the report reads this)."""
    return {}


@pytest.fixture(scope="session")
def skipped_cases() -> dict[str, str]:
    """Cases that did not run, and why (the report lists them)."""
    return {}


@pytest.fixture(autouse=True)
def case_guard(
    request: pytest.FixtureRequest, cases: Cases, skipped_cases: dict[str, str]
) -> Iterator[None]:
    yield
    name = getattr(request.module, "CASES", {}).get(request.node.originalname)
    if name is None or name in cases:
        return
    reports = request.node.stash.get(OUTCOME, {})
    setup, call = reports.get("setup"), reports.get("call")
    if call is None and setup is not None and setup.passed:
        return  # interrupted (Ctrl-C) during its call: the session ends, no report is written
    if call is None and setup is not None and setup.skipped:
        skipped_cases[name] = _skip_reason(setup)
    elif call is not None and call.skipped:
        skipped_cases[name] = _skip_reason(call)
    else:
        failed = call if call is not None and call.failed else setup
        cases[name] = {"passed": False, "failed_checks": ["raised"], "error": _error(failed)}


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _error(report: pytest.TestReport | None) -> str:
    """`Type: message` of what a case raised, and where."""
    if report is None:
        return "the case ended without a report"
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{crash.message} ({crash.path}:{crash.lineno})"[:500]
    return report.longreprtext.strip().splitlines()[-1][:500]
