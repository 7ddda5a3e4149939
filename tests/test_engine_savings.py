"""The engine on a real server: server-reported prefix-cache savings against the theoretical
maximum, 1,000 requests sharing the ~4,000-token rubric, each strategy (tiny-gemma3)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.backends.server import ServerSettings
from harness.engine import JobSpec, TrimPolicy, run_job
from harness.engine.job import JobResult
from harness.workload import CandidateTable, generate_candidates, items_from_table, load_prompt

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["stateless", "conversation"])
def test_savings_reach_the_theoretical_maximum(strategy: str) -> None:
    rows = tuple(generate_candidates(1000, seed=21))
    table = CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, 1002)))
    items = items_from_table(table, load_prompt(), max_tokens=8, structured="none")
    spec = JobSpec(
        strategy=strategy,
        policy=TrimPolicy(max_context_tokens=16384, trim_interval=50),
        desc=f"savings {strategy}",
        progress_stream=sys.__stderr__,
    )

    # A fresh server (its cache state is this run's), with full-size sliding windows for the
    # conversation: without them llama.cpp recomputes the rubric after every trim.
    settings = ServerSettings("tiny-gemma3", n_ctx=16384, swa_full=strategy == "conversation")

    async def go() -> JobResult:
        async with OpenAIBackend(server.url or "") as backend:
            return await run_job(backend, items, spec)

    with EmbeddedServer(settings) as server:
        m = asyncio.run(go()).metrics
    print(
        f"\n{strategy}: server-reported savings {m.token_savings:.4f}, theoretical maximum "
        f"{m.token_savings_theoretical_max:.4f}, efficiency {m.savings_efficiency:.4f}; "
        f"{m.completed} done, {m.context_trims} trims, {m.throughput_rps:.2f} req/s"
    )
    assert m.completed == 1000 and m.errors == 0
    assert m.cached_source == "server"
    assert m.token_savings >= 0.99 * m.token_savings_theoretical_max
    assert m.token_savings <= m.token_savings_theoretical_max
