"""Simulate the dispatcher at scale: the engine (`run_job`) over a pool of simulated servers.

    python scripts/sim_dispatch.py                      # 1,000,000 requests, 64 endpoints
    python scripts/sim_dispatch.py --requests 100000 --results /tmp/sim_results.jsonl

Every endpoint is an in-process double (`harness.testing.InProcessDouble`, no prompt rendering)
with its own latency (exponential, its mean drawn between `--min-ms` and `--max-ms`), `--slots`
slots, and a `--fail` share of requests failing with a transient error (the runner retries
them). Two endpoints die part-way (they stop answering, like a SIGKILLed server) and one of
them answers again later: the pool takes them out and back. The work items are made when taken
(a lazy sequence), so what grows with the run is the engine's own state.

It prints, every `--every` requests, the rate over that stretch and overall and the process's
RSS, then the per-endpoint split. **These are the dispatcher's figures against simulated
latencies, never measurements of a model server.** Exit 1 when an id did not end exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import psutil

from harness.backends.base import ChatRequest, ChatResult
from harness.backends.pool import PoolBackend
from harness.engine import JobSpec, RetryPolicy, RunnerConfig, run_job
from harness.errors import BackendUnreachable, TransientServerError
from harness.records import RequestRecord
from harness.testing import InProcessDouble
from harness.workload import WorkItem

RUBRIC = {
    "role": "system",
    "content": "You screen job candidates. Reply with a JSON object with an integer score. " * 8,
}


class LazyItems(Sequence[WorkItem]):
    """`n` work items made on demand (nothing kept per item)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def _make(self, k: int) -> WorkItem:
        return WorkItem(f"c{k}", (RUBRIC, {"role": "user", "content": f"candidate {k}"}), 8)

    @overload
    def __getitem__(self, k: int) -> WorkItem: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[WorkItem]: ...
    def __getitem__(self, k: int | slice) -> WorkItem | Sequence[WorkItem]:
        if isinstance(k, slice):
            return [self._make(i) for i in range(*k.indices(self.n))]
        if not 0 <= k < self.n:
            raise IndexError(k)
        return self._make(k)


class SimEndpoint(InProcessDouble):
    """A simulated server: random latency, transient failures, and it may die (and revive)."""

    def __init__(self, mean_s: float, fail: float, rng: random.Random, slots: int) -> None:
        super().__init__(n_slots=slots, simulate_cache=False)
        self.mean_s = mean_s
        self.fail_rate = fail
        self.rng = rng
        self.alive = True
        self.failed = 0

    async def chat(self, request: ChatRequest) -> ChatResult:
        if not self.alive:
            raise BackendUnreachable("simulated endpoint is down")
        await asyncio.sleep(self.rng.expovariate(1.0 / self.mean_s))
        if not self.alive:
            raise TransientServerError("simulated reset: the endpoint died mid-request")
        if self.rng.random() < self.fail_rate:
            self.failed += 1
            raise TransientServerError("simulated 503")
        return await super().chat(request)

    async def health(self) -> bool:
        return self.alive


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


@dataclass
class SimResult:
    requests: int
    completed: int
    errors: int
    elapsed_s: float
    checkpoints: list[dict[str, float]] = field(default_factory=list)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    injected_failures: int = 0
    retries: int = 0
    ids_once: bool = True


def simulate(
    requests: int = 1_000_000,
    endpoints: int = 64,
    *,
    slots: int = 4,
    fail: float = 0.01,
    min_ms: float = 1.0,
    max_ms: float = 8.0,
    every: int = 100_000,
    seed: int = 0,
    results: Path | None = None,
    quiet: bool = False,
) -> SimResult:
    """Run the simulation; returns its figures (see the module docstring)."""
    rng = random.Random(seed)
    members = [
        SimEndpoint(rng.uniform(min_ms, max_ms) / 1000.0, fail, random.Random(seed + 1 + k), slots)
        for k in range(endpoints)
    ]
    pool = PoolBackend(members, health_interval_s=0.5)
    items = LazyItems(requests)
    checkpoints: list[dict[str, float]] = []
    ids = bytearray(requests)  # one byte per id: how many times it ended (a check, not state)
    state = {"n": 0, "t0": 0.0, "last_t": 0.0, "last_n": 0}
    dies = {requests // 4: 3, requests // 2: 7 % endpoints}
    revive_at = (requests * 3) // 4

    def sink(rec: RequestRecord) -> None:
        k = int(rec.custom_id[1:])
        ids[k] = min(255, ids[k] + 1)
        n = state["n"] = state["n"] + 1
        if n in dies:
            members[dies[n]].alive = False
        if n == revive_at:
            members[3].alive = True
        if n % every == 0 or n == requests:
            now = time.perf_counter()
            gc.collect()
            point = {
                "requests": float(n),
                "rate_rps": (n - state["last_n"]) / (now - state["last_t"]),
                "overall_rps": n / (now - state["t0"]),
                "rss_mib": rss_mib(),
            }
            checkpoints.append(point)
            state["last_t"], state["last_n"] = time.perf_counter(), n
            if not quiet:
                print(
                    f"{n:>9,} requests: {point['rate_rps']:>8,.0f} req/s (this stretch), "
                    f"{point['overall_rps']:>8,.0f} req/s overall, RSS {point['rss_mib']:.1f} MiB",
                    flush=True,
                )

    spec = JobSpec(
        runner=RunnerConfig(
            concurrency=endpoints * slots,
            retry=RetryPolicy(max_attempts=8, base_delay_s=0.002, max_delay_s=0.05),
        ),
        results_path=results,
        progress=False,
        memory_interval_s=5.0,
    )

    async def go() -> Any:
        async with pool:
            state["t0"] = state["last_t"] = time.perf_counter()
            return await run_job(pool, items, spec, sinks=[sink])

    if not quiet:
        print(
            f"simulating {requests:,} requests over {endpoints} endpoints × {slots} slots "
            f"(latency means {min_ms}-{max_ms} ms, {fail:.0%} transient failures; two "
            f"endpoints die, one comes back); RSS before: {rss_mib():.1f} MiB",
            flush=True,
        )
    t0 = time.perf_counter()
    job = asyncio.run(go())
    elapsed = time.perf_counter() - t0
    return SimResult(
        requests=job.metrics.requests,
        completed=job.metrics.completed,
        errors=job.metrics.errors,
        elapsed_s=elapsed,
        checkpoints=checkpoints,
        endpoints=job.endpoints,
        injected_failures=sum(m.failed for m in members),
        retries=job.metrics.retries,
        ids_once=all(c == 1 for c in ids),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--endpoints", type=int, default=64)
    p.add_argument("--slots", type=int, default=4, help="slots (requests in flight) per endpoint")
    p.add_argument("--fail", type=float, default=0.01, help="share of transient failures")
    p.add_argument("--min-ms", type=float, default=1.0, help="lowest mean latency of an endpoint")
    p.add_argument("--max-ms", type=float, default=8.0, help="highest mean latency")
    p.add_argument("--every", type=int, default=100_000, help="print a checkpoint every N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=None, help="also write a results file")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    r = simulate(
        args.requests,
        args.endpoints,
        slots=args.slots,
        fail=args.fail,
        min_ms=args.min_ms,
        max_ms=args.max_ms,
        every=args.every,
        seed=args.seed,
        results=args.results,
    )
    rows = sorted(ep["rows"] for ep in r.endpoints)
    down = [ep for ep in r.endpoints if ep["down_at"] is not None]
    print(
        f"done: {r.completed:,} completed, {r.errors} errors of {r.requests:,} requests in "
        f"{r.elapsed_s:.1f} s ({r.completed / r.elapsed_s:,.0f} req/s); {r.injected_failures:,} "
        f"injected failures, {r.retries:,} retries; every id once: {r.ids_once}; rows per "
        f"endpoint min {rows[0]:,} / median {rows[len(rows) // 2]:,} / max {rows[-1]:,}; "
        f"endpoints that left: {len(down)} ("
        + ", ".join(
            f"{ep['endpoint']} after {ep['down_after_requests']:,}, back: {ep['up']}" for ep in down
        )
        + ")"
    )
    first, last = r.checkpoints[0], r.checkpoints[-1]
    print(
        f"RSS {first['rss_mib']:.1f} MiB at {first['requests']:,.0f} requests, "
        f"{last['rss_mib']:.1f} MiB at {last['requests']:,.0f}; "
        f"rate {first['rate_rps']:,.0f} req/s in the first stretch, "
        f"{last['rate_rps']:,.0f} req/s in the last (in-process doubles: not a server's figures)"
    )
    if args.json:
        args.json.write_text(json.dumps(r.__dict__, indent=1, default=str))
    return 0 if r.ids_once and r.completed == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
