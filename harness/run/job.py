"""One batch job, prepared (`prepare`): its options, input, output paths, resolved settings,
fingerprint (`<results stem>.job.json`, checked on resume), the lock that makes this process
its results file's one writer, and this run's tally; `Job.finish` writes the scores CSV and
returns the `BatchResult`. Both executors (local, Ray) run a `Job`.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from harness.backends.base import Backend
from harness.backends.pool import PoolBackend
from harness.batchfiles import (
    BatchInput,
    ScoreCounts,
    load_input,
    output_paths,
    rejects_path,
    write_rejects,
    write_scores,
)
from harness.engine.job import endpoint_report
from harness.errors import ConfigError, OutputError
from harness.fileio import atomic_write_json
from harness.lock import hold, lock_path_for
from harness.metrics import MetricsCollector
from harness.records import RequestRecord
from harness.run.options import BatchOptions, batch_config
from harness.run.result import BatchResult, endpoints_path, mean_or_none
from harness.run.rows import (
    RowCheck,
    check_rows,
    refuse_changed,
    rows_path,
    set_aside,
)
from harness.run.settings import RunConfig
from harness.scoresfile import ScoresAppender, ScoresLayout, index_results, write_review
from harness.validate import Validation, validation_status

__all__ = ["INPUT_KEYS", "Job", "job_fingerprint", "job_path", "prepare", "write_job"]


@dataclass(slots=True)
class Job:
    """A prepared batch job (`prepare`) and this run's state: what the executors run, what
    `finish` turns into the `BatchResult`."""

    options: BatchOptions
    data: BatchInput
    scores: Path
    results: Path
    skipped: int
    config: RunConfig
    job: dict[str, Any]
    """The job's fingerprint, written beside the results when the run starts."""
    tally: MetricsCollector = field(default_factory=MetricsCollector)
    """This run's requests (an engine sink: it keeps its counts after an interruption)."""
    started: float | None = None
    ended: float | None = None

    def add(self, rec: RequestRecord) -> None:
        self.tally.add(rec)
        self.ended = time.perf_counter()
        if self.appender is not None:
            self.appender.add(rec)  # the scores CSV, as the run goes

    server: str = ""
    backend: Backend | None = None
    """The backend of this run (a pool's figures are read from it at the end)."""
    endpoint_history: list[dict[str, Any]] | None = None
    """Each server's own account when no pool object keeps it (the Ray executor)."""
    started_unix: float = 0.0
    counts: ScoreCounts | None = None
    """Set once the scores CSV is written."""
    stopped_by: signal.Signals | None = None
    """The signal that stopped the run, when one did (SIGINT or SIGTERM)."""
    stopped_reason: str | None = None
    """Why the engine ended the run before its end without a signal (a reuse alarm with
    --stop-on-cache-miss)."""
    reuse_alarms: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Banner lines about the resume (an old fingerprint without the input's hash)."""
    validation: Validation | None = None
    """Whether this is the job `harness validate` recorded, and its verdict (the banner's
    `validated:` line)."""
    rows: RowCheck | None = None
    """The rows of the input against what the results were scored as (`harness.run.rows`)."""
    appender: ScoresAppender | None = None
    """Appends each row this run finishes to the scores CSV."""
    rejects: Path | None = None
    """The rejects file, when `--on-bad-row skip` set rows aside."""

    @property
    def layout(self) -> ScoresLayout:
        return ScoresLayout(
            self.data.id_name,
            self.data.kept,
            self.data.fields,
            logprobs=self.config.score_mode.value == "logprobs",
        )

    def write_scores(self) -> None:
        """Rebuild the scores CSV from the results file (when there is one), in input order."""
        if self.appender is not None:
            self.appender.close()
        if self.results.exists():
            self.counts = write_scores(
                self.data.scored_rows(), self.layout, self.results, self.scores
            )

    def write_review(self) -> tuple[Path, int] | None:
        """`<stem>_review.csv` in logprobs mode: the rows to read by hand, least confident
        first (`scoresfile.write_review`); None when no row has a distribution."""
        if self.layout.logprobs is False or not self.results.exists():
            return None
        stem = self.scores.stem.removesuffix("_scores")
        path = self.scores.with_name(f"{stem}_review.csv")
        written, read = write_review(self.data.scored_rows(), self.data.id_name, self.results, path)
        if not read:
            path.unlink(missing_ok=True)
            return None
        return path, written

    def finish(self, *, interrupted: bool = False) -> BatchResult:
        if self.counts is None:
            self.write_scores()
        review = self.write_review()
        counts = self.counts or ScoreCounts()
        ids = self.data.items
        t = self.tally
        elapsed = self.ended - self.started if self.started is not None and self.ended else 0.0
        m = t.summary(elapsed)
        endpoints = self.endpoint_figures(m.extra.get("endpoints", {}))
        if endpoints:
            with contextlib.suppress(OutputError):
                atomic_write_json(
                    endpoints_path(self.results),
                    {"elapsed_s": elapsed, "started": self.started_unix, "endpoints": endpoints},
                )
        return BatchResult(
            input=self.data.path,
            kind=self.data.kind,
            scores_path=self.scores,
            results_path=self.results,
            total=len(ids),
            done=counts.done,
            failed=counts.failed,
            scored=counts.scored,
            skipped=self.skipped,
            ran=t.requests,
            foreign=counts.foreign,
            elapsed_s=elapsed,
            throughput_rps=m.throughput_rps,
            token_savings=m.token_savings,
            savings_source=m.cached_source,
            uncached_per_request=m.uncached_tokens_per_request,
            mean_latency_ms=mean_or_none(t.latency),
            mean_decode_ms=mean_or_none(t.decode_ms),
            mean_prompt_ms=mean_or_none(t.prompt_ms),
            mean_completion_tokens=t.completion / t.completed if t.completed else None,
            interrupted=interrupted,
            rejected=len(self.data.rejected),
            rejects_path=self.rejects,
            review_path=review[0] if review else None,
            review_rows=review[1] if review else 0,
            stopped_by=(self.stopped_by or signal.SIGINT) if interrupted else None,
            server=self.server,
            endpoints=endpoints,
            stopped_reason=self.stopped_reason,
            reuse_alarms=list(self.reuse_alarms),
        )

    def endpoint_figures(self, figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        if self.backend is not None and isinstance(self.backend, PoolBackend):
            return endpoint_report(self.backend, figures, self.started_unix)
        if self.endpoint_history is None:
            return []
        out = []
        for ep in self.endpoint_history:
            row = dict(ep)
            for key in ("down_at", "back_at"):
                at = row.get(key)
                row[key.replace("_at", "_after_s")] = at - self.started_unix if at else None
            row.update(figures.get(row["endpoint"], {"rows": 0, "completed": 0, "errors": 0}))
            out.append(row)
        return out


INPUT_KEYS = ("input", "input_sha256")
"""The fingerprint's input: its path and the hash of its bytes, recorded to name it, not
compared: a resume compares the input row by row (`harness.run.rows`), so rows appended to the
CSV run and a row changed under a finished id is named."""


def job_fingerprint(options: BatchOptions, data: BatchInput, cfg: RunConfig) -> dict[str, Any]:
    """What makes a results file this job's: a resumed run must send the same requests (the
    rows themselves are compared one by one: `harness.run.rows`)."""
    return {
        "input": str(data.path.resolve()),
        "input_sha256": data.input_sha256,
        "prompt": data.prompt,
        "prompt_sha256": data.prompt_sha256,
        "model": cfg.model.value,
        "backend": cfg.backend.value,
        "strategy": cfg.strategy.value,
        "output_fields": list(data.fields),
        "structured": options.structured if data.kind == "csv" else "batch lines",
        "max_tokens": data.items[0].max_tokens
        if data.kind == "csv" and data.items
        else "batch lines",
        "seed": options.seed,
        # Only when not the default: results files written before the setting existed resume.
        **({"score_mode": cfg.score_mode.value} if cfg.score_mode.value != "decode" else {}),
    }


def job_path(results: Path) -> Path:
    """The fingerprint beside a results file: `<stem>.job.json`."""
    return results.with_name(results.stem + ".job.json")


def _check_job(results: Path, job: dict[str, Any], *, new: bool) -> None:
    """Refuse to resume another job's results (exit 2 naming what differs), or with `new` move
    them aside (kept under a new name) and start over."""
    sidecar = job_path(results)
    if not results.exists() or not sidecar.exists():
        return
    try:
        old = orjson.loads(sidecar.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{sidecar}: unreadable job fingerprint ({exc}); use --new") from None
    differ = [k for k in job if k not in INPUT_KEYS and old.get(k) != job[k]]
    if "score_mode" in old and "score_mode" not in job:  # written only when not `decode`
        differ.append("score_mode")
    if not differ:
        return
    if not new:
        gone = {"score_mode": "decode"}  # what a key absent from a fingerprint means
        shown = "; ".join(
            f"{k}: {old.get(k, gone.get(k))!r} then, {job.get(k, gone.get(k))!r} now"
            for k in differ
        )
        raise ConfigError(
            f"{results} holds the results of another job ({shown}); resuming would mix the "
            "two: run with --new to start over (the old results are kept under a new name)"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (results, sidecar, rows_path(results)):
        if path.exists():
            path.rename(path.with_name(f"{path.stem}.{stamp}{path.suffix}"))


def write_job(results: Path, job: dict[str, Any]) -> None:
    try:
        results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_path(results), job)
    except (OSError, OutputError) as exc:
        raise OutputError(
            f"cannot write next to {results}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _one_writer(results: Path) -> contextlib.AbstractContextManager[None]:
    """The lock that makes this process the results file's one writer (`harness.lock`): a
    second `harness run` on the same output exits 2 naming this one, before it reads or
    appends anything."""
    return hold(
        lock_path_for(results),
        what=f"the results file {results}",
        advice="wait for that run to end, or stop it: running the same command again then "
        "resumes where it stopped",
    )


def validation(options: BatchOptions, data: BatchInput, cfg: RunConfig) -> Validation:
    """Whether the job is the one `harness validate` recorded, and its verdict."""
    if data.kind != "csv":
        return Validation(
            "not validated", "not validated: a batch JSONL (harness validate takes a CSV)"
        )
    return validation_status(
        options.config,
        data.path,
        prompt=options.prompt,
        prompt_sha256=data.prompt_sha256,
        id_column=options.id_column,
        profile=options.config_profile,
        backend=options.backend,
        model=str(cfg.model.value),
    )


def prepare(options: BatchOptions, locks: contextlib.ExitStack) -> Job:
    options.validate()
    config = batch_config(options)  # harness.yaml read once: a bad one fails before any output
    data = load_input(options)
    checked = validation(options, data, config)
    if options.require_go and not checked.go:
        raise ConfigError(f"--require-go: {checked.line}; nothing was sent")
    scores, results = output_paths(data.path, options.output)
    job = job_fingerprint(options, data, config)
    locks.enter_context(_one_writer(results))  # held until the run (and its scores) ends
    _check_job(results, job, new=options.new)
    # Read the results file now: a corrupt one fails before a server starts.
    final = index_results(results)
    rows = _check_rows(options, data, results, final)
    if rows.changed:
        set_aside(results, {cid for cid, _ in rows.changed})
        final = index_results(results)
    wanted = set(data.ids)
    skipped = sum(
        1
        for cid, (_, error) in final.items()
        if cid in wanted and not (options.retry_failed and error)
    )
    plan = Job(options, data, scores, results, skipped, config=config, job=job)
    plan.rows = rows
    plan.notes = rows.notes()
    plan.validation = checked
    if options.from_validated:
        plan.notes.append(
            f"job: {', '.join(options.from_validated).replace('_', ' ')} from the validated job "
            f"in {options.config} (the command line sets any of them)"
        )
    if options.on_bad_row == "skip":
        plan.rejects = rejects_path(scores)
        write_rejects(plan.rejects, data.id_name, data.rejected)
        if data.rejected:
            plan.notes.append(
                f"input: {len(data.rejected)} bad rows set aside (--on-bad-row skip): "
                f"{plan.rejects}"
            )
    if final:
        plan.write_scores()  # what is done already, in input order; this run appends to it
    kept = dict(data.scored_rows()) if data.kept else None
    plan.appender = ScoresAppender(scores, plan.layout, kept)
    return plan


def _check_rows(
    options: BatchOptions, data: BatchInput, results: Path, final: dict[str, tuple[int, bool]]
) -> RowCheck:
    """The input row by row against what the finished ids were scored as; refuses (exit 2) a
    row changed under a finished id unless --rescore-changed."""
    rows = check_rows(
        results,
        data.ids,
        data.row_sha,
        final,
        lines=data.row_lines,
        whole_input=options.sample is None,
        rescore=options.rescore_changed,
    )
    if rows.changed and not options.rescore_changed:
        refuse_changed(results, rows.changed, data.path)
    return rows
