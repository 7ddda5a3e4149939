"""One batch job, end to end: token counter, results store, memory monitors, runner, metrics.

The pytest suites and the `harness run` command both call `run_job`, so what the suites
validate is exactly what runs the production batch.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, overload

from harness.backends.base import Backend
from harness.backends.embedded import packaged_tokenizer
from harness.backends.pool import PoolBackend
from harness.engine.progress import Progress
from harness.engine.reusewatch import ReuseWatch, ReuseWatchConfig
from harness.engine.runner import Runner, RunnerConfig
from harness.engine.store import ResultsStore
from harness.engine.strategies import TrimPolicy, make_strategy
from harness.engine.tokens import TokenCounter, estimate_tokenize
from harness.memory import MemoryMonitor, MemorySample, ProcessRSSProbe
from harness.metrics import MetricsCollector, RunMetrics, memory_slope
from harness.models.templates import get_format, memo_held_bytes
from harness.records import RequestRecord
from harness.workload import WorkItem

__all__ = [
    "JobResult",
    "JobSpec",
    "endpoint_report",
    "open_token_counter",
    "partial_result",
    "pending_items",
    "run_job",
]


@dataclass(slots=True)
class JobSpec:
    """How to run a batch."""

    strategy: str = "stateless"
    policy: TrimPolicy = field(default_factory=TrimPolicy)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    results_path: Path | None = None
    retry_failed: bool = False
    """Run again the ids whose last result in the results file is an error."""
    """Append-only results file (resumes when it exists); None keeps results in memory only."""
    progress: bool = True
    desc: str = "requests"
    progress_stream: TextIO | None = None
    """Where progress goes (default stderr); suites pass the real stderr past pytest's capture."""
    memory_interval_s: float = 1.0
    keep_records: bool = False
    """Keep every record in `JobResult.records` (tests, quality checks; not for 170K runs)."""
    reuse: ReuseWatchConfig = field(default_factory=ReuseWatchConfig)
    """How the run watches prefix reuse (harness.engine.reusewatch): an alarm when a window of
    requests computes more than twice what the strategy expects; `stop` ends the run there."""


@dataclass(slots=True)
class JobResult:
    metrics: RunMetrics
    memory: dict[str, Any]
    token_counter: str
    """Where pre-send token counts came from: `server`, `packaged-gemma3` or `estimate`."""
    ran: int
    skipped: int
    """Items already in the results file (resumed)."""
    records: list[RequestRecord] = field(default_factory=list)
    memory_samples: dict[str, list[MemorySample]] = field(default_factory=dict)
    error: str | None = None
    """Why the run stopped before its end (`Type: message`); None when it ran every item."""
    eta: dict[str, Any] = field(default_factory=dict)
    """The ETA shown at 10%, 50% and 90% against the actual end (Progress.eta_accuracy)."""
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    """A pool's servers (`PoolBackend.endpoints()`: counts, when each left and why, merged
    with the per-server figures of this run's records); empty for a single server."""
    reuse_alarms: list[dict[str, Any]] = field(default_factory=list)
    """Windows of requests whose server computed more than the strategy expects
    (harness.engine.reusewatch), in order."""
    reuse_windows: int = 0
    """Windows the reuse watch checked."""


_PARTIAL = "harness_partial_result"


def partial_result(exc: BaseException) -> JobResult | None:
    """The figures of what ran before `run_job` raised `exc` (None for other exceptions).

    A run that stops part-way (an unreachable server, a bug) still has measurements: the
    suites write them into the phase's report, marked as not finished.
    """
    result = getattr(exc, _PARTIAL, None)
    return result if isinstance(result, JobResult) else None


class _Pending(Sequence[WorkItem]):
    """The items not yet in the results store, by index (8 bytes per pending item), so a
    lazy `items` sequence stays lazy: nothing is made or kept per item ahead of sending."""

    def __init__(self, items: Sequence[WorkItem], keep: array[int]) -> None:
        self._items = items
        self._keep = keep

    def __len__(self) -> int:
        return len(self._keep)

    @overload
    def __getitem__(self, i: int) -> WorkItem: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[WorkItem]: ...
    def __getitem__(self, i: int | slice) -> WorkItem | Sequence[WorkItem]:
        if isinstance(i, slice):
            return [self._items[k] for k in self._keep[i]]
        return self._items[self._keep[i]]


def pending_items(items: Sequence[WorkItem], store: ResultsStore | None) -> Sequence[WorkItem]:
    """`items` less those already done in `store`: `items` itself when none is done."""
    if store is None or not store.done:
        return items
    keep = array("q", (k for k, it in enumerate(items) if it.custom_id not in store))
    return items if len(keep) == len(items) else _Pending(items, keep)


def endpoint_report(
    backend: Backend, figures: dict[str, dict[str, Any]], started_unix: float
) -> list[dict[str, Any]]:
    """A pool's servers: its own account of each (requests, failures, when it left and why,
    after how many answers, when it came back; times also as seconds into the run) merged with
    the figures of the records each answered (`metrics.endpoint_figures`). Empty for one
    server."""
    if not isinstance(backend, PoolBackend):
        return []
    out: list[dict[str, Any]] = []
    for ep in backend.endpoints():
        row = dict(ep)
        for key in ("down_at", "back_at"):
            at = row.get(key)
            row[key.replace("_at", "_after_s")] = at - started_unix if at is not None else None
        row.update(figures.get(row["endpoint"], {"rows": 0, "completed": 0, "errors": 0}))
        out.append(row)
    return out


@contextlib.asynccontextmanager
async def open_token_counter(
    backend: Backend, *, tokenizer: Callable[[], Backend] = packaged_tokenizer
) -> AsyncIterator[TokenCounter]:
    """A token counter for `backend`: its own tokenizer, else for a Gemma model `tokenizer()`'s
    (started for the counter's life: the packaged Gemma 3 one unless told), else an estimate."""
    fmt = backend.info.chat_format or get_format("gemma")
    if backend.info.supports_tokenize:
        yield TokenCounter(fmt, backend.tokenize, source="server")
        return
    if fmt.name == "gemma":
        # Ollama has no tokenize endpoint; Gemma 3's vocabulary is the same at every size, so
        # the packaged model's tokenizer (in a tiny local llama.cpp server) counts exactly.
        helper = tokenizer()
        async with helper:
            yield TokenCounter(fmt, helper.tokenize, source="packaged-gemma3")
        return
    yield TokenCounter(fmt, estimate_tokenize(), source="estimate")


def _memory_summary(monitor: MemoryMonitor | None) -> dict[str, Any] | None:
    """A monitor's readings: peak, first, last, leak slope, samples and failed readings, and
    whether the model spilled — None when no reading could tell (a process's RSS cannot; an
    Ollama /api/ps that was never read could not): never "not spilled" without evidence. A
    pool's per-server peaks under `members`."""
    if monitor is None:
        return None
    if not monitor.samples:
        return {"samples": 0, "failed_readings": monitor.failures, "spilled": None,
                "not_loaded_readings": monitor.not_loaded, "peak_bytes": None, "source": None,
                "kind": None}  # fmt: skip
    peak = monitor.peak
    assert peak is not None
    points = [(s.timestamp, s.used_bytes) for s in monitor.samples]
    held = [h for s in monitor.samples if isinstance(h := s.detail.get("held_bytes"), int)]
    told = [s for s in monitor.samples if "spilled" in s.detail]
    members: dict[str, int] = {}
    for s in monitor.samples:
        for m in s.detail.get("members") or ():
            members[m["source"]] = max(members.get(m["source"], 0), int(m["used_bytes"]))
    out: dict[str, Any] = {
        "source": peak.source,
        "kind": peak.kind,
        "spilled": any(bool(s.detail["spilled"]) for s in told) if told else None,
        "spill_readings": len(told),
        "peak_bytes": peak.used_bytes,
        "first_bytes": monitor.samples[0].used_bytes,
        "last_bytes": monitor.samples[-1].used_bytes,
        "total_bytes": peak.total_bytes,
        "samples": len(monitor.samples),
        "failed_readings": monitor.failures,
        "not_loaded_readings": monitor.not_loaded,
        "leak": memory_slope(points),
    }
    if members:
        out["members_peak_bytes"] = members
    if len(held) == len(points):
        # The runner's own growth: what its bounded caches hold is taken out of each reading, so
        # a cache filling up to its bound is not read as a leak (see _RunnerProbe).
        out["leak_rss"] = out["leak"]
        out["leak"] = memory_slope([(t, b - h) for (t, b), h in zip(points, held, strict=True)])
        out["held_bytes_last"] = held[-1]
        out["leak_basis"] = _RunnerProbe.BASIS
    return out


class _RunnerProbe:
    """The harness process's RSS, each reading noting what its bounded tables hold at that
    moment (`held_bytes`): the token counter's two tables and the message memo of
    `harness.models.templates`.

    They fill up to their bound over the first few thousand rows (~1 KB a candidate): on a
    short fast run that growth reads as tens of MB an hour and fails a leak gate, though it stops
    at the bound. The leak slope is taken on RSS minus what they hold; the held bytes are the
    interpreter's sizes of the entries, a lower bound on their cost to the process, so what is
    left of any other growth still shows."""

    BASIS = (
        "process RSS minus the bytes the token counter's tables and the message memo hold "
        "(sys.getsizeof; bounded tables filling are not a leak)"
    )

    def __init__(self, rss: ProcessRSSProbe, counter: TokenCounter) -> None:
        self._rss = rss
        self._counter = counter

    @property
    def source(self) -> str:
        return self._rss.source

    def sample(self) -> MemorySample:
        got = self._rss.sample()
        got.detail["held_bytes"] = self._counter.held_bytes() + memo_held_bytes()
        return got


async def run_job(
    backend: Backend,
    items: Sequence[WorkItem],
    spec: JobSpec | None = None,
    *,
    counter: TokenCounter | None = None,
    sinks: Sequence[Callable[[RequestRecord], None]] = (),
) -> JobResult:
    """Run `items` on a started `backend`; returns metrics, memory and (optionally) records."""
    spec = spec or JobSpec()
    strategy = make_strategy(spec.strategy, spec.policy)
    collector = MetricsCollector()
    records: list[RequestRecord] = []
    async with contextlib.AsyncExitStack() as stack:
        if counter is None:
            counter = await stack.enter_async_context(open_token_counter(backend))
        store: ResultsStore | None = None
        if spec.results_path is not None:
            store = stack.enter_context(
                ResultsStore(spec.results_path, retry_failed=spec.retry_failed)
            )
        pending = pending_items(items, store)
        skipped = len(items) - len(pending)
        progress = Progress(
            len(items),
            desc=spec.desc,
            enabled=spec.progress,
            initial=skipped,
            stream=spec.progress_stream,
        )
        stack.callback(progress.close)
        # The reuse watch first: the record that closes an alarming window carries the alarm
        # into the results file.
        watch = ReuseWatch(spec.reuse, say=progress.say)
        all_sinks: list[Callable[[RequestRecord], None]] = [watch]
        if store is not None:
            all_sinks.append(store.write)
        all_sinks += [collector.add, progress.update, *sinks]
        if spec.keep_records:
            all_sinks.append(records.append)

        monitors: dict[str, MemoryMonitor] = {}
        server_probe = None
        with contextlib.suppress(Exception):
            server_probe = backend.memory_probe()
        if server_probe is not None:
            monitors["server"] = MemoryMonitor(server_probe, spec.memory_interval_s)
        gpu_probe = None
        with contextlib.suppress(Exception):
            gpu_probe = backend.gpu_probe()
        if gpu_probe is not None:
            monitors["gpu"] = MemoryMonitor(gpu_probe, spec.memory_interval_s)
        monitors["runner"] = MemoryMonitor(
            _RunnerProbe(ProcessRSSProbe(os.getpid(), include_children=False), counter),
            spec.memory_interval_s,
        )
        for mon in monitors.values():
            mon.start()
            stack.callback(mon.stop)

        runner = Runner(backend, strategy, counter, config=spec.runner, sinks=all_sinks)
        watch.stop = runner.stop
        if isinstance(backend, PoolBackend):
            backend.begin_run()  # each server's counts and history: this run's
        started_unix = time.time()
        started = time.perf_counter()
        failure: Exception | None = None
        try:
            ran = await runner.run(pending)
        except Exception as exc:
            failure = exc
            ran = collector.requests
        elapsed = time.perf_counter() - started
        eta = progress.eta_accuracy(time.monotonic() - progress.started)
    metrics = collector.summary(elapsed)
    result = JobResult(
        metrics=metrics,
        memory={name: _memory_summary(mon) for name, mon in monitors.items()},
        token_counter=counter.source,
        ran=ran,
        skipped=skipped,
        records=records,
        memory_samples={name: list(mon.samples) for name, mon in monitors.items()},
        error=(
            f"{type(failure).__name__}: {failure}"
            if failure is not None
            else f"stopped on a reuse alarm (--stop-on-cache-miss): {runner.stop_reason}"
            if runner.stop_reason is not None and ran < len(pending)
            else None
        ),
        eta=eta,
        endpoints=endpoint_report(backend, metrics.extra.get("endpoints", {}), started_unix),
        reuse_alarms=list(watch.alarms),
        reuse_windows=watch.windows,
    )
    if failure is not None:
        setattr(failure, _PARTIAL, result)
        raise failure
    return result
