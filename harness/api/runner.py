"""Runs batches on the engine, one at a time, and resumes them after a restart.

A batch moves through OpenAI's statuses::

    validating ─┬─> failed                       (line-numbered errors; nothing run)
                └─> in_progress ─┬─> finalizing ─> completed
                                 ├─> cancelling ─> cancelled   (POST .../cancel)
                                 ├─> expired                   (past expires_at)
                                 └─> failed                    (the prompts cannot fit the
                                                                server's context; or the run
                                                                failed MAX_FAILURES times)

Validation runs as soon as a batch is created (in a thread, not queued behind a running
batch), streaming the input one line at a time (`check_input`); any failure of it fails the
batch, and a batch still `validating` past `validation_timeout_s` after its creation (restarts
included) fails with `validation_timeout`: no batch stays `validating`. It keeps no parsed
requests: a queued batch costs no memory; its work items are read from the file again when it
runs (`read_items`). Valid
batches then run in creation order, one at a time, through `run_job` with an append-only
results file per batch (`ResultsStore`: every custom_id exactly once, resumable), with the
configuration the service resolved once at its start (`batch_config`: the command line, then
harness.yaml's measured values, then defaults), capped to the server's context. Before a
batch runs, its prompts are checked by the function `harness run` checks them with
(`harness.run.preflight.check_prompts`): a batch whose typical prompt and reply cannot fit one
request's context fails with that error; longer rows only are recorded as those rows' errors,
never sent; the warnings (those rows, phase 1's reuse warning) are logged.

Finalizing turns the results file into the output file (replies) and the error file (errors)
in OpenAI's line format, written atomically, then names them and sets the final status in one
SQLite transaction, only from the status it was expected in (a cancel that came first wins).
An expired, cancelled or failed batch also writes every request it did not run to the error
file, as OpenAI does (`batch_expired`, `batch_cancelled`; `batch_failed` here), so the output
and error files hold each custom_id of the input once and `request_counts` agree with them.

After a restart (also after SIGKILL) each status resumes: `validating` is validated again,
`in_progress` runs again (the results file's ids are skipped), `finalizing` and `cancelling`
finalize again (from the same results file, so nothing is counted twice).

A run that fails (the model server unreachable, a disk error) is retried after a back-off (the
whole back-off: other batches' events do not cut it short; a cancel of the batch does), the
model server relaunched if it died; after `MAX_FAILURES` failures in a row the batch ends
`failed`, its finished lines still in its output and error files.

Test seams (`Seams`): the worker calls them at fixed points (hold a batch once N requests are
done; pause before committing a final status); the service's own do nothing, and tests pass
theirs (`harness.testing.seams.ApiSeams`). Nothing is read from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from harness.api.schemas import is_disk_full, output_line
from harness.api.servers import helper_backend, scrubbed_env, server_pid
from harness.api.settings import DEFAULT_VALIDATION_TIMEOUT_S
from harness.api.store import BatchRow, FileRow, Store, new_file_id, now
from harness.api.validate import (
    BatchError,
    Checked,
    check_input,
    read_custom_ids,
    read_items,
    served_names,
)
from harness.backends.base import Backend
from harness.engine import JobSpec, TokenCounter, read_results, run_job
from harness.engine.job import open_token_counter
from harness.engine.progress import Progress
from harness.inputs import MAX_LINE_BYTES
from harness.metrics import source_label
from harness.records import RequestRecord
from harness.run.preflight import check_prompts, spec_for
from harness.run.settings import RunConfig
from harness.workload import WorkItem

__all__ = [
    "MAX_FAILURES",
    "NO_SEAMS",
    "REQUESTED_MODEL_KEY",
    "RESULTS_NAME",
    "UNRUN_ERRORS",
    "VALIDATION_TIMEOUT_S",
    "BatchWorker",
    "Live",
    "Seams",
    "Tally",
    "write_outputs",
]

log = logging.getLogger("harness.api")

RESULTS_NAME = "results.jsonl"
MAX_FAILURES = 5
"""Failed runs in a row before a batch ends `failed`."""
PERSIST_EVERY_S = 1.0
"""How often live counts are written to SQLite while a batch runs."""
EXPIRY_CHECK_S = 1.0
"""How often a running batch's `expires_at` is read again."""
REQUESTED_MODEL_KEY = "harness_requested_model"
"""Metadata key noting the model the input lines name when another model ran them (only with
`--serve-any-model`; otherwise such a batch fails validation with `model_not_found`)."""
VALIDATION_TIMEOUT_S = DEFAULT_VALIDATION_TIMEOUT_S
"""A batch still `validating` this long after its creation fails (`validation_timeout`)."""
UNRUN_ERRORS = {
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    "cancelled": (
        "batch_cancelled",
        "This request was not executed because the batch was cancelled.",
    ),
    "failed": ("batch_failed", "This request was not executed because the batch failed."),
}
"""The error line of a request a batch ended without running (OpenAI's codes and messages)."""


def _reasoning_tokens(body: Any) -> int | None:
    """`usage.completion_tokens_details.reasoning_tokens` of a reply body, when it has one."""
    if not isinstance(body, Mapping):
        return None
    usage = body.get("usage")
    details = usage.get("completion_tokens_details") if isinstance(usage, Mapping) else None
    value = details.get("reasoning_tokens") if isinstance(details, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)
class Tally:
    """Counts of a batch's finished requests: replies, errors, and the replies' tokens.

    Cached tokens are counted as `harness.metrics.MetricsCollector` counts them: only over the
    replies whose server reported them (`cached_known`, with their prompt tokens in
    `cached_prompt_tokens`), never as 0 where they are unknown; `cached_sources` counts the
    completed requests by the source of their figure."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cached_known: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int | None = None
    cached_sources: dict[str, int] = field(default_factory=dict)

    def _reply(
        self, prompt: int, completion: int, cached: int | None, source: str, reasoning: int | None
    ) -> None:
        self.completed += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if cached is not None:
            self.cached_known += 1
            self.cached_tokens += cached
            self.cached_prompt_tokens += prompt
            self.cached_sources[source] = self.cached_sources.get(source, 0) + 1
        if reasoning is not None:
            self.reasoning_tokens = (self.reasoning_tokens or 0) + reasoning

    def add_record(self, rec: RequestRecord) -> None:
        """One finished request, as the engine's sinks get it."""
        if not rec.ok:
            self.failed += 1
            return
        self._reply(
            rec.prompt_tokens,
            rec.completion_tokens,
            rec.cached_tokens,
            rec.cached_source,
            _reasoning_tokens(rec.raw),
        )

    def add_line(self, line: Mapping[str, Any]) -> None:
        """One line of a results file (an error line of the output's error file, too)."""
        if line.get("error") is not None:
            self.failed += 1
            return
        h: Mapping[str, Any] = line.get("harness") or {}
        cached = h.get("cached_tokens")
        response = line.get("response")
        self._reply(
            int(h.get("prompt_tokens") or 0),
            int(h.get("completion_tokens") or 0),
            int(cached) if cached is not None else None,
            str(h.get("cached_source") or "unknown"),
            _reasoning_tokens(response.get("body") if isinstance(response, Mapping) else None),
        )

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def cached_source(self) -> str | None:
        """The source of every cached-token figure reported (`mixed` when several); `unknown`
        when no reply reported them; None before any reply."""
        if self.cached_sources:
            return source_label(self.cached_sources)
        return "unknown" if self.completed else None

    def counts(self) -> dict[str, Any]:
        """The columns of `BatchRow` these figures set."""
        return {
            "completed": self.completed,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_known": self.cached_known,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_source": self.cached_source,
            "reasoning_tokens": self.reasoning_tokens,
        }


@dataclass(slots=True)
class Live:
    """The batch running now: counts (results file included) and rate, ETA."""

    batch_id: str
    total: int
    progress: Progress
    tally: Tally = field(default_factory=Tally)
    """Requests finished (earlier runs included)."""
    started: float = field(default_factory=time.time)
    """Unix seconds when this run (of the service) started the batch."""

    def add(self, rec: RequestRecord) -> None:
        """Engine sink: one finished request."""
        self.progress.update(rec)
        self.tally.add_record(rec)

    @property
    def done(self) -> int:
        return self.tally.done

    def counts(self) -> dict[str, Any]:
        """The columns of `BatchRow` these figures update."""
        return self.tally.counts()


def write_outputs(
    results: Path,
    batch_id: str,
    output: Path,
    errors: Path,
    *,
    inputs: Sequence[str] = (),
    unrun: tuple[str, str] | None = None,
) -> Tally:
    """Stream the results file into the output file (replies) and the error file (errors), in
    OpenAI's line format, each written to a temporary file, synced, then renamed; a file that
    would be empty is not written. With `unrun` (code, message), every id of `inputs` the
    results file lacks gets that error line too, in input order. Returns the counts."""
    tally = Tally()
    tmp = {p: p.with_name(f".{p.name}.tmp") for p in (output, errors)}
    lines = dict.fromkeys(tmp, 0)
    n = 0
    seen: set[Any] = set()
    try:
        with tmp[output].open("wb") as out, tmp[errors].open("wb") as err:
            for n, line in enumerate(read_results(results), start=1):
                seen.add(line.get("custom_id"))
                tally.add_line(line)
                target, path = (out, output) if line.get("error") is None else (err, errors)
                target.write(
                    orjson.dumps(output_line(line, batch_id, n), option=orjson.OPT_APPEND_NEWLINE)
                )
                lines[path] += 1
            if unrun is not None:
                code, message = unrun
                for cid in inputs:
                    if cid in seen:
                        continue
                    n += 1
                    line = {"custom_id": cid, "error": {"code": code, "message": message}}
                    tally.add_line(line)
                    err.write(
                        orjson.dumps(
                            output_line(line, batch_id, n), option=orjson.OPT_APPEND_NEWLINE
                        )
                    )
                    lines[errors] += 1
            for fh in (out, err):
                fh.flush()
                os.fsync(fh.fileno())
        for path, part in tmp.items():
            if lines[path]:
                os.replace(part, path)
    finally:
        for part in tmp.values():
            part.unlink(missing_ok=True)
    return tally


class Seams(Protocol):
    """Where a test steps into a batch's life (`harness.testing.seams.ApiSeams`)."""

    def hold_at(self) -> int | None:
        """Hold each batch of more than this many requests once this many are done."""

    async def held(self, batch_dir: Path) -> None:
        """Return when a batch held at `hold_at` may go on (it may also be cancelled)."""

    async def before_commit(self, batch_id: str, status: str) -> None:
        """Called between writing a batch's output files and committing its final status."""


class _NoSeams:
    """The service's own seams: nothing held, nothing paused."""

    def hold_at(self) -> int | None:
        return None

    async def held(self, batch_dir: Path) -> None:
        return None

    async def before_commit(self, batch_id: str, status: str) -> None:
        return None


NO_SEAMS: Seams = _NoSeams()


class BatchWorker:
    """Validates batches at once and runs them one at a time (see the module docstring).

    `config`: the resolved configuration (not yet capped to the server's context);
    `start_backend`: (re)starts the backend after a failed run (default: `backend.start`; the
    service's also notes the new server's pid); `note_helper(pid)`: called with the pid of a
    tokenizer server a run starts for a backend without `/tokenize`, and with None once it
    stopped; `any_model`: run a batch whose lines name another model on the served one (else
    it fails validation with `model_not_found`); `max_line_bytes`: the longest line read;
    `seams`: the test seams (see `Seams`)."""

    def __init__(
        self,
        store: Store,
        backend: Backend,
        config: RunConfig,
        *,
        max_lines: int | None = None,
        retry_base_s: float = 2.0,
        start_backend: Callable[[], Awaitable[None]] | None = None,
        note_helper: Callable[[int | None], None] | None = None,
        any_model: bool = False,
        max_line_bytes: int = MAX_LINE_BYTES,
        validation_timeout_s: float = VALIDATION_TIMEOUT_S,
        seams: Seams = NO_SEAMS,
        stop_on_cache_miss: bool = False,
    ) -> None:
        self.store = store
        self.stop_on_cache_miss = stop_on_cache_miss
        """Fail a batch at its first reuse alarm (--stop-on-cache-miss), its finished rows kept."""
        self.backend = backend
        self.config = config
        self.max_lines = max_lines
        self.retry_base_s = retry_base_s
        self.start_backend = start_backend or backend.start
        self.note_helper = note_helper
        self.any_model = any_model
        self.max_line_bytes = max_line_bytes
        self.validation_timeout_s = validation_timeout_s
        self.seams = seams
        self.live: Live | None = None
        self._wake = asyncio.Event()
        self._job: asyncio.Task[Any] | None = None
        self._job_batch: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures: dict[str, int] = {}

    # -- control -----------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def validate_soon(self, batch_id: str) -> None:
        """Validate a new (or resumed) `validating` batch in the background."""
        task = asyncio.create_task(self._validate(batch_id), name=f"validate-{batch_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, batch_id: str) -> None:
        """Stop the batch's run if it is the one running (its status is already cancelling)."""
        if self._job_batch == batch_id and self._job is not None and not self._job.done():
            self._job.cancel()
        self.wake()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- validation --------------------------------------------------------------------------

    async def _validate(self, batch_id: str) -> None:
        row = self.store.get_batch(batch_id)
        if row is None or row.status != "validating":
            return
        left = row.created_at + self.validation_timeout_s - now()
        try:
            checked = await self._check(row, left) if left > 0 else _timed_out(self)
        except Exception as exc:  # whatever happens, the batch leaves `validating`
            log.exception("batch %s: validation failed", batch_id)
            checked = Checked(
                errors=[
                    BatchError("validation_error", f"Validation failed ({type(exc).__name__}).")
                ]
            )
        if checked.ok:
            served = self.backend.info.model or None
            changes: dict[str, Any] = {"model": served or checked.model}
            if checked.model and served and checked.model not in served_names(served):
                # Only with --serve-any-model (else validation refused the name): the batch's
                # `model` is the model that runs it, its metadata the one the lines named.
                meta = dict(row.metadata or {})
                meta[REQUESTED_MODEL_KEY] = checked.model[:512]
                changes["metadata"] = meta
                log.warning(
                    "batch %s: its lines name the model %r; %r runs them (--serve-any-model)",
                    batch_id, checked.model, served,
                )  # fmt: skip
            changed = self.store.set_status_if(
                batch_id,
                ["validating"],
                status="in_progress",
                in_progress_at=now(),
                total=checked.lines,
                **changes,
            )
            log.info("batch %s: %d requests, queued to run", batch_id, checked.lines)
        else:
            changed = self.store.set_status_if(
                batch_id,
                ["validating"],
                status="failed",
                failed_at=now(),
                errors=[e.to_dict() for e in checked.errors],
            )
            log.info("batch %s: failed validation (%d errors)", batch_id, len(checked.errors))
        if changed:
            self.wake()

    def _served(self) -> frozenset[str] | None:
        """The model names a batch's lines may name (None: any, run on the served model)."""
        model = self.backend.info.model
        return None if self.any_model or not model else served_names(model)

    async def _check(self, row: BatchRow, left_s: float) -> Checked:
        if self.store.get_file(row.input_file_id) is None:
            return Checked(errors=[BatchError("file_not_found", f"No file {row.input_file_id}.")])
        path = self.store.blob_path(row.input_file_id)
        checking = asyncio.to_thread(
            check_input,
            path,
            endpoint=row.endpoint,
            max_lines=self.max_lines,
            max_line_bytes=self.max_line_bytes,
            served=self._served(),
            deadline=time.monotonic() + left_s,
        )
        try:
            # The thread checks the deadline itself; this is the backstop for one slow line.
            return await asyncio.wait_for(checking, left_s + 5.0)
        except TimeoutError:
            return _timed_out(self)

    async def _items(self, row: BatchRow) -> list[WorkItem]:
        """A validated batch's work items, read from its file now (never kept from its
        validation: a queued batch holds none in memory)."""
        path = self.store.blob_path(row.input_file_id)
        return await asyncio.to_thread(read_items, path, max_line_bytes=self.max_line_bytes)

    # -- the loop ----------------------------------------------------------------------------

    def _next(self) -> BatchRow | None:
        # Finishing work first (quick), then the oldest batch waiting to run.
        for statuses in (("cancelling", "finalizing"), ("in_progress",)):
            rows = self.store.batches_with_status(statuses)
            if rows:
                return rows[0]
        return None

    async def run_forever(self) -> None:
        """Resume what a previous run left open, then work until cancelled."""
        for pending in self.store.batches_with_status(["validating"]):
            self.validate_soon(pending.id)
        while True:
            self._wake.clear()
            row = self._next()
            if row is None:
                await self._wake.wait()
                continue
            try:
                await self._process(row)
                self._failures.pop(row.id, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                try:
                    await self._failed_run(row, exc)
                except asyncio.CancelledError:
                    raise
                except Exception:  # e.g. a full disk while writing the output: wait, try again
                    log.exception("batch %s: could not record its failure", row.id)
                    await asyncio.sleep(self.retry_base_s)

    async def _failed_run(self, row: BatchRow, exc: Exception) -> None:
        n = self._failures.get(row.id, 0) + 1
        self._failures[row.id] = n
        reason = f"{type(exc).__name__}: {exc}"
        if n >= MAX_FAILURES:
            log.error("batch %s: failed %d times, giving up: %s", row.id, n, reason)
            self._failures.pop(row.id, None)
            current = self.store.get_batch(row.id) or row
            error = BatchError("server_error", f"The batch stopped after {n} tries: {reason}")
            if is_disk_full(exc):
                error = BatchError(
                    "insufficient_storage",
                    f"The batch stopped after {n} tries: the data dir {self.store.data_dir} is "
                    f"full ({reason}); its finished lines are kept: free space there.",
                )
            # Only from the status it failed in: a cancel that came meanwhile wins.
            await self._finalize(current, "failed", allowed=(row.status,), errors=[error.to_dict()])
            return
        delay = min(60.0, self.retry_base_s * 2 ** (n - 1))
        log.warning("batch %s: run failed (%s); retrying in %.1f s", row.id, reason, delay)
        await self._back_off(row, delay)
        with contextlib.suppress(Exception):
            await self.start_backend()  # relaunches a managed server that died

    async def _back_off(self, row: BatchRow, delay: float) -> None:
        """Wait `delay` seconds; only a change of this batch's status (a cancel) ends the wait
        early, not the wake-ups of other batches' events."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
            current = self.store.get_batch(row.id)
            if current is None or current.status != row.status:
                return

    async def _process(self, row: BatchRow) -> None:
        if row.status == "cancelling":
            await self._finalize(row, "cancelled", allowed=("cancelling",))
        elif row.status == "finalizing":
            await self._finalize(row, "completed", allowed=("finalizing",))
        elif row.status == "in_progress":
            if row.expires_at is not None and now() >= row.expires_at:
                await self._finalize(row, "expired", allowed=("in_progress",))
            else:
                await self._run(row)

    # -- running -----------------------------------------------------------------------------

    def _results_path(self, batch_id: str) -> Path:
        return self.store.batch_dir(batch_id) / RESULTS_NAME

    def _resume_live(self, row: BatchRow, items: Sequence[WorkItem]) -> tuple[Live, set[str]]:
        """The counts of what earlier runs finished, and their ids."""
        wanted = {it.custom_id for it in items}
        tally = Tally()
        done: set[str] = set()
        for line in read_results(self._results_path(row.id)):
            cid = line.get("custom_id")
            if isinstance(cid, str) and cid in wanted and cid not in done:
                tally.add_line(line)
                done.add(cid)
        progress = Progress(len(items), desc=f"batch {row.id}", enabled=False, initial=len(done))
        return Live(row.id, len(items), progress, tally), done

    @contextlib.asynccontextmanager
    async def _token_counter(self) -> AsyncIterator[TokenCounter]:
        """`harness run`'s token counter for the backend. A backend without `/tokenize` gets a
        small tokenizer server: started without the service's secrets, its pid noted while it
        runs."""
        noted: list[int] = []

        def forget() -> None:
            if noted and self.note_helper is not None:
                self.note_helper(None)

        async with contextlib.AsyncExitStack() as stack:
            stack.callback(forget)  # after the helper stopped (callbacks run last in, first out)
            with scrubbed_env():
                counter = await stack.enter_async_context(open_token_counter(self.backend))
            helper = helper_backend(counter, self.backend)
            pid = server_pid(helper) if helper is not None else None
            if pid is not None and self.note_helper is not None:
                self.note_helper(pid)
                noted.append(pid)
            yield counter

    async def _preflight(
        self, row: BatchRow, items: Sequence[WorkItem], counter: TokenCounter
    ) -> BatchError | None:
        """`harness run`'s check of the prompts (`check_prompts`): an error when the typical
        prompt and its reply cannot fit one request's context (most rows would fail); its
        warnings logged."""
        checked = await check_prompts(self.config, self.backend, counter, items)
        if checked.refused is not None:
            log.error("batch %s: %s", row.id, checked.refused)
            return BatchError(
                "context_too_small",
                f"The batch's prompts do not fit the model server's context: {checked.refused}.",
            )
        log.info("batch %s: %s", row.id, checked.lengths.describe())
        for warning in checked.warnings:
            log.warning("batch %s: %s", row.id, warning)
        return None

    async def _run(self, row: BatchRow) -> None:
        items = await self._items(row)
        results = self._results_path(row.id)
        live, done_ids = await asyncio.to_thread(self._resume_live, row, items)
        pending = [it for it in items if it.custom_id not in done_ids]
        last_persist = 0.0

        def sink(rec: RequestRecord) -> None:
            nonlocal last_persist
            live.add(rec)
            t = time.monotonic()
            if t - last_persist >= PERSIST_EVERY_S:
                last_persist = t
                self.store.update_batch(row.id, **live.counts())

        # What `harness run` would run with: the configuration resolved at the service's
        # start, its trim policy capped to the (possibly relaunched) server's context.
        spec = spec_for(
            self.config,
            self.backend,
            results=results,
            desc=f"batch {row.id}",
            progress=False,
            stop_on_cache_miss=self.stop_on_cache_miss,
        )
        async with self._token_counter() as counter:
            if pending:
                problem = await self._preflight(row, items, counter)
                if problem is not None:
                    await self._finalize(
                        row, "failed", allowed=("in_progress",), errors=[problem.to_dict()]
                    )
                    return
            latest = self.store.get_batch(row.id)
            if latest is None or latest.status != "in_progress":
                return  # cancelled while it was being read: the loop finalizes it
            # No await from this check until the job is known to `cancel()`: no cancel slips by.
            self.store.update_batch(row.id, **live.counts())
            log.info("batch %s: running (%d of %d done before)", row.id, live.done, live.total)
            self.live = live
            job = asyncio.create_task(self._work(row.id, items, pending, spec, counter, sink))
            self._job, self._job_batch = job, row.id
            try:
                expired = await self._wait(row.id, job)
            finally:
                if not job.done():
                    job.cancel()
                    await asyncio.wait({job})
                self._job = self._job_batch = None
                self.live = None
                self.store.update_batch(row.id, **live.counts())
        current = self.store.get_batch(row.id) or row
        if expired:
            await self._finalize(current, "expired", allowed=("in_progress",))
        elif job.cancelled() or current.status == "cancelling":
            await self._finalize(current, "cancelled", allowed=("cancelling",))
        elif job.exception() is not None:
            exc = job.exception()
            assert isinstance(exc, Exception)
            raise exc
        elif job.result() is not None:
            # Stopped on a reuse alarm (--stop-on-cache-miss): failed, not completed; the
            # rows not run get the batch_failed error line, those that ran keep their results.
            error = BatchError("reuse_alarm", str(job.result()))
            await self._finalize(
                current, "failed", allowed=("in_progress",), errors=[error.to_dict()]
            )
        elif self.store.set_status_if(
            row.id, ["in_progress"], status="finalizing", finalizing_at=now()
        ):
            finalizing = self.store.get_batch(row.id)
            assert finalizing is not None
            await self._finalize(finalizing, "completed", allowed=("finalizing",))

    async def _work(
        self,
        batch_id: str,
        items: Sequence[WorkItem],
        pending: Sequence[WorkItem],
        spec: JobSpec,
        counter: TokenCounter,
        sink: Callable[[RequestRecord], None],
    ) -> str | None:
        """The batch's run (`run_job`); held by a test seam, in two parts around the hold.
        Returns why the engine stopped it early (a reuse alarm with --stop-on-cache-miss), else
        None."""
        hold = self.seams.hold_at()
        done = len(items) - len(pending)
        if hold is not None and done < hold < len(items):
            first = await run_job(
                self.backend, pending[: hold - done], spec, counter=counter, sinks=[sink]
            )
            if first.error is not None:
                return first.error
            log.info("batch %s: held at %d done", batch_id, hold)
            await self.seams.held(self.store.batch_dir(batch_id))
        result = await run_job(self.backend, items, spec, counter=counter, sinks=[sink])
        return result.error

    async def _wait(self, batch_id: str, job: asyncio.Task[str | None]) -> bool:
        """Wait for the job; True when the batch's `expires_at` (read again every
        `EXPIRY_CHECK_S`) passed first."""
        while True:
            current = self.store.get_batch(batch_id)
            expires = current.expires_at if current is not None else None
            left = None if expires is None else expires - time.time()
            if left is not None and left <= 0:
                return True
            timeout = EXPIRY_CHECK_S if left is None else min(EXPIRY_CHECK_S, left)
            done, _ = await asyncio.wait({job}, timeout=timeout)
            if done:
                return False

    # -- finalizing --------------------------------------------------------------------------

    async def _finalize(
        self,
        row: BatchRow,
        status: str,
        *,
        allowed: Sequence[str],
        errors: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Write the output and error files, then name them and set `status` atomically, only
        while the batch's status is one of `allowed`. False when it was not (nothing named,
        the files removed): the loop then takes the batch as it is now."""
        results = self._results_path(row.id)
        stamp = now()
        ids = {"output": new_file_id(), "error": new_file_id()}
        paths = {kind: self.store.blob_path(fid) for kind, fid in ids.items()}
        unrun = UNRUN_ERRORS.get(status)
        inputs: list[str] = []
        if unrun is not None and row.in_progress_at is not None:  # it passed validation
            path = self.store.blob_path(row.input_file_id)
            inputs = await asyncio.to_thread(
                read_custom_ids, path, max_line_bytes=self.max_line_bytes
            )
        tally = await asyncio.to_thread(
            write_outputs,
            results,
            row.id,
            paths["output"],
            paths["error"],
            inputs=inputs,
            unrun=unrun,
        )
        files = [
            FileRow(
                id=ids[kind],
                filename=f"{row.id}_{kind}.jsonl",
                purpose="batch_output",
                bytes=paths[kind].stat().st_size,
                lines=n,
                created_at=stamp,
            )
            for kind, n in (("output", tally.completed), ("error", tally.failed))
            if n
        ]
        await self.seams.before_commit(row.id, status)
        named = {f.id for f in files}
        changes: dict[str, Any] = {
            "status": status,
            f"{status}_at": stamp,
            "output_file_id": ids["output"] if ids["output"] in named else None,
            "error_file_id": ids["error"] if ids["error"] in named else None,
            **tally.counts(),
        }
        if errors is not None:
            changes["errors"] = errors
        if not self.store.finalize_batch(row.id, allowed, files, **changes):
            for path in paths.values():
                path.unlink(missing_ok=True)
            current = self.store.get_batch(row.id)
            log.info(
                "batch %s: not %s: it is %s now",
                row.id, status, current.status if current else "gone",
            )  # fmt: skip
            self.wake()
            return False
        log.info(
            "batch %s: %s (%d completed, %d failed of %d)",
            row.id,
            status,
            tally.completed,
            tally.failed,
            row.total,
        )
        return True


def _timed_out(worker: BatchWorker) -> Checked:
    return Checked(
        errors=[
            BatchError(
                "validation_timeout",
                f"Validation did not finish within {worker.validation_timeout_s:.0f} s of the "
                "batch's creation (restarts of the service included); split the file into "
                "smaller batches.",
            )
        ]
    )
