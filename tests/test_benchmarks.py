"""Benchmarks of the engine itself (pytest-benchmark): dispatch rate, memory over 170K requests,
and overhead against a minimal direct client on a real server.

The in-process double's numbers measure the *engine*, never a model or a server.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.baselines import direct_loop
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.job import open_token_counter
from harness.records import RequestRecord
from harness.testing import InProcessDouble
from harness.workload import (
    CandidateTable,
    WorkItem,
    generate_candidates,
    items_from_table,
    load_prompt,
)


def rubric_items(n: int, *, structured: str = "grammar", max_tokens: int = 16) -> list[WorkItem]:
    rows = tuple(generate_candidates(n, seed=3))
    table = CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, n + 2)))
    return items_from_table(table, load_prompt(), max_tokens=max_tokens, structured=structured)


@pytest.mark.timing
def test_engine_dispatch_rate(benchmark: Any, tmp_path: Path) -> None:
    """≥ 10,000 requests/s through the whole engine (store included) on a zero-latency double."""
    items = rubric_items(20_000)
    runs = iter(range(100))

    def one_run() -> None:
        spec = JobSpec(
            strategy="stateless",
            progress=False,
            results_path=tmp_path / f"results-{next(runs)}.jsonl",
            runner=RunnerConfig(concurrency=4),
            policy=TrimPolicy(max_context_tokens=100_000),
        )
        result = asyncio.run(run_job(InProcessDouble(n_slots=4, simulate_cache=False), items, spec))
        assert result.metrics.completed == len(items)

    benchmark.pedantic(one_run, rounds=5, iterations=1, warmup_rounds=1)
    rates = [len(items) / t for t in benchmark.stats.stats.data]
    benchmark.extra_info.update(
        requests_per_round=len(items),
        dispatch_rps_median=statistics.median(rates),
        dispatch_rps_best=max(rates),
        backend="in-process double (engine overhead only; not a measurement of a server)",
    )
    print(
        f"\nengine dispatch: median {statistics.median(rates):,.0f} req/s, best {max(rates):,.0f}"
    )
    assert statistics.median(rates) >= 10_000


def test_170k_requests_without_leaking(benchmark: Any, tmp_path: Path) -> None:
    """A 170,000-request run completes; runner RSS grows < 64 MB from request 10,000 on."""
    items = rubric_items(170_000)
    proc = psutil.Process(os.getpid())
    rss: dict[int, int] = {}
    done = [0]

    def watch(rec: RequestRecord) -> None:
        done[0] += 1
        if done[0] in (10_000, 90_000, 170_000):
            rss[done[0]] = proc.memory_info().rss

    def one_run() -> None:
        spec = JobSpec(
            strategy="conversation",
            progress=False,
            results_path=tmp_path / "results.jsonl",
            runner=RunnerConfig(concurrency=4),
            policy=TrimPolicy(max_context_tokens=32_768, trim_interval=50),
        )
        result = asyncio.run(run_job(InProcessDouble(n_slots=4), items, spec, sinks=[watch]))
        assert result.metrics.completed == 170_000
        assert result.metrics.context_trims > 3000

    benchmark.pedantic(one_run, rounds=1, iterations=1)
    growth = rss[170_000] - rss[10_000]
    benchmark.extra_info.update(
        rss_at_10k=rss[10_000], rss_at_90k=rss[90_000], rss_at_170k=rss[170_000], growth=growth
    )
    print(
        f"\nrunner RSS: {rss[10_000] / 2**20:.1f} MiB at 10K, "
        f"{rss[170_000] / 2**20:.1f} MiB at 170K"
    )
    assert growth < 64 * 2**20


@pytest.mark.integration
@pytest.mark.timing
def test_engine_keeps_up_with_a_direct_client(benchmark: Any, tiny_server: EmbeddedServer) -> None:
    """Engine throughput ≥ 0.97 × a minimal direct httpx loop, same server, requests, concurrency.

    After a warm-up, five pairs of rounds run on one server, the order alternating within pairs
    (engine first, then direct first, ...) so drift in the machine's speed cancels; the figure
    is the median of the pairs' ratios. The engine keeps its token counter across rounds, as a
    long run does after its first requests.
    """
    items = rubric_items(60, structured="none", max_tokens=8)
    url = tiny_server.url or ""

    async def pairs(n: int) -> list[tuple[float, float]]:
        out = []
        await direct_loop(url, items[:2])  # warm-up: the first request computes the rubric
        async with OpenAIBackend(url) as backend, open_token_counter(backend) as counter:

            async def engine() -> float:
                t = time.perf_counter()
                spec = JobSpec(progress=False, runner=RunnerConfig(concurrency=1))
                await run_job(backend, items, spec, counter=counter)
                return time.perf_counter() - t

            async def direct() -> float:
                return (await direct_loop(url, items)).elapsed_s

            for i in range(n):
                if i % 2 == 0:
                    e, d = await engine(), await direct()
                else:
                    d, e = await direct(), await engine()
                out.append((e, d))
        return out

    times = benchmark.pedantic(lambda: asyncio.run(pairs(5)), rounds=1, iterations=1)
    ratios = [d / e for e, d in times]
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(
        engine_s=[e for e, _ in times], direct_s=[d for _, d in times], ratios=ratios,
        engine_over_direct_throughput=ratio,
    )  # fmt: skip
    print(
        f"\nengine/direct throughput: median {ratio:.3f} of pairs {[round(r, 3) for r in ratios]}"
    )
    assert ratio >= 0.97
