"""`harness run --executor ray`: the same job as a Ray Data pipeline.

What runs where:

- the driver (this process) validates the input exactly as the local executor does (the same
  work items, fingerprint and preflight), starts or reaches the servers, and is the only writer
  of the results file: every record that comes back goes through the one exactly-once
  `ResultsStore` (an id already there is dropped, so a task that Ray runs twice cannot write a
  row twice), then the scores CSV is written from that file as usual;
- a Ray Dataset of the pending rows (`ray.data.from_items`, one small block per batch) is
  mapped with `map_batches` over an actor pool with one actor per server; each actor claims one
  server as its own and holds the engine (token counter, strategy, one `Runner` for all its
  batches with `--concurrency` workers pinned to its server's slots) and returns each finished
  request's record;
- an actor's backend is a pool of every server with its own first (`PoolBackend`, `fill`
  layout): it uses only its own server while that answers; if the server dies mid-run, the
  actor's rows go on the others (the local executor's failover), and the records name the
  server that answered;
- the work items travel once, as one object in Ray's object store (`ray.put`), not with each
  row: a rubric of thousands of tokens is not copied 170,000 times;
- resume is by `custom_id`, as for the local executor: a rerun sends only the ids that the
  results file does not hold.

Why the driver reads the input and writes the results, not `ray.data.read_csv` and a Ray
writer: the input must fail with the local executor's errors (file, line, column) before any
server starts, and the results file must stay one exactly-once JSONL that either executor
resumes; a Ray writer writes one file per block and would write a row again when Ray retries a
task.

The engine is what sends requests, in the actors as in the local executor, so replies are the
same (batching inside the server can flip near-ties). A rolling conversation (the conversation
strategy) goes on across an actor's batches; which rows share a conversation follows Ray's
batch order, not the input's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from harness.backends.base import Backend
from harness.backends.pool import PoolBackend
from harness.engine import JobSpec, Runner, make_strategy
from harness.engine.job import open_token_counter
from harness.engine.progress import Progress
from harness.engine.store import ResultsStore
from harness.errors import BackendError, ConfigError
from harness.records import RequestRecord
from harness.run.factory import fill_pool, open_backend, reach_backend
from harness.run.job import Job
from harness.run.preflight import preflight
from harness.run.result import BatchResult
from harness.workload import WorkItem

__all__ = ["BATCH_ROWS", "EngineActor", "execute_ray", "member_specs"]

BATCH_ROWS = 16
"""Rows per Ray Data batch: small, so results reach the driver (and the file) soon."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray Data: pip install 'llm-batch-harness[ray]' "
            "(or: pip install 'ray[data]')"
        ) from None
    return ray


def member_specs(server: Backend) -> list[dict[str, Any]]:
    """How an actor reaches each server of a started backend (one server, or a pool's
    members): each class's `Backend.reach()`, the URL and the request form, never a new
    server to start."""
    members = server.members if isinstance(server, PoolBackend) else [server]
    return [m.reach() for m in members]


class _Registry:
    """Hands each actor the next server as its own (one actor per server)."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.specs = specs
        self.claimed = 0
        self.accounts: dict[int, list[dict[str, Any]]] = {}

    def specs_of(self) -> list[dict[str, Any]]:
        return self.specs

    def claim(self) -> int:
        k = self.claimed % len(self.specs)
        self.claimed += 1
        return k

    def report(self, actor: int, endpoints: list[dict[str, Any]]) -> None:
        """An actor's latest account of the servers (its pool's `endpoints()`)."""
        self.accounts[actor] = endpoints

    def accounts_of(self) -> dict[int, list[dict[str, Any]]]:
        return self.accounts


def actor_backend(specs: Sequence[dict[str, Any]], own: int, concurrency: int = 1) -> Backend:
    """An actor's share of the servers: its own first, the others behind it as failover (a
    pool in `fill` layout: with the concurrency of its own server's slots, the actor uses only
    that server while it answers; if it dies, its rows go on the others)."""
    order = [own] + [k for k in range(len(specs)) if k != own]
    return fill_pool([reach_backend(specs[k]) for k in order], concurrency)


def merge_accounts(
    specs: Sequence[dict[str, Any]], accounts: Mapping[int, Sequence[Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """Each server's history as the actors saw it: when the first actor took it out (and
    why, after how many answers), the last time one took it back, whether it ended the run
    in, every actor's events in time order; requests, answers and failures added up."""
    out = []
    for spec in specs:
        name = str(spec["base_url"])
        seen = [ep for acc in accounts.values() for ep in acc if ep["endpoint"] == name]
        downs = sorted((ep for ep in seen if ep.get("down_at") is not None), key=_down_at)
        backs = [ep["back_at"] for ep in seen if ep.get("back_at") is not None]
        first = downs[0] if downs else {}
        out.append(
            {
                "endpoint": name,
                "slots": seen[0].get("slots") if seen else None,
                "up": all(ep.get("up", True) for ep in seen),
                "requests": sum(int(ep.get("requests") or 0) for ep in seen),
                "ok": sum(int(ep.get("ok") or 0) for ep in seen),
                "failures": sum(int(ep.get("failures") or 0) for ep in seen),
                "down_at": first.get("down_at"),
                "down_reason": first.get("down_reason"),
                "down_after_requests": first.get("down_after_requests"),
                "back_at": max(backs) if backs else None,
                "events": sorted(
                    (ev for ep in seen for ev in ep.get("events", [])), key=lambda ev: ev["at"]
                ),
            }
        )
    return out


def _down_at(ep: Mapping[str, Any]) -> float:
    return float(ep["down_at"])


class EngineActor:
    """A Ray Data actor: its share of the servers, the engine, and the job's work items.

    One `Runner` serves every batch the actor gets, so a rolling conversation goes on from one
    batch to the next (it is not restarted every `BATCH_ROWS` rows)."""

    def __init__(self, registry: Any, items_ref: list[Any], spec: JobSpec) -> None:
        ray = _ray()
        self.registry = registry
        specs: list[dict[str, Any]] = ray.get(registry.specs_of.remote())
        own = self.own = int(ray.get(registry.claim.remote()))
        items: Sequence[WorkItem] = ray.get(items_ref[0])
        self.items = {it.custom_id: it for it in items}
        self.spec = spec
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.backend = actor_backend(specs, own, spec.runner.concurrency)
        self.counter = self.loop.run_until_complete(self._open())
        self.out: list[RequestRecord] = []
        self.runner = Runner(
            self.backend,
            make_strategy(spec.strategy, spec.policy),
            self.counter,
            config=spec.runner,
            sinks=[self.out.append],
        )

    async def _open(self) -> Any:
        await self.stack.enter_async_context(self.backend)
        return await self.stack.enter_async_context(open_token_counter(self.backend))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        items = [self.items[str(cid)] for cid in batch["custom_id"]]
        self.out.clear()
        self.loop.run_until_complete(self.runner.run(items))
        records = list(self.out)
        if isinstance(self.backend, PoolBackend):
            # Its view of every server (who left, when, why), for the driver's report.
            _ray().get(self.registry.report.remote(self.own, self.backend.endpoints()))
        return {
            "custom_id": np.array([r.custom_id for r in records], dtype=object),
            "record": np.array([pickle.dumps(r) for r in records], dtype=object),
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.stack.aclose())
            self.loop.close()


def _pipeline(plan: Job, spec: JobSpec, specs: list[dict[str, Any]], stop: threading.Event) -> None:
    """Build and drain the Ray Data pipeline; the one writer of the results file."""
    ray = _ray()
    options, data = plan.options, plan.data
    started_ray = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if options.ray_address:
            kwargs["address"] = options.ray_address
        else:
            kwargs["num_cpus"] = os.cpu_count() or 1
            kwargs["object_store_memory"] = 256 * 1024 * 1024
        ray.init(**kwargs)
        started_ray = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        with ResultsStore(plan.results, retry_failed=options.retry_failed) as store:
            pending = [cid for cid in data.ids if cid not in store]
            progress = Progress(
                len(data.items),
                desc=spec.desc,
                enabled=spec.progress,
                initial=len(data.items) - len(pending),
                stream=spec.progress_stream,
            )
            try:
                if pending:
                    _drain(ray, plan, spec, specs, pending, store, progress, stop)
            finally:
                progress.close()
    finally:
        if started_ray:
            ray.shutdown()


def _drain(
    ray: Any,
    plan: Job,
    spec: JobSpec,
    specs: list[dict[str, Any]],
    pending: list[str],
    store: ResultsStore,
    progress: Progress,
    stop: threading.Event,
) -> None:
    registry = ray.remote(num_cpus=0)(_Registry).remote(specs)
    # A batch keeps every worker of an actor busy (a runner starts at most one per row).
    batch_rows = max(BATCH_ROWS, 4 * spec.runner.concurrency)
    items_ref = ray.put(list(plan.data.items))
    blocks = max(1, math.ceil(len(pending) / batch_rows))
    # One block, one batch: 60 rows in 4 blocks are blocks of 15, and with batch_size 16 Ray
    # Data bundled two blocks a batch (2 batches of 30, whose results reached the file together).
    batch_rows = max(1, math.ceil(len(pending) / blocks))
    ds = ray.data.from_items([{"custom_id": cid} for cid in pending], override_num_blocks=blocks)
    out = ds.map_batches(
        EngineActor,
        batch_size=batch_rows,
        batch_format="numpy",
        fn_constructor_kwargs={"registry": registry, "items_ref": [items_ref], "spec": spec},
        compute=ray.data.ActorPoolStrategy(size=len(specs)),
        # The actors wait on their servers: a small CPU share each leaves room for Ray's own.
        num_cpus=min(0.5, (os.cpu_count() or 1) / (2 * len(specs))),
    )
    dropped = 0
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for blob in batch["record"]:
                rec: RequestRecord = pickle.loads(blob)
                if rec.custom_id in store:
                    dropped += 1  # a task Ray ran again: the id is written once
                    continue
                store.write(rec)
                plan.add(rec)
                progress.update(rec)
            if stop.is_set():
                return
    finally:
        if len(specs) > 1:
            with contextlib.suppress(Exception):
                accounts = ray.get(registry.accounts_of.remote(), timeout=30)
                plan.endpoint_history = merge_accounts(specs, accounts)
    if dropped:
        print(
            f"harness run: {dropped} repeated results from Ray task retries were dropped "
            "(each id is written once)",
            file=sys.stderr,
            flush=True,
        )


async def execute_ray(plan: Job, backend: Backend | None) -> BatchResult:
    """Run `plan` as a Ray Data pipeline (see the module docstring); the same outputs as the
    local executor: the same backend (`open_backend`, unless the caller gave one) and the
    same preflight (`harness.run.preflight`)."""
    _ray()  # a missing extra fails before any server starts
    data = plan.data
    stop = threading.Event()
    try:
        if plan.skipped < len(data.items):
            server = backend if backend is not None else open_backend(plan.config)
            async with server, open_token_counter(server) as counter:
                spec = await preflight(plan, server, counter)
                specs = member_specs(server)
                if len(specs) > 1:  # the actors' accounts replace this as batches finish
                    plan.endpoint_history = merge_accounts(specs, {})
                plan.backend = None  # the actors hold their own clients: figures come from records
                # Each actor runs one server's share: the job's concurrency is per server.
                per_server = replace(
                    spec,
                    runner=replace(
                        spec.runner,
                        concurrency=spec.runner.concurrency // len(specs) or 1,
                        # Another actor's rows may land on a server whose actor pins its slots
                        # (after a failover): pinned requests to one busy slot wedge llama.cpp.
                        # Stateless rows need no pinning (the server picks the slot that holds
                        # the rubric); a conversation keeps its slot.
                        use_slots=len(specs) == 1 or spec.strategy == "conversation",
                    ),
                )
                drained = asyncio.ensure_future(
                    asyncio.to_thread(_pipeline, plan, per_server, specs, stop)
                )
                try:
                    await asyncio.shield(drained)
                except asyncio.CancelledError:
                    stop.set()  # the pipeline stops after its current batch; then the servers
                    with contextlib.suppress(Exception):
                        await drained
                    raise
                except (BackendError, ConfigError):
                    raise
                except Exception as exc:
                    raise BackendError(
                        f"the Ray pipeline failed: {type(exc).__name__}: {exc}"
                    ) from exc
    finally:
        plan.write_scores()
    return plan.finish()
