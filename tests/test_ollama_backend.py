"""OllamaBackend on replies recorded from real Ollama servers (tests/data/ollama/recorded/).

Every body comes from a public recording; `SOURCES.md` beside them names each one's source
(repository, commit, line, or issue). Bodies that no public recording has were derived from
Ollama's source and are named `derived_*`; one body whose repository the index does not name is
`unattributed_*`. Where a test changes a field of a recorded body (a version, a count), it says
so beside the change. Every test but the last runs on `httpx.MockTransport`: the official
`ollama` client's transport does the HTTP, the mock answers with recorded bodies and records what
was sent. The last test talks to a real Ollama server when one answers at $OLLAMA_HOST.
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
from harness.backends.ollama import OllamaBackend, parse_version, prompt_count_complete
from harness.errors import (
    BackendError,
    BackendUnreachable,
    ConfigError,
    ContextOverflow,
    LoadFailure,
    ModelNotFound,
    NoAPI,
    OutOfMemory,
    ProtocolError,
    RequestTimeout,
    TransientServerError,
)
from harness.memory import OllamaPsProbe, normalise_ollama_host
from harness.models.geometry import geometry_from_metadata
from harness.models.kv import UnknownGeometry, kv_theory

DATA = Path(__file__).parent / "data" / "ollama" / "recorded"
MODEL = "gemma3:12b"
URL = "http://ollama.test:11434"
KIB = 1024
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["score"],
}
MESSAGES = [
    {"role": "system", "content": "Score the candidate from 1 to 10."},
    {"role": "user", "content": "Ten years of Spark and Kafka."},
]

T = TypeVar("T")


def load(name: str) -> Any:
    text = (DATA / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else text


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


Reply = tuple[int, Any] | Exception
Route = Reply | list[Reply] | Callable[[httpx.Request], httpx.Response]


class FakeOllama:
    """A MockTransport handler: recorded replies by `METHOD /path`, every request recorded.

    A route is `(status, body)` (a dict is sent as JSON, a str as plain text), an exception to
    raise (a transport failure), a list of those answered in turn (the last one repeats), or a
    function of the request. Unknown paths get Go's plain `404 page not found`, as Ollama's do.
    """

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = {
            "GET /api/version": (200, load("version_0.11.6.json")),
            "POST /api/show": (200, load("show_gemma3_1b.json")),
            **(routes or {}),
        }
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = f"{request.method} {request.url.path}"
        route = self.routes.get(key)
        if route is None:
            return httpx.Response(404, text=load("error_404_plain.txt"))
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
    options.setdefault("num_ctx", 8192)
    return OllamaBackend(
        MODEL, base_url=URL, transport=transport, sync_transport=transport, **options
    )


async def started(fake: FakeOllama, **options: Any) -> OllamaBackend:
    backend = make_backend(fake, **options)
    await backend.start()
    return backend


def chat_with(fake: FakeOllama, **options: Any) -> Any:
    async def scenario() -> Any:
        backend = await started(fake, **options)
        return await backend.chat(ChatRequest(MESSAGES, max_tokens=8))

    return run(scenario())


# -- lifecycle and requests ---------------------------------------------------------------------


def test_backend_is_registered_as_ollama() -> None:
    backend = Backend.create("ollama", model=MODEL, base_url=URL)
    assert isinstance(backend, OllamaBackend)
    assert backend.info.chat_format is not None  # gemma models get the gemma layout


def test_start_reads_version_and_show_and_knows_what_prompt_eval_count_means() -> None:
    fake = FakeOllama()
    backend = run(started(fake))
    assert fake.paths() == ["GET /api/version", "POST /api/show"]
    assert backend.info.server == "ollama 0.11.6"
    assert backend.version == (0, 11, 6)
    assert backend.info.extra["prompt_eval_count_counts_cached"] is True


@pytest.mark.parametrize(
    ("text", "version", "complete"),
    [
        ("0.11.6", (0, 11, 6), True),
        ("0.30.0", (0, 30, 0), False),  # new tokens only (ollama#16414)
        ("0.30.1", (0, 30, 1), True),
        ("0.33.0-rc2", (0, 33, 0), True),
        ("0.0.0", (0, 0, 0), True),  # ollama.com's /api/version (OBL demos/ollama_api_get.md)
        ("?", None, False),
    ],
)
def test_version_decides_whether_the_prompt_count_is_complete(
    text: str, version: tuple[int, int, int] | None, complete: bool
) -> None:
    assert parse_version(text) == version
    assert prompt_count_complete(version) is complete


def test_chat_sends_truncate_false_options_keep_alive_and_format() -> None:
    fake = FakeOllama({"POST /api/chat": (200, load("chat_qwen2.5vl_3b_nonstream_turn1.json"))})

    async def scenario() -> None:
        backend = await started(fake, num_ctx=16384)
        await backend.chat(
            ChatRequest(MESSAGES, max_tokens=16, temperature=0.0, seed=7, output_schema=SCHEMA)
        )

    run(scenario())
    (body,) = fake.bodies("POST /api/chat")
    assert body["truncate"] is False  # else Ollama cuts a long prompt and answers 200
    assert body["stream"] is False
    assert body["model"] == MODEL
    assert body["messages"] == MESSAGES
    assert body["options"] == {"num_ctx": 16384, "num_predict": 16, "temperature": 0.0, "seed": 7}
    assert body["format"] == SCHEMA
    assert body["keep_alive"] == "30m"


def test_a_recorded_reply_without_the_cached_field_leaves_cached_unknown() -> None:
    recorded = load("chat_qwen2.5vl_3b_nonstream_turn1.json")
    result = chat_with(FakeOllama({"POST /api/chat": (200, recorded)}))
    assert result.content == "Understood."
    assert result.usage.prompt_tokens == recorded["prompt_eval_count"] == 44
    assert result.usage.completion_tokens == recorded["eval_count"]
    assert result.usage.cached_tokens is None
    assert result.usage.cached_source == "unknown"  # never estimated from durations
    assert result.usage.prompt_tokens_complete is True
    assert result.timings.prompt_ms == pytest.approx(recorded["prompt_eval_duration"] / 1e6)
    assert result.timings.decode_ms == pytest.approx(recorded["eval_duration"] / 1e6)
    assert result.timings.load_ms == pytest.approx(recorded["load_duration"] / 1e6)
    assert result.finish_reason == "stop"
    assert result.raw == recorded


@pytest.mark.parametrize(
    "fixture",
    [
        "unattributed_chat_qwen2.5_7b_prompt_eval_cached_count_v0.34.0.json",
        "derived_chat_metrics_prompt_eval_cached_count.json",
    ],
)
def test_prompt_eval_cached_count_is_read_from_the_body_as_server_figures(fixture: str) -> None:
    body = load(fixture)
    fake = FakeOllama(
        {
            "GET /api/version": (200, {"version": "0.34.0"}),  # as the 0.34.0 recording says
            "POST /api/chat": (200, body),
        }
    )
    result = chat_with(fake)
    assert result.usage.cached_tokens == body["prompt_eval_cached_count"]
    assert result.usage.cached_source == "server"
    assert result.usage.prompt_tokens == body["prompt_eval_count"]  # all tokens after 0.30.0
    assert result.usage.prompt_tokens_complete is True


def test_on_0_30_0_the_count_is_new_tokens_only_and_cannot_reveal_a_cut() -> None:
    recorded = load("chat_qwen2.5vl_3b_nonstream_turn2.json")
    fake = FakeOllama(
        {
            "GET /api/version": (200, {"version": "0.30.0"}),  # replayed as 0.30.0
            "POST /api/chat": (200, recorded),
        }
    )
    result = chat_with(fake)
    assert result.usage.prompt_tokens_complete is False
    assert result.usage.cached_tokens is None


def test_a_streamed_final_chunk_without_content_parses() -> None:
    recorded = load("chat_gemma3_1b_stream_final_warm_cached_prefix.json")
    result = chat_with(FakeOllama({"POST /api/chat": (200, recorded)}))
    assert result.content == ""
    assert result.usage.prompt_tokens == recorded["prompt_eval_count"]


def test_chat_before_start_is_refused() -> None:
    with pytest.raises(BackendError, match="not started"):
        run(make_backend(FakeOllama()).chat(ChatRequest(MESSAGES)))


def test_without_num_ctx_the_loaded_context_is_read_from_api_ps() -> None:
    ps = load("ps_spilled_mistral_7b_v0.11.6.json")
    ps["models"][0]["name"] = ps["models"][0]["model"] = MODEL  # the recorded entry, renamed
    fake = FakeOllama({"POST /api/generate": (200, {"done": True}), "GET /api/ps": (200, ps)})
    backend = run(started(fake, num_ctx=None))
    assert fake.paths()[-2:] == ["POST /api/generate", "GET /api/ps"]
    assert backend.info.n_ctx_per_slot == 16384
    assert backend.info.extra["context_source"] == "ollama:/api/ps context_length"


def test_a_server_whose_api_ps_has_no_context_length_leaves_the_context_unknown() -> None:
    ps = load("ps_all_vram_gemma3_no_context_length.json")
    fake = FakeOllama({"POST /api/generate": (200, {"done": True}), "GET /api/ps": (200, ps)})
    backend = OllamaBackend(
        "gemma3", base_url=URL, transport=httpx.MockTransport(fake), num_ctx=None
    )
    run(backend.start())
    assert backend.info.n_ctx_per_slot is None
    assert "unknown" in backend.info.extra["context_source"]


# -- geometry ------------------------------------------------------------------------------------


def test_model_geometry_from_a_recorded_gemma3_show() -> None:
    geom = run(run_geometry(FakeOllama()))
    # gemma3:1b (OBL demos/show.md): 26 layers, 1 KV head, key/value 256, window 512.
    assert (geom.architecture, geom.n_layers, geom.n_kv_heads) == ("gemma3", 26, 1)
    assert (geom.key_length, geom.value_length, geom.sliding_window) == (256, 256, 512)
    assert geom.global_layers == (5, 11, 17, 23)
    theory = kv_theory(geom)
    assert theory.bytes_per_token_growing == 4 * 1 * (256 + 256) * 2
    assert geom.source == f"ollama:/api/show {MODEL}"


async def run_geometry(fake: FakeOllama) -> Any:
    backend = await started(fake)
    return await backend.model_geometry()


def test_a_null_per_layer_array_is_an_error_naming_the_key() -> None:
    show = load("show_gemma3_1b.json")
    show["model_info"]["gemma3.attention.head_count_kv"] = None  # as /api/show sends arrays
    with pytest.raises(ConfigError, match=r"'gemma3\.attention\.head_count_kv' came as null"):
        run(run_geometry(FakeOllama({"POST /api/show": (200, show)})))


def test_the_recorded_null_tokenizer_arrays_do_not_matter() -> None:
    info = load("show_gemma3_1b.json")["model_info"]
    assert info["tokenizer.ggml.tokens"] is None
    assert geometry_from_metadata(info, source="t").n_layers == 26


@pytest.mark.parametrize("arch", ["gemma3n", "gemma4", "deepseek2"])
def test_architectures_the_theory_does_not_model_are_unknown(arch: str) -> None:
    info = {
        k.replace("gemma3.", f"{arch}."): v
        for k, v in load("show_gemma3_1b.json")["model_info"].items()
    }
    info["general.architecture"] = arch
    geom = geometry_from_metadata(info, source="t")
    with pytest.raises(UnknownGeometry, match=f"does not model the '{arch}'"):
        kv_theory(geom)


def test_model_geometry_before_start_is_refused() -> None:
    with pytest.raises(BackendError, match="not started"):
        run(make_backend(FakeOllama()).model_geometry())


# -- errors ------------------------------------------------------------------------------------


def test_a_plain_404_page_says_no_ollama_api_at_the_url_not_pull() -> None:
    fake = FakeOllama({"GET /api/version": (404, load("error_404_plain.txt"))})
    backend = OllamaBackend(MODEL, base_url=URL + "/v1", transport=httpx.MockTransport(fake))
    with pytest.raises(NoAPI) as info:
        run(backend.start())
    message = str(info.value)
    assert f"no Ollama API at {URL}/v1" in message
    assert "wrong path" in message
    assert "ollama pull" not in message


@pytest.mark.parametrize(
    "fixture",
    [
        "derived_error_404_model_not_found.json",
        "derived_error_404_model_not_found_try_pulling.json",
    ],
)
def test_missing_model_raises_model_not_found_with_the_pull_command(fixture: str) -> None:
    fake = FakeOllama({"POST /api/show": (404, load(fixture))})
    with pytest.raises(ModelNotFound) as info:
        run(make_backend(fake).start())
    assert f"ollama pull {MODEL}" in str(info.value)
    assert not info.value.retryable


@pytest.mark.parametrize(
    ("body", "prompt_tokens", "n_ctx"),
    [
        (load("derived_error_400_prompt_too_long.json"), None, 8192),
        (load("derived_error_400_input_length_exceeds.json"), None, 8192),
        # llama-server's own wording, which Ollama relays when truncate is false.
        (
            {
                "error": "request (9000 tokens) exceeds the available context size (8192 tokens), "
                "try increasing it"
            },
            9000,
            8192,
        ),
    ],
)
def test_context_length_errors_are_context_overflow(
    body: dict[str, Any], prompt_tokens: int | None, n_ctx: int
) -> None:
    with pytest.raises(ContextOverflow) as info:
        chat_with(FakeOllama({"POST /api/chat": (400, body)}))
    assert info.value.prompt_tokens == prompt_tokens
    assert info.value.n_ctx == n_ctx
    assert "num_ctx 8192" in str(info.value)


def test_connection_refused_raises_backend_unreachable_naming_the_url() -> None:
    fake = FakeOllama({"GET /api/version": httpx.ConnectError("[Errno 111] Connection refused")})
    with pytest.raises(BackendUnreachable) as info:
        run(make_backend(fake).start())
    assert URL in str(info.value)
    assert info.value.retryable


def test_read_timeout_raises_request_timeout() -> None:
    with pytest.raises(RequestTimeout) as info:
        chat_with(FakeOllama({"POST /api/chat": httpx.ReadTimeout("timed out")}))
    assert info.value.retryable


def test_server_out_of_memory_raises_out_of_memory() -> None:
    body = load("error_500_requires_more_system_memory.json")
    with pytest.raises(OutOfMemory) as info:
        chat_with(FakeOllama({"POST /api/chat": (500, body)}))
    assert isinstance(info.value, LoadFailure)
    assert not info.value.retryable
    assert body["error"] in str(info.value)


def test_server_busy_raises_retryable_transient_error() -> None:
    with pytest.raises(TransientServerError) as info:
        chat_with(FakeOllama({"POST /api/chat": (503, load("derived_error_503_server_busy.json"))}))
    assert info.value.status_code == 503
    assert info.value.retryable


def test_non_json_version_raises_protocol_error() -> None:
    fake = FakeOllama({"GET /api/version": (200, "<html>It works!</html>")})
    with pytest.raises(ProtocolError):
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
    backend = OllamaBackend(MODEL, transport=httpx.MockTransport(fake), num_ctx=8192)
    run(backend.start())
    assert backend.base_url == "http://0.0.0.0:11434"
    assert {r.url.port for r in fake.requests} == {11434}


def test_default_host_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert OllamaBackend(MODEL).base_url == "http://127.0.0.1:11434"


def test_memory_probe_reads_api_ps_through_the_sync_transport() -> None:
    fake = FakeOllama({"GET /api/ps": (200, load("ps_spilled_mistral_7b_v0.11.6.json"))})
    probe = OllamaBackend(
        "mistral:7b", base_url=URL, sync_transport=httpx.MockTransport(fake)
    ).memory_probe()
    try:
        sample = probe.sample()
    finally:
        probe.close()
    assert isinstance(probe, OllamaPsProbe)
    assert fake.paths() == ["GET /api/ps"]
    assert str(fake.requests[0].url) == f"{URL}/api/ps"
    assert sample.used_bytes == 8329906176  # `size`: the whole footprint, spilled or not
    assert sample.detail["size_vram"] == 7206864896
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
