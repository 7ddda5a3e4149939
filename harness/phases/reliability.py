"""The reliability phase's report: its cases' figures summed (a figure no case measured stays
absent or None, never 0), and the table of cases the suite prints and writes beside the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.workload import WorkItem

__all__ = [
    "FAULT_FIGURES",
    "case_table",
    "fault_timeouts",
    "longest_items",
    "reliability_figures",
]

Cases = Mapping[str, Mapping[str, Any]]

FAULT_FIGURES = ("faults_injected", "retried_successes", "recorded_errors", "accounting_gap")
"""The fault case's own figures, in the report only when that case ran (absent, not zero)."""

SUMMED = ("lost", "duplicated", "completed")
COUNTED = ("keys_leaked", "replies_differ", "restart_failed")


TIMEOUT_FLOOR_S = 1.5
"""The faults case's shortest request timeout: its own short prompt on the tiny model answers
in well under it, so a timeout there is a stall the proxy injected."""
TIMEOUT_FACTOR = 4.0
"""The timeout as a multiple of the slowest warm request measured on the job's longest rows: a
busy machine slows a request ~2x; a real request that timed out would count as a failed attempt
no fault caused (the case's exact accounting fails on it)."""
STALL_PAST_TIMEOUT_S = 3.5
"""How much longer an injected stall lasts than the timeout (so each stall is one timeout)."""


def longest_items(items: Sequence[WorkItem], n: int = 3) -> list[WorkItem]:
    """The `n` items with the most characters of message text: the slowest requests of a job
    (its longest rows), to time before sizing a timeout."""
    return sorted(items, key=lambda it: -sum(len(m["content"]) for m in it.messages))[:n]


def fault_timeouts(latencies_ms: Sequence[float]) -> dict[str, float]:
    """The faults case's request timeout and injected stall, from warm requests of the job's
    longest rows (`latencies_ms`, measured on the case's own server without the proxy).

    A user's rows (1-3 KB résumés) take longer than the case's 1.5 s on a loaded CPU: every
    request then timed out, and the case reported a fault in every attempt it had not injected.
    """
    if not latencies_ms:
        raise ValueError("fault_timeouts: no warm request was measured")
    slowest_s = max(latencies_ms) / 1000
    timeout = round(max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * slowest_s), 2)
    return {
        "slowest_warm_request_s": round(slowest_s, 3),
        "request_timeout_s": timeout,
        "stall_s": round(timeout + STALL_PAST_TIMEOUT_S, 2),
    }


def _total(cases: Cases, key: str) -> int | None:
    """`key` summed over the cases that have it; None when none has."""
    values = [f[key] for f in cases.values() if key in f]
    return sum(values) if values else None


def reliability_figures(cases: Cases, skipped: Mapping[str, str]) -> dict[str, Any]:
    """The report's figures from every case that ran (`cases`: each case's figures with
    `passed`) and those that skipped, with why."""
    faults = cases.get("faults")
    return {
        **{k: _total(cases, k) for k in SUMMED},
        # Each profile gates how many ran: one passing case cannot make the report PASS.
        "cases_run": len(cases),
        "cases_failed": sum(1 for f in cases.values() if not f["passed"]),
        "cases_skipped": dict(skipped),
        **{k: _total(cases, k) for k in COUNTED},
        **({k: faults[k] for k in FAULT_FIGURES} if faults else {}),
        "cases": cases,
    }


def case_table(cases: Cases, skipped: Mapping[str, str]) -> str:
    """One line a case: passed (or its failed checks), requests, faults or kills, retried
    successes, errors, lost and duplicated; then the skipped cases with why."""
    rows = [("case", "passed", "requests", "faults/kills", "retried ok", "errors", "lost", "dup")]
    for name, f in cases.items():
        rows.append(
            (
                name,
                "yes" if f["passed"] else "NO: " + ", ".join(f["failed_checks"]),
                str(f.get("requests", "-")),
                str(f.get("faults_injected", f.get("kills", f.get("server_kills", "-")))),
                str(f.get("retried_successes", "-")),
                str(f.get("recorded_errors", f.get("parse_errors", "-"))),
                str(f.get("lost", "-")),
                str(f.get("duplicated", "-")),
            )
        )
    rows += [
        (name, f"skipped: {why}", "-", "-", "-", "-", "-", "-") for name, why in skipped.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
