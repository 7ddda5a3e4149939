"""Running a batch job: `run_batch` / `run_batch_async` validate everything, prepare the job
(`harness.run.job`), build the backend the settings name (`open_backend`, unless the caller
gave one), run it on the local executor or the Ray one (`harness.rayexec`), and write the
scores CSV, also after Ctrl-C, SIGTERM or a server failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from harness.backends.base import Backend
from harness.engine import run_job
from harness.engine.job import open_token_counter
from harness.run.factory import open_backend
from harness.run.job import Job, prepare
from harness.run.options import BatchOptions
from harness.run.preflight import preflight
from harness.run.result import BatchResult

__all__ = ["run_batch", "run_batch_async"]


async def _execute(job: Job, backend: Backend | None) -> BatchResult:
    data = job.data
    try:
        if job.skipped < len(data.items):
            server = backend if backend is not None else open_backend(job.config)
            async with server, open_token_counter(server) as counter:
                spec = await preflight(job, server, counter)
                ran = await run_job(server, data.items, spec, sinks=[job.add], counter=counter)
                job.reuse_alarms = list(ran.reuse_alarms)
                job.stopped_reason = ran.error
    finally:
        # Also after Ctrl-C (cancellation) or a server failure: the scores so far.
        job.write_scores()
    return job.finish()


async def run_batch_async(options: BatchOptions, *, backend: Backend | None = None) -> BatchResult:
    """Validate, run and write the scores CSV; see `run_batch`. Cancellation propagates (the
    results so far are kept and the scores CSV written)."""
    with contextlib.ExitStack() as locks:
        return await _run(prepare(options, locks), backend)


async def _run(job: Job, backend: Backend | None) -> BatchResult:
    if job.options.executor == "ray":
        from harness.rayexec import execute_ray  # Ray is an optional extra

        return await execute_ray(job, backend)
    return await _execute(job, backend)


async def _stop_on_sigterm(job: Job, backend: Backend | None) -> BatchResult:
    # SIGTERM (`kill`, `timeout`, a service manager) stops the run like Ctrl-C: cancel, stop
    # the server, keep the results. Python's default would end the process at once and leave
    # the embedded server running, orphaned.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = False
    if task is not None:

        def terminate() -> None:
            job.stopped_by = signal.SIGTERM
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, terminate)  # main thread, Unix only
            installed = True
    try:
        return await _run(job, backend)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def run_batch(options: BatchOptions, *, backend: Backend | None = None) -> BatchResult:
    """Validate everything, run the batch (resuming from the results file), write the scores
    CSV. `backend`: a backend to use instead of the one the options name (not started yet).

    Raises InputError / ConfigError before creating anything; LockHeld when another process
    writes the same results file (nothing read or appended); BackendError when the server is
    unreachable or wrong (the results so far are kept and the scores CSV written). Ctrl-C
    (SIGINT) or SIGTERM stops cleanly (the server too) and returns a result with
    `interrupted=True` (`exit_code` 130 or 143).
    """
    with contextlib.ExitStack() as locks:
        job = prepare(options, locks)
        try:
            return asyncio.run(_stop_on_sigterm(job, backend))
        except KeyboardInterrupt:
            return job.finish(interrupted=True)
        except asyncio.CancelledError:
            if job.stopped_by is None:
                raise
            return job.finish(interrupted=True)
