"""Baselines the engine is compared with, on the same server and requests.

- `direct_loop`: a minimal client: httpx, the same chat bodies, the same concurrency, nothing
  else (no token counting, no store, no retries).
- the naive client: the same loop with `cache_prompt: false`, so every request pays its whole
  prompt — what a run without prefix caching costs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from harness.workload import WorkItem, item_body

__all__ = ["DirectResult", "direct_loop"]


@dataclass(slots=True)
class DirectResult:
    requests: int
    elapsed_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def token_savings(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "elapsed_s": self.elapsed_s,
            "throughput_rps": self.throughput_rps,
            "tokens": {
                "prompt": self.prompt_tokens,
                "cached": self.cached_tokens,
                "uncached": self.prompt_tokens - self.cached_tokens,
                "completion": self.completion_tokens,
            },
            "token_savings": self.token_savings,
        }


def _body(item: WorkItem, cache_prompt: bool) -> dict[str, Any]:
    """The item's chat body as the engine sends it to llama.cpp (a grammar, when it has one)."""
    body = item_body(item)
    if item.grammar is not None:
        body.pop("response_format", None)
        body["grammar"] = item.grammar
    if not cache_prompt:
        body["cache_prompt"] = False
    return body


async def direct_loop(
    base_url: str,
    items: Sequence[WorkItem],
    *,
    concurrency: int = 1,
    cache_prompt: bool = True,
    timeout_s: float = 1200.0,
) -> DirectResult:
    """Send every item's chat body with `concurrency` workers; measure wall time and usage."""
    result = DirectResult(len(items), 0.0)
    queue = list(reversed(items))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            item = queue.pop()
            t = time.perf_counter()
            resp = await client.post("/v1/chat/completions", json=_body(item, cache_prompt))
            resp.raise_for_status()
            result.latencies_ms.append((time.perf_counter() - t) * 1000.0)
            usage = resp.json().get("usage") or {}
            result.prompt_tokens += int(usage.get("prompt_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            result.cached_tokens += int(details.get("cached_tokens") or 0)
            result.completion_tokens += int(usage.get("completion_tokens", 0))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - started
    return result
