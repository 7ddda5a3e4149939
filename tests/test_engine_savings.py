"""The engine on a real server: server-reported prefix-cache savings against the theoretical
maximum, 1,000 requests sharing the ~4,000-token rubric, each strategy (tiny-gemma3)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.engine import JobSpec, TrimPolicy, run_job
from harness.workload import CandidateTable, generate_candidates, items_from_table, load_prompt

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["stateless", "conversation"])
def test_savings_reach_the_theoretical_maximum(tiny_server: EmbeddedServer, strategy: str) -> None:
    rows = tuple(generate_candidates(1000, seed=21))
    table = CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, 1002)))
    items = items_from_table(table, load_prompt(), max_tokens=8, structured="none")
    spec = JobSpec(
        strategy=strategy,
        policy=TrimPolicy(max_context_tokens=16384, trim_interval=50),
        desc=f"savings {strategy}",
        progress_stream=sys.__stderr__,
    )

    async def go() -> object:
        async with OpenAIBackend(tiny_server.url or "") as backend:
            return await run_job(backend, items, spec)

    m = asyncio.run(go()).metrics  # type: ignore[attr-defined]
    print(
        f"\n{strategy}: server-reported savings {m.token_savings:.4f}, theoretical maximum "
        f"{m.token_savings_theoretical_max:.4f}, efficiency {m.savings_efficiency:.4f}; "
        f"{m.completed} done, {m.context_trims} trims, {m.throughput_rps:.2f} req/s"
    )
    assert m.completed == 1000 and m.errors == 0
    assert m.cached_source == "server"
    assert m.token_savings >= 0.99 * m.token_savings_theoretical_max
    assert m.token_savings <= m.token_savings_theoretical_max
