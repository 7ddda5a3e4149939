"""The outcome of a batch run (`BatchResult`: counts over the whole results file, figures of
this run, the one-line summary `harness run` prints) and, over several servers, each one's
line and figures file (`<results stem>.endpoints.json`).
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.batchfiles import InputKind
from harness.engine.progress import format_duration

__all__ = ["BAD_ROWS_SKIPPED", "BatchResult", "endpoint_line", "endpoints_path", "mean_or_none"]

BAD_ROWS_SKIPPED = 3
"""`harness run`'s exit status when every good row is done and bad input rows were set aside
(`--on-bad-row skip`): the job is not whole, so not 0; nothing failed, so not 1."""


def mean_or_none(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(slots=True)
class BatchResult:
    """The outcome of `run_batch`: counts over the whole results file, figures of this run."""

    input: Path
    kind: InputKind
    scores_path: Path
    results_path: Path
    total: int
    """Rows of this input (after --sample)."""
    done: int = 0
    """Rows with a result (status ok) in the results file."""
    failed: int = 0
    """Rows recorded as errors in the results file."""
    scored: int = 0
    """Rows whose reply parsed as a JSON object with an integer `score`."""
    skipped: int = 0
    """Rows already in the results file when this run started (resumed)."""
    ran: int = 0
    """Requests finished by this run."""
    foreign: int = 0
    """Ids in the results file that are not rows of this input (ignored)."""
    elapsed_s: float = 0.0
    throughput_rps: float = 0.0
    token_savings: float | None = None
    """Cached prompt tokens ÷ prompt tokens of the requests that reported them, this run."""
    savings_source: str = "unknown"
    """Where the cached-token figures came from (`server`, `llama.cpp timings`, ...)."""
    uncached_per_request: float | None = None
    """Prompt tokens the server computed per completed request, this run."""
    mean_latency_ms: float | None = None
    mean_decode_ms: float | None = None
    """Mean server decode (generation) time per request, this run (llama.cpp reports it)."""
    mean_prompt_ms: float | None = None
    """Mean server prompt-processing (prefill) time per request, this run."""
    mean_completion_tokens: float | None = None
    interrupted: bool = False
    rejected: int = 0
    """Bad input rows set aside (`--on-bad-row skip`): not in `total`."""
    rejects_path: Path | None = None
    review_path: Path | None = None
    """`<stem>_review.csv` (logprobs mode): the least confident rows, to read by hand."""
    review_rows: int = 0
    stopped_by: signal.Signals | None = None
    """What interrupted the run: SIGINT (Ctrl-C) or SIGTERM."""
    server: str = ""
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    """Over several servers: each one's figures this run (rows, completed, errors, req/s,
    savings, latency) and history (when it left, why, after how many answers; when it came
    back), also written to `<results stem>.endpoints.json`. Empty for one server."""
    stopped_reason: str | None = None
    """Why the run ended before its end without a signal (a reuse alarm with
    --stop-on-cache-miss); the rows not run resume on the next run."""
    reuse_alarms: list[dict[str, Any]] = field(default_factory=list)
    """This run's reuse alarms (also on the results lines that closed their windows)."""

    @property
    def not_run(self) -> int:
        return self.total - self.done - self.failed

    @property
    def exit_code(self) -> int:
        """0 all rows done; 1 rows failed or not run; 3 every good row done, bad input rows
        set aside (`--on-bad-row skip`); 128 + the signal when interrupted (130 for Ctrl-C,
        143 for SIGTERM)."""
        if self.interrupted:
            return 128 + int(self.stopped_by or signal.SIGINT)
        if self.done != self.total:
            return 1
        return BAD_ROWS_SKIPPED if self.rejected else 0

    def summary(self) -> str:
        """The one-line summary `harness run` prints."""

        def ms(v: float | None) -> str:
            return f"{v:.0f} ms" if v is not None else "n/a"

        sav = f"{self.token_savings:.1%}" if self.token_savings is not None else "unknown"
        unc = (
            f"{self.uncached_per_request:.0f} uncached prompt tokens per request, "
            if self.uncached_per_request is not None
            else ""
        )
        resumed = f" ({self.skipped} resumed from earlier runs)" if self.skipped else ""
        left = f", {self.not_run} not run" if self.not_run else ""
        state = (
            "interrupted"
            if self.interrupted
            else "stopped on a reuse alarm"
            if self.stopped_reason
            else "finished"
        )
        alarms = f", {len(self.reuse_alarms)} reuse alarm(s)" if self.reuse_alarms else ""
        if self.rejected:
            resumed += f"; {self.rejected} bad input rows set aside ({self.rejects_path})"
        return (
            f"run {state}: {self.done} done, {self.failed} failed{left} of {self.total} rows"
            f"{resumed}; this run: {self.ran} requests in {format_duration(self.elapsed_s)} "
            f"({self.elapsed_s:.1f} s, {self.throughput_rps:.2f} completed req/s), {unc}"
            f"token savings {sav} (cached ÷ prompt tokens; source: {self.savings_source}), "
            f"mean latency {ms(self.mean_latency_ms)}, "
            f"mean server decode {ms(self.mean_decode_ms)} per request{alarms}; "
            f"scores: {self.scores_path}; results: {self.results_path}"
            + (
                f"; review: {self.review_rows} rows to read by hand, least confident first "
                f"({self.review_path})"
                if self.review_path is not None
                else ""
            )
        )

    def endpoint_lines(self) -> list[str]:
        """One line per server of a pool (none for one server)."""
        return [endpoint_line(ep) for ep in self.endpoints]


def endpoint_line(ep: Mapping[str, Any]) -> str:
    """`endpoint URL: rows, ok, errors, req/s, p50 latency; left at ... (why)`."""
    lat = (ep.get("latency_ms") or {}).get("p50")
    text = (
        f"endpoint {ep['endpoint']}: {ep.get('rows', 0)} rows ({ep.get('completed', 0)} ok, "
        f"{ep.get('errors', 0)} errors), {ep.get('throughput_rps') or 0.0:.2f} req/s, "
        f"p50 latency {f'{lat:.0f} ms' if lat is not None else 'n/a'}"
    )
    if ep.get("down_at") is not None:
        after = ep.get("down_after_s")
        text += (
            f"; LEFT the run {f'{after:.1f} s in' if after is not None else ''} "
            f"(after {ep.get('down_after_requests')} answers): {ep.get('down_reason')}"
        )
        if ep.get("up"):
            text += f"; back {ep.get('back_after_s') or 0.0:.1f} s in"
    return text


def endpoints_path(results: Path) -> Path:
    """The per-server figures beside a results file: `<stem>.endpoints.json`."""
    return results.with_name(results.stem + ".endpoints.json")
