"""The reliability report's figures and table (harness.phases.reliability) from made-up cases:
sums only over the cases that measured a figure, the fault figures only when the fault case ran,
and one table line a case, skipped ones with why; the faults case's timeout sized from the job."""

from __future__ import annotations

from typing import Any

import pytest

from harness.phases.reliability import (
    case_table,
    fault_timeouts,
    longest_items,
    reliability_figures,
)
from harness.workload import WorkItem

FAULTS: dict[str, Any] = {
    "requests": 1000, "completed": 1000, "lost": 0, "duplicated": 0, "faults_injected": 71,
    "retried_successes": 70, "recorded_errors": 0, "accounting_gap": 0, "passed": True,
    "failed_checks": [],
}  # fmt: skip
KILLS: dict[str, Any] = {
    "requests": 200, "completed": 199, "lost": 1, "duplicated": 2, "kills": 5,
    "restart_failed": 1, "passed": False, "failed_checks": ["exactly_once"],
}  # fmt: skip


def test_figures_sum_what_the_cases_measured() -> None:
    cases = {"faults": FAULTS, "runner_kills": KILLS}
    got = reliability_figures(cases, {"secrets": "no key set"})
    assert (got["lost"], got["duplicated"], got["completed"]) == (1, 2, 1199)
    assert (got["cases_run"], got["cases_failed"]) == (2, 1)
    assert got["cases_skipped"] == {"secrets": "no key set"}
    # measured by no case: None (unknown), never 0
    assert got["keys_leaked"] is None and got["replies_differ"] is None
    assert got["restart_failed"] == 1
    assert (got["faults_injected"], got["accounting_gap"]) == (71, 0)
    assert got["cases"] is cases


def test_fault_figures_are_absent_when_the_fault_case_did_not_run() -> None:
    got = reliability_figures({"runner_kills": KILLS}, {})
    assert not {"faults_injected", "retried_successes", "recorded_errors"} & set(got)


def test_the_table_has_a_line_a_case_and_the_skipped_ones() -> None:
    table = case_table({"faults": FAULTS, "runner_kills": KILLS}, {"secrets": "no key"})
    lines = table.splitlines()
    assert lines[0].split() == [
        "case", "passed", "requests", "faults/kills", "retried", "ok", "errors", "lost", "dup",
    ]  # fmt: skip
    assert lines[1].split() == ["faults", "yes", "1000", "71", "70", "0", "0", "0"]
    assert lines[2].split() == ["runner_kills", "NO:", "exactly_once", "200", "5", "-", "-",
                                "1", "2"]  # fmt: skip
    assert lines[3].split() == ["secrets", "skipped:", "no", "key", "-", "-", "-", "-", "-", "-"]
    # columns line up: each column starts at the same place on every line
    assert lines[1].index("yes") == lines[2].index("NO:") == lines[0].index("passed")


def test_the_fault_timeout_is_four_times_the_slowest_warm_request_with_a_floor() -> None:
    # The user's 1-3 KB rows: 0.9 s warm on a loaded CPU -> 3.6 s, the stall 3.5 s past it.
    assert fault_timeouts([400.0, 900.0, 650.0]) == {
        "slowest_warm_request_s": 0.9,
        "request_timeout_s": 3.6,
        "stall_s": 7.1,
    }
    # The case's own short prompt on the tiny model: the 1.5 s floor.
    assert fault_timeouts([40.0, 60.0])["request_timeout_s"] == 1.5
    with pytest.raises(ValueError, match="no warm request"):
        fault_timeouts([])


def test_the_longest_items_are_the_ones_with_the_most_text() -> None:
    def item(cid: str, text: str) -> WorkItem:
        return WorkItem(
            cid, ({"role": "system", "content": "rubric"}, {"role": "user", "content": text})
        )

    items = [item("a", "x" * 10), item("b", "x" * 3000), item("c", "x" * 5), item("d", "x" * 900)]
    assert [it.custom_id for it in longest_items(items, 2)] == ["b", "d"]
