"""What a NO-GO says to try: one next step per failed criterion, from what was measured.

`next_step(criterion, report, evidence)` reads the failed criterion (`metric`, `value`,
`threshold`), the report it failed in, and the other production reports the verdict found
(`Evidence`: the newest concurrency, performance and context-limits reports, by their data), and
says what to change: the concurrency the concurrency phase measured fastest (with Ollama's
`OLLAMA_NUM_PARALLEL`), the score mode the performance phase measured faster, phase 1's safe
context, a deadline the measured rate meets. A figure it quotes is a report's; where the report
that would ground a step is missing it says which phase to run. Plain data in, a sentence out:
the verdict (`harness.verdict`) prints it beside the criterion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Evidence", "next_step"]

ROWS = 170_000


@dataclass(frozen=True, slots=True)
class Evidence:
    """The other reports a step can quote (their data; None when there is none)."""

    concurrency: Mapping[str, Any] | None = None
    performance: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    rows: int = ROWS


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _setting(report: Mapping[str, Any], key: str) -> Any:
    block = report.get("config")
    item = block.get(key) if isinstance(block, Mapping) else None
    return item.get("value") if isinstance(item, Mapping) else item


def _fastest(concurrency: Mapping[str, Any] | None) -> tuple[int, float] | None:
    cells = (concurrency or {}).get("server_concurrency")
    best: tuple[int, float] | None = None
    for cell in cells if isinstance(cells, list) else []:
        if not isinstance(cell, Mapping) or cell.get("errors"):
            continue
        n, rps = cell.get("concurrency"), _num(cell.get("throughput_rps"))
        if isinstance(n, int) and rps is not None and (best is None or rps > best[1]):
            best = (n, rps)
    return best


def _throughput(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    rate = _num(report.get("throughput_rps"))
    conc = _setting(report, "concurrency") or 1
    mode = _setting(report, "score_mode") or "decode"
    unc = _num(report.get("uncached_tokens_per_request"))
    steps = []
    head = ""
    if rate:
        hours = ev.rows / rate / 3600
        head = (
            f"at the measured {rate:.2f} req/s {ev.rows:,} rows take {hours:.1f} h (concurrency "
            f"{conc}, score mode {mode}"
            + (f", {unc:.0f} uncached prompt tokens a row" if unc is not None else "")
            + "): "
        )
    best = _fastest(ev.concurrency)
    if best is None:
        steps.append(
            "measure concurrency (pytest suites/performance against the server: requests in "
            "flight 1, 2, 4 against its slots)"
        )
    elif best[0] != conc:
        steps.append(
            f"the concurrency phase measured {best[1]:.2f} req/s at {best[0]} in flight: set "
            f"CONCURRENCY: {best[0]} in harness.yaml and OLLAMA_NUM_PARALLEL to at least {best[0]}"
        )
    else:
        steps.append(
            f"{conc} in flight is already the fastest the concurrency phase measured "
            f"({best[1]:.2f} req/s)"
        )
    ratio = _num((ev.performance or {}).get("logprobs_over_decode"))
    agree = _num((ev.performance or {}).get("score_agreement"))
    if mode != "logprobs":
        if ratio is not None and ratio > 1:
            steps.append(
                f"--score-mode logprobs, measured {ratio:.2f}x decode by the performance phase"
                + (f" (scores agreeing on {agree:.1%} of rows)" if agree is not None else "")
            )
        else:
            steps.append(
                "--score-mode logprobs (one forward step a row; the performance phase measures "
                "it against decode)"
            )
    if rate:
        steps.append(f"or a deadline of {math.ceil(ev.rows / rate / 3600)} h")
    return head + "; ".join(steps)


def _reuse(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    unc = _num(report.get("uncached_tokens_per_request"))
    conc = _setting(report, "concurrency") or 1
    said = f"{unc:.0f} uncached prompt tokens a row: " if unc is not None else ""
    return (
        f"{said}the shared rubric is not reused from the server's cache; give every request in "
        f"flight its own slot (OLLAMA_NUM_PARALLEL at least CONCURRENCY, {conc} in this run), "
        "keep the rubric byte for byte the same on every row (nothing per row in the system "
        "prompt), and keep the server's prompt cache on"
    )


def _context(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    ctx = ev.context or (report if report.get("phase") == "context_limits" else {})
    safe, longest = _num(ctx.get("safe_context_tokens")), _num(ctx.get("longest_prompt_tokens"))
    if safe is not None and longest is not None:
        if longest > safe:
            return (
                f"the longest prompt ({longest:.0f} tokens) is over phase 1's safe context "
                f"({safe:.0f}): shorten the longest rows (phase 1 names them) or the rubric, or "
                "a smaller quantization to free memory for more context"
            )
        return f"set num_ctx (--ctx) to phase 1's safe context, {safe:.0f} tokens"
    return "run phase 1 (pytest suites/context_limits) for the safe context, then set --ctx to it"


def _errors(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    kinds = report.get("errors_by_type")
    shown = (
        ", ".join(f"{k} {v}" for k, v in kinds.items())
        if isinstance(kinds, Mapping) and kinds
        else "see the phase's results file"
    )
    if isinstance(kinds, Mapping) and any("overflow" in str(k).lower() for k in kinds):
        return f"errors: {shown}: rows longer than the context; " + _context(c, report, ev)
    return f"errors: {shown}; fix their cause, then --retry-failed sends those rows again"


def _memory(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    safe = _num((ev.context or {}).get("safe_context_tokens"))
    return (
        "the model and its KV cache do not fit the GPU's memory with room to spare: a smaller "
        + (f"context (phase 1's safe context is {safe:.0f} tokens), " if safe else "context, ")
        + "fewer slots (OLLAMA_NUM_PARALLEL), or a smaller quantization"
    )


def _stability(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    return (
        "the rate or the memory moved over the run: a shorter trim interval (TRIM_INTERVAL) for "
        "the conversation strategy, or stateless; then run the 10K phase again"
    )


def _estimate(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    return "the estimate missed the run: run a longer scale phase (its ETA settles with the rows)"


def _scores(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    return (
        "a row's score depends on what the server's cache held before it: --score-mode "
        "logprobs (the expected score moves less than the decoded one), or one slot "
        "(OLLAMA_NUM_PARALLEL=1) at its cost in throughput"
    )


def _parse(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    return "replies that do not parse: --structured grammar (or schema) so the server keeps to it"


def _bias(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    return (
        "the score moves with a field the rubric must ignore: leave it out of the prompt's user "
        "template (or say in the rubric to ignore it) and run the quality phase again"
    )


def _rerun(c: Mapping[str, Any], report: Mapping[str, Any], ev: Evidence) -> str:
    return "fix what the phase's report names, then run the phase again"


STEPS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any], Evidence], str]] = {
    "throughput_rps": _throughput,
    "projected_170k_cost": _throughput,
    "projected_hours": _throughput,
    "token_savings": _reuse,
    "cached_coverage": _reuse,
    "prefix_reuse_at_workload": _reuse,
    "max_context_tokens": _context,
    "longest_prompt_fits": _context,
    "overflow_errors": _context,
    "context_shifts": _context,
    "error_rate": _errors,
    "errors": _errors,
    "memory": _memory,
    "degradation": _stability,
    "leak": _stability,
    "eta_error_max": _estimate,
    "projection_error": _estimate,
    "reproducible_rate": _scores,
    "score_files_identical": _scores,
    "consistency_rate": _scores,
    "conversation_agreement": _scores,
    "drift_spread": _scores,
    "parse_rate": _parse,
    "bias_max_gap": _bias,
}
"""A failed criterion's metric (or the part before its first dot) → its next step."""


def next_step(
    criterion: Mapping[str, Any], report: Mapping[str, Any], evidence: Evidence | None = None
) -> str:
    """One next step for a failed criterion of `report`."""
    metric = str(criterion.get("metric") or "")
    step = STEPS.get(metric) or STEPS.get(metric.split(".", 1)[0]) or _rerun
    return step(criterion, report, evidence or Evidence())
