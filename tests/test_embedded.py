"""The embedded backend against real llama.cpp servers (xllamacpp) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest

from harness.backends.base import ChatRequest
from harness.backends.embedded import EmbeddedBackend, EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.backends.server import ServerSettings
from harness.engine.tokens import common_prefix_len
from harness.errors import BackendUnreachable, ContextOverflow, ModelNotFound, TransientServerError
from harness.models import geometry_from_gguf, kv_theory, resolve_model
from harness.workload import generate_candidates, load_prompt

pytestmark = pytest.mark.integration


def test_the_backend_holds_no_more_connections_than_the_server_can_serve(
    tiny_server: EmbeddedServer,
) -> None:
    """llama-server has at least slots + 2 HTTP threads, and a kept-alive connection keeps one.
    In the performance suite's rounds, bursts of 8 `/tokenize` calls from an uncapped pool
    waited 5.11 s (11 times in 7 runs; never with the cap), so the backend keeps to slots + 1
    connections. Counted at the server (its process's TCP connections) during a burst of 12
    calls; a plain client opens one per call, so the count can fail."""
    import psutil

    url = tiny_server.url or ""
    port = int(url.rsplit(":", 1)[1])
    server = psutil.Process(tiny_server.pid)
    texts = [f"candidate {i} " * 20 for i in range(12)]

    def open_to_server() -> int:
        return sum(
            1
            for c in server.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
        )

    async def most_open(send: Callable[[], Awaitable[object]]) -> int:
        seen = [0]

        async def watch() -> None:
            while True:
                seen[0] = max(seen[0], open_to_server())
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await send()
        seen[0] = max(seen[0], open_to_server())  # kept alive after the burst
        watcher.cancel()
        return seen[0]

    async def go() -> tuple[int, int, object]:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as plain:
            uncapped = await most_open(
                lambda: asyncio.gather(
                    *(plain.post("/tokenize", json={"content": t}) for t in texts)
                )
            )
        await asyncio.sleep(0.2)  # the plain client's connections are closed
        backend = OpenAIBackend(url)
        async with backend:
            capped = await most_open(lambda: backend.tokenize(texts))
        return uncapped, capped, backend.info.extra.get("connections")

    uncapped, capped, connections = asyncio.run(go())
    print(f"\n12 /tokenize at once: plain client {uncapped} connections, backend {capped}")
    assert connections == 2  # one slot
    assert uncapped > 2, "the plain client should open a connection per call"
    assert capped <= 2


def test_shared_rubric_is_served_from_the_prefix_cache(gemma_server: EmbeddedServer) -> None:
    """20 requests sharing the ~4,000-token rubric: cached ≥ 95% of shared prefix × 19."""
    from array import array

    prompt = load_prompt()
    rows = list(generate_candidates(20, seed=7))
    conversations = [
        [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.render(r, "id")},
        ]
        for r in rows
    ]
    backend = OpenAIBackend(gemma_server.url or "")

    async def go() -> tuple[list[int], list[array[int]]]:
        async with backend:
            from harness.engine.tokens import TokenCounter
            from harness.models.templates import get_format

            counter = TokenCounter(get_format("gemma"), backend.tokenize, source="server")
            ids = [await counter.count(c) for c in conversations]
            cached = []
            for conv in conversations:
                result = await backend.chat(ChatRequest(conv, max_tokens=2, temperature=0))
                assert result.usage.cached_source == "server"
                cached.append(result.usage.cached_tokens or 0)
            return cached, ids

    cached, ids = asyncio.run(go())
    shared = min(common_prefix_len(ids[0], other) for other in ids[1:])
    theoretical = shared * 19
    print(
        f"\nshared prefix {shared} tokens of ~{len(ids[0])}; cached {sum(cached)} of {theoretical}"
    )
    assert shared > 3800
    assert cached[0] == 0 or cached[0] < shared  # the first request is cold
    assert sum(cached[1:]) >= 0.95 * theoretical


def _rss_after_start(n_ctx: int) -> int:
    with EmbeddedServer(ServerSettings(model="gemma3-270m", n_ctx=n_ctx)) as server:
        time.sleep(0.5)
        return server.memory_probe().sample().used_bytes


def test_server_memory_grows_by_the_global_layers_kv_per_token() -> None:
    low, high = 4096, 32768
    rss_low, rss_high = _rss_after_start(low), _rss_after_start(high)
    slope = (rss_high - rss_low) / (high - low)
    theory = kv_theory(
        geometry_from_gguf(resolve_model("gemma3-270m").path)
    ).bytes_per_token_growing
    print(
        f"\nRSS {rss_low} B at {low}, {rss_high} B at {high}: "
        f"{slope:.0f} B/token (theory {theory:.0f})"
    )
    assert theory == 3072
    assert slope == pytest.approx(theory, rel=0.10)


def test_harness_serve_answers_chat_on_loopback() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "serve",
            "--model",
            "tiny-gemma3",
            "--ctx",
            "2048",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("harness serve: listening on http://127.0.0.1:"), line
        url = line.split()[4]
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        body = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=60,
        ).json()
        assert body["usage"]["completion_tokens"] == 3
        assert isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_model_not_found() -> None:
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
        EmbeddedBackend("no-such-model")


def test_model_not_served_by_a_running_server(tiny_server: EmbeddedServer) -> None:
    async def go() -> None:
        async with OpenAIBackend(tiny_server.url or "", model="gemma3:12b"):
            pass

    with pytest.raises(ModelNotFound, match="'gemma3:12b' is not served"):
        asyncio.run(go())


def test_context_longer_than_n_ctx_is_a_context_overflow() -> None:
    async def go() -> None:
        async with EmbeddedBackend("tiny-gemma3", n_ctx=256) as backend:
            await backend.chat(
                ChatRequest([{"role": "user", "content": "word " * 600}], max_tokens=4)
            )

    with pytest.raises(ContextOverflow) as info:
        asyncio.run(go())
    assert info.value.n_ctx == 256 and (info.value.prompt_tokens or 0) > 256


def test_server_dying_mid_request_is_transient_then_unreachable() -> None:
    async def go() -> None:
        async with EmbeddedBackend("tiny-gemma3", n_ctx=4096) as backend:
            killer = threading.Timer(1.0, backend.server.kill)
            killer.start()
            with pytest.raises(TransientServerError, match="failed mid-request"):
                await backend.chat(
                    ChatRequest([{"role": "user", "content": "go on"}], max_tokens=3500)
                )
            killer.join()
            with pytest.raises(BackendUnreachable, match=backend.base_url):
                await backend.chat(
                    ChatRequest([{"role": "user", "content": "again"}], max_tokens=2)
                )

    asyncio.run(go())
