"""OllamaBackend and CacheInference against Ollama-shaped replies (tests/data/ollama/).

Every test but the last runs on `httpx.MockTransport`: the official `ollama` client does the HTTP,
the mock answers with fixture bodies and records what was sent. The last test talks to a real
Ollama server when one answers at $OLLAMA_HOST, and skips otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from harness.backends.base import Backend, ChatRequest
from harness.backends.ollama import CacheInference, OllamaBackend
from harness.errors import (
    BackendError,
    BackendUnreachable,
    LoadFailure,
    ModelNotFound,
    OutOfMemory,
    ProtocolError,
    RequestTimeout,
    TransientServerError,
)
from harness.memory import OllamaPsProbe, normalise_ollama_host
from harness.models.kv import kv_theory

DATA = Path(__file__).parent / "data" / "ollama"
MODEL = "gemma3:12b"
URL = "http://ollama.test:11434"
KIB = 1024

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["billing", "shipping", "other"]},
        "confidence": {"type": "number"},
        "rationale": {"type": "string"},
    },
    "required": ["label", "confidence", "rationale"],
}
MESSAGES = [
    {"role": "system", "content": "Classify the support ticket."},
    {"role": "user", "content": "I was charged twice for order 1182."},
]

T = TypeVar("T")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return data


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


Reply = tuple[int, Any] | Exception
Route = Reply | list[Reply] | Callable[[httpx.Request], httpx.Response]


class FakeOllama:
    """A MockTransport handler: fixture replies by `METHOD /path`, every request recorded.

    A route is `(status, body)`, an exception to raise (a transport failure), a list of those
    answered in turn (the last one repeats), or a function of the request.
    """

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = {
            "GET /api/version": (200, load("version.json")),
            "POST /api/show": (200, load("show_gemma3_12b.json")),
            **(routes or {}),
        }
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = f"{request.method} {request.url.path}"
        route = self.routes.get(key)
        if route is None:
            return httpx.Response(404, text="404 page not found")
        if callable(route) and not isinstance(route, Exception):
            return route(request)
        if isinstance(route, list):
            seen = sum(1 for r in self.requests if f"{r.method} {r.url.path}" == key)
            route = route[min(seen, len(route)) - 1]
        if isinstance(route, Exception):
            raise route
        status, body = route
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]

    def bodies(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if f"{r.method} {r.url.path}" == key]


def make_backend(fake: FakeOllama, **options: Any) -> OllamaBackend:
    transport = httpx.MockTransport(fake)
    return OllamaBackend(
        MODEL,
        base_url=URL,
        transport=transport,
        sync_transport=transport,
        **options,
    )


async def started(fake: FakeOllama, **options: Any) -> OllamaBackend:
    backend = make_backend(fake, **options)
    await backend.start()
    return backend


# -- lifecycle ----------------------------------------------------------------------------------


def test_backend_is_registered_as_ollama() -> None:
    backend = Backend.create("ollama", model=MODEL, base_url=URL)
    assert isinstance(backend, OllamaBackend)
    assert backend.info.backend == "ollama"
    assert backend.info.chat_format is not None  # gemma models get the gemma layout


def test_start_reads_version_and_show() -> None:
    fake = FakeOllama()

    async def scenario() -> tuple[bool, bool, bool]:
        backend = make_backend(fake)
        before = await backend.health()
        await backend.start()
        during = await backend.health()
        await backend.stop()
        await backend.stop()  # safe twice
        return before, during, await backend.health()

    before, during, after = run(scenario())
    assert (before, during, after) == (False, True, False)
    assert fake.paths()[:2] == ["GET /api/version", "POST /api/show"]
    assert fake.bodies("POST /api/show") == [{"model": MODEL}]
    assert all(str(r.url).startswith(URL + "/api/") for r in fake.requests)


def test_start_records_server_version() -> None:
    backend = make_backend(FakeOllama())
    run(backend.start())
    assert backend.info.server == "ollama 0.12.3"
    assert backend.info.base_url == URL
    assert backend.info.model == MODEL


# -- requests ----------------------------------------------------------------------------------


def test_chat_sends_options_keep_alive_and_format() -> None:
    fake = FakeOllama({"POST /api/chat": (200, load("chat_cold.json"))})
    request = ChatRequest(MESSAGES, max_tokens=256, temperature=0.0, seed=42, output_schema=SCHEMA)

    async def scenario() -> None:
        backend = await started(fake, num_ctx=8192, keep_alive="30m")
        await backend.chat(request)

    run(scenario())
    [body] = fake.bodies("POST /api/chat")
    assert body["model"] == MODEL
    assert body["messages"] == MESSAGES
    # temperature 0.0 is falsy but must still be sent.
    assert body["options"] == {"num_ctx": 8192, "num_predict": 256, "temperature": 0.0, "seed": 42}
    assert body["keep_alive"] == "30m"
    assert body["format"] == SCHEMA
    assert body["stream"] is False


def test_chat_without_schema_or_limits_sends_no_format_and_merges_extra_options() -> None:
    fake = FakeOllama({"POST /api/chat": (200, load("chat_cold.json"))})
    request = ChatRequest(MESSAGES, extra={"options": {"top_k": 1, "num_predict": 16}})

    async def scenario() -> None:
        backend = await started(fake, keep_alive=-1)
        await backend.chat(request)

    run(scenario())
    [body] = fake.bodies("POST /api/chat")
    assert "format" not in body
    assert body["options"] == {"top_k": 1, "num_predict": 16}
    assert body["keep_alive"] == -1


def test_chat_before_start_is_refused() -> None:
    backend = make_backend(FakeOllama())
    with pytest.raises(BackendError, match="not started"):
        run(backend.chat(ChatRequest(MESSAGES)))


def test_usage_and_timings_are_normalised_cold_then_warm() -> None:
    cold_body, warm_body = load("chat_cold.json"), load("chat_warm.json")
    fake = FakeOllama({"POST /api/chat": [(200, cold_body), (200, warm_body)]})

    async def scenario() -> list[Any]:
        backend = await started(fake)
        return [await backend.chat(ChatRequest(MESSAGES)) for _ in range(2)]

    cold, warm = run(scenario())

    assert json.loads(cold.content)["label"] == "billing"
    assert cold.finish_reason == "stop"
    assert cold.usage.prompt_tokens == 1843
    assert cold.usage.completion_tokens == 41
    assert cold.usage.cached_tokens == 0  # the first request sets the cold rate
    assert cold.usage.cached_source == "inferred"
    assert cold.timings.prompt_ms == pytest.approx(921.5)
    assert cold.timings.decode_ms == pytest.approx(3201.187904)
    assert cold.timings.load_ms == pytest.approx(4210.338476)
    assert cold.timings.total_ms > 0
    assert cold.raw["total_duration"] == cold_body["total_duration"]

    # 24.5 ms at the cold 500 000 ns/token computes 49 tokens: the other 1813 were reused.
    assert warm.usage.prompt_tokens == 1862
    assert warm.usage.completion_tokens == 44
    assert warm.usage.cached_tokens == 1813
    assert warm.usage.uncached_tokens == 49
    assert warm.usage.cached_source == "inferred"
    assert warm.timings.prompt_ms == pytest.approx(24.5)
    assert warm.timings.load_ms == pytest.approx(81.21395)
    assert json.loads(warm.content)["label"] == "shipping"


def test_reply_without_prompt_durations_leaves_cached_unknown() -> None:
    body = load("chat_warm.json")
    del body["prompt_eval_duration"]
    result = make_backend(FakeOllama()).parse_reply(body, total_ms=12.0)
    assert result.usage.prompt_tokens == 1862
    assert result.usage.cached_tokens is None
    assert result.usage.cached_source == "unknown"
    assert result.timings.prompt_ms is None
    assert result.timings.decode_ms == pytest.approx(3214.960117)


# -- cache inference ---------------------------------------------------------------------------


def test_cache_inference_first_request_is_cold() -> None:
    inf = CacheInference()
    assert inf.observe(1000, 500_000_000) == 0
    assert inf.cold_ns_per_token == pytest.approx(500_000.0)


def test_cache_inference_faster_request_infers_cached_tokens() -> None:
    inf = CacheInference()
    inf.observe(1000, 500_000_000)  # 500 000 ns/token
    # 1200 tokens in 100 ms: 200 computed at the cold rate, 1000 reused.
    assert inf.observe(1200, 100_000_000) == 1000
    # The estimate is not lowered by a cached request.
    assert inf.cold_ns_per_token == pytest.approx(500_000.0)


def test_cache_inference_clamps_to_one_computed_token() -> None:
    inf = CacheInference()
    inf.observe(1000, 500_000_000)
    # 1 µs: computed rounds to 0, but Ollama always evaluates at least the last token.
    assert inf.observe(800, 1_000) == 799


def test_cache_inference_slower_request_resets_the_estimate() -> None:
    inf = CacheInference()
    inf.observe(1000, 500_000_000)  # 500 000 ns/token: not truly cold, as it turns out
    assert inf.observe(1000, 800_000_000) == 0  # slower: taken as cold
    assert inf.cold_ns_per_token == pytest.approx(800_000.0)
    # Later figures use the new rate: 80 ms at 800 000 ns/token computes 100 of 1000.
    assert inf.observe(1000, 80_000_000) == 900


@pytest.mark.parametrize(("prompt_tokens", "prompt_ns"), [(1000, None), (1000, 0), (0, 5_000)])
def test_cache_inference_without_figures_says_nothing(
    prompt_tokens: int, prompt_ns: int | None
) -> None:
    inf = CacheInference()
    assert inf.observe(prompt_tokens, prompt_ns) is None
    assert inf.cold_ns_per_token is None  # nothing learnt either


# -- geometry ----------------------------------------------------------------------------------


def test_model_geometry_from_show() -> None:
    fake = FakeOllama()

    async def scenario() -> Any:
        backend = await started(fake)
        return await backend.model_geometry()

    geom = run(scenario())
    assert geom is not None
    assert geom.architecture == "gemma3"
    assert geom.n_layers == 48
    assert geom.n_heads == 16
    assert geom.n_kv_heads == 8
    # The fixture has no attention.key_length/value_length: Ollama's default 256 applies.
    assert geom.key_length == 256
    assert geom.value_length == 256
    assert geom.context_length == 131072
    assert geom.embedding_length == 3840
    assert geom.sliding_window == 1024
    # sliding_window_pattern is null: gemma3's period of 6 puts a global layer at 5, 11, ..., 47.
    assert geom.global_layers == (5, 11, 17, 23, 29, 35, 41, 47)
    assert len(geom.local_layers) == 40
    assert geom.source == f"ollama:/api/show {MODEL}"

    theory = kv_theory(geom)  # f16 K and V: 8 heads × (256 + 256) × 2 B = 8 KiB per layer
    assert theory.bytes_per_token_all_layers == 384 * KIB
    assert theory.bytes_per_token_growing == 64 * KIB
    assert theory.bytes_per_token_local == 320 * KIB
    assert theory.sliding_window == 1024


def test_model_geometry_uses_key_length_when_show_has_it() -> None:
    show = load("show_gemma3_12b.json")
    show["model_info"]["gemma3.attention.key_length"] = 128
    fake = FakeOllama({"POST /api/show": (200, show)})

    async def scenario() -> Any:
        backend = await started(fake)
        return await backend.model_geometry()

    geom = run(scenario())
    assert geom is not None
    assert (geom.key_length, geom.value_length) == (128, 128)
    assert kv_theory(geom).bytes_per_token_all_layers == 192 * KIB


def test_model_geometry_before_start_is_refused() -> None:
    with pytest.raises(BackendError, match="not started"):
        run(make_backend(FakeOllama()).model_geometry())


# -- errors ------------------------------------------------------------------------------------


def test_missing_model_at_start_raises_model_not_found() -> None:
    fake = FakeOllama({"POST /api/show": (404, load("error_model_not_found.json"))})
    with pytest.raises(ModelNotFound) as info:
        run(make_backend(fake).start())
    message = str(info.value)
    assert f"ollama pull {MODEL}" in message
    assert "not found, try pulling it first" in message
    assert info.value.url == URL
    assert not info.value.retryable


def test_missing_model_at_chat_raises_model_not_found() -> None:
    fake = FakeOllama({"POST /api/chat": (404, load("error_model_not_found.json"))})

    async def scenario() -> None:
        backend = await started(fake)
        await backend.chat(ChatRequest(MESSAGES))

    with pytest.raises(ModelNotFound, match="ollama pull"):
        run(scenario())


def test_connection_refused_raises_backend_unreachable_naming_the_url() -> None:
    fake = FakeOllama({"GET /api/version": httpx.ConnectError("[Errno 111] Connection refused")})
    with pytest.raises(BackendUnreachable) as info:
        run(make_backend(fake).start())
    assert URL in str(info.value)
    assert info.value.url == URL
    assert info.value.retryable


def test_read_timeout_raises_request_timeout() -> None:
    fake = FakeOllama({"POST /api/chat": httpx.ReadTimeout("timed out")})

    async def scenario() -> None:
        backend = await started(fake)
        await backend.chat(ChatRequest(MESSAGES))

    with pytest.raises(RequestTimeout) as info:
        run(scenario())
    assert URL in str(info.value)
    assert info.value.retryable


@pytest.mark.parametrize("fixture", ["error_out_of_memory.json", "error_requires_more_memory.json"])
def test_server_out_of_memory_raises_out_of_memory(fixture: str) -> None:
    fake = FakeOllama({"POST /api/chat": (500, load(fixture))})

    async def scenario() -> None:
        backend = await started(fake)
        await backend.chat(ChatRequest(MESSAGES))

    with pytest.raises(OutOfMemory) as info:
        run(scenario())
    assert isinstance(info.value, LoadFailure)
    assert not info.value.retryable  # the same load would fail the same way
    assert load(fixture)["error"] in str(info.value)
    assert "num_ctx" in str(info.value)


def test_server_busy_raises_retryable_transient_error() -> None:
    fake = FakeOllama({"POST /api/chat": (503, load("error_server_busy.json"))})

    async def scenario() -> None:
        backend = await started(fake)
        await backend.chat(ChatRequest(MESSAGES))

    with pytest.raises(TransientServerError) as info:
        run(scenario())
    assert info.value.status_code == 503
    assert info.value.retryable
    assert "server busy" in str(info.value)


def test_unauthorised_is_a_plain_backend_error() -> None:
    fake = FakeOllama({"POST /api/chat": (401, {"error": "unauthorized"})})

    async def scenario() -> None:
        backend = await started(fake)
        await backend.chat(ChatRequest(MESSAGES))

    with pytest.raises(BackendError) as info:
        run(scenario())
    assert type(info.value) is BackendError
    assert "401" in str(info.value)
    assert not info.value.retryable


def test_non_json_version_raises_protocol_error() -> None:
    fake = FakeOllama({"GET /api/version": (200, "<html>It works!</html>")})
    with pytest.raises(ProtocolError, match="unexpected reply"):
        run(make_backend(fake).start())


# -- host and memory probe ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", "http://0.0.0.0:11434"),
        ("gpu-box", "http://gpu-box:11434"),
        ("gpu-box:8080", "http://gpu-box:8080"),
        (":11500", "http://127.0.0.1:11500"),
        ("[::1]", "http://[::1]:11434"),
        ("http://10.0.0.5:11434/", "http://10.0.0.5:11434"),
        ("https://ollama.example.com", "https://ollama.example.com"),
    ],
)
def test_host_is_read_as_ollama_reads_it(host: str, expected: str) -> None:
    assert normalise_ollama_host(host) == expected
    assert OllamaBackend(MODEL, base_url=host).base_url == expected


def test_ollama_host_env_without_port_reaches_port_11434(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0")
    fake = FakeOllama()
    backend = OllamaBackend(MODEL, transport=httpx.MockTransport(fake))
    run(backend.start())
    assert backend.base_url == "http://0.0.0.0:11434"
    assert {r.url.port for r in fake.requests} == {11434}


def test_default_host_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert OllamaBackend(MODEL).base_url == "http://127.0.0.1:11434"


def test_memory_probe_reads_api_ps_through_the_sync_transport() -> None:
    fake = FakeOllama({"GET /api/ps": (200, load("ps_spilled.json"))})
    probe = make_backend(fake).memory_probe()
    try:
        sample = probe.sample()
    finally:
        probe.close()
    assert isinstance(probe, OllamaPsProbe)
    assert fake.paths() == ["GET /api/ps"]
    assert str(fake.requests[0].url) == f"{URL}/api/ps"
    assert sample.used_bytes == 7549747200
    assert sample.detail["spilled"] is True


# -- live --------------------------------------------------------------------------------------


def _live_ollama() -> tuple[str, list[str]] | None:
    """The base URL and model names of an Ollama answering within 1 s, or None."""
    url = normalise_ollama_host(os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434")
    try:
        with httpx.Client(base_url=url, timeout=1.0) as client:
            version = client.get("/api/version")
            tags = client.get("/api/tags")
            if not (version.is_success and tags.is_success):
                return None
            names = [m["name"] for m in tags.json().get("models") or []]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return url, names


@pytest.mark.ollama
def test_live_ollama_start_health_and_geometry() -> None:
    live = _live_ollama()
    if live is None:
        pytest.skip("no Ollama server answered at $OLLAMA_HOST (default 127.0.0.1:11434) in 1 s")
    url, names = live
    if not names:
        pytest.skip(f"the Ollama server at {url} has no model pulled")
    model = MODEL if MODEL in names else names[0]

    async def scenario() -> tuple[bool, Any]:
        async with OllamaBackend(model, base_url=url) as backend:
            return await backend.health(), await backend.model_geometry()

    healthy, geom = run(scenario())
    assert healthy
    assert geom is not None
    assert geom.n_layers > 0
    assert 0 < geom.n_kv_heads <= geom.n_heads
