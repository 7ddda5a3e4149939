"""The OpenAI-compatible backend on a mock transport: usage, request bodies, error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from harness.backends.base import Backend, ChatRequest, ChatResult
from harness.backends.openai import OpenAIBackend, llama_connections
from harness.errors import (
    BackendError,
    BackendUnreachable,
    ConfigError,
    ContextOverflow,
    ModelNotFound,
    RequestTimeout,
    TransientServerError,
)

URL = "http://127.0.0.1:9"
MESSAGES = [{"role": "system", "content": "rubric"}, {"role": "user", "content": "candidate"}]


def reply(usage: dict[str, Any], timings: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": '{"score": 5}'}}],
        "usage": usage,
    }
    if timings is not None:
        body["timings"] = timings
    return body


def make_backend(
    chat: Callable[[httpx.Request], httpx.Response],
    *,
    llama: bool = True,
    models: tuple[str, ...] = ("m",),
    **kwargs: Any,
) -> tuple[OpenAIBackend, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": m} for m in models]})
        if request.url.path == "/props":
            if not llama:
                return httpx.Response(404, json={"error": "not found"})
            return httpx.Response(
                200,
                json={
                    "total_slots": 2,
                    "build_info": "b1",
                    "default_generation_settings": {"n_ctx": 4096},
                },
            )
        return chat(request)

    return OpenAIBackend(URL, transport=httpx.MockTransport(handler), **kwargs), seen


def run_chat(backend: OpenAIBackend, request: ChatRequest | None = None) -> ChatResult:
    async def go() -> ChatResult:
        async with backend:
            return await backend.chat(request or ChatRequest(MESSAGES, max_tokens=8))

    return asyncio.run(go())


def test_cached_tokens_from_usage_details() -> None:
    backend, _ = make_backend(
        lambda r: httpx.Response(
            200,
            json=reply(
                {
                    "prompt_tokens": 100,
                    "completion_tokens": 4,
                    "prompt_tokens_details": {"cached_tokens": 90},
                },
                {"cache_n": 90, "prompt_ms": 12.5, "predicted_ms": 30.0},
            ),
        )
    )
    result = run_chat(backend)
    assert (result.usage.prompt_tokens, result.usage.cached_tokens) == (100, 90)
    assert result.usage.cached_source == "server"
    assert result.usage.uncached_tokens == 10
    assert (result.timings.prompt_ms, result.timings.decode_ms) == (12.5, 30.0)
    assert backend.info.server == "llama.cpp b1" and backend.info.n_slots == 2


def test_cached_tokens_from_llama_timings_then_unknown() -> None:
    backend, _ = make_backend(
        lambda r: httpx.Response(200, json=reply({"prompt_tokens": 50}, {"cache_n": 40}))
    )
    usage = run_chat(backend).usage
    assert (usage.cached_tokens, usage.cached_source) == (40, "llama.cpp timings")
    backend, _ = make_backend(lambda r: httpx.Response(200, json=reply({"prompt_tokens": 50})))
    usage = run_chat(backend).usage
    assert (usage.cached_tokens, usage.cached_source) == (None, "unknown")


def test_request_body_uses_llama_extensions_only_on_llama() -> None:
    ok = lambda r: httpx.Response(200, json=reply({"prompt_tokens": 5}))  # noqa: E731
    req = ChatRequest(
        MESSAGES, max_tokens=8, temperature=0.0, seed=3, grammar='root ::= "x"',
        output_schema={"type": "object"}, slot=1, cache_prompt=False, extra={"top_k": 1},
    )  # fmt: skip
    backend, seen = make_backend(ok)
    run_chat(backend, req)
    body = json.loads(seen[-1].content)
    assert body["grammar"] == 'root ::= "x"' and "response_format" not in body
    assert (body["id_slot"], body["cache_prompt"], body["top_k"], body["seed"]) == (1, False, 1, 3)
    backend, seen = make_backend(ok, llama=False)
    run_chat(backend, req)
    body = json.loads(seen[-1].content)
    assert "grammar" not in body and "id_slot" not in body and "cache_prompt" not in body
    assert body["response_format"]["type"] == "json_schema"


def test_api_key_comes_from_the_environment_and_stays_out_of_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    backend, seen = make_backend(
        lambda r: httpx.Response(401, json={"error": {"message": "bad key"}}), api_key_env="MY_KEY"
    )
    with pytest.raises(BackendError) as info:
        run_chat(backend)
    assert seen[-1].headers["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in str(info.value) and "MY_KEY" not in repr(backend.info)


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (503, {"error": {"message": "Loading model"}}, TransientServerError),
        (500, {"error": {"message": "boom"}}, TransientServerError),
        (429, {"error": {"message": "slow down"}}, TransientServerError),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "request (5010 tokens) exceeds the available context size "
                    "(2048 tokens)",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 5010,
                    "n_ctx": 2048,
                }
            },
            ContextOverflow,
        ),
        (404, {"error": {"message": "model 'x' not found"}}, ModelNotFound),
        (422, {"error": {"message": "bad field"}}, BackendError),
    ],
)
def test_http_errors_map_into_the_tree(status: int, body: dict[str, Any], error: type) -> None:
    backend, _ = make_backend(lambda r: httpx.Response(status, json=body))
    with pytest.raises(error) as info:
        run_chat(backend)
    assert type(info.value) is error
    assert URL in str(info.value)
    if error is ContextOverflow:
        assert (info.value.prompt_tokens, info.value.n_ctx) == (5010, 2048)  # type: ignore[attr-defined]
    assert info.value.retryable is (error is TransientServerError)


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (httpx.ConnectError("refused"), BackendUnreachable),
        (httpx.ReadTimeout("slow"), RequestTimeout),
        (httpx.RemoteProtocolError("peer closed"), TransientServerError),
        (httpx.ReadError("reset"), TransientServerError),
    ],
)
def test_transport_errors_map_into_the_tree(exc: Exception, error: type) -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise exc

    backend, _ = make_backend(boom)
    with pytest.raises(error, match=r"127\.0\.0\.1:9"):
        run_chat(backend)


def test_a_body_that_is_not_json_is_transient() -> None:
    backend, _ = make_backend(lambda r: httpx.Response(200, content=b'{"choices": [{"mess'))
    with pytest.raises(TransientServerError, match="not JSON"):
        run_chat(backend)


def test_unknown_model_is_refused_at_start_with_the_served_list() -> None:
    backend, _ = make_backend(
        lambda r: httpx.Response(200), models=("gemma", "other"), model="nope"
    )
    with pytest.raises(ModelNotFound, match=r"'nope' is not served .* gemma, other"):
        run_chat(backend)


def test_connections_to_a_llama_server_are_capped_at_its_slots_plus_one() -> None:
    """llama-server has at least slots + 2 HTTP threads; the client keeps to slots + 1."""
    ok = lambda r: httpx.Response(200, json=reply({"prompt_tokens": 3}))  # noqa: E731

    async def connections(backend: OpenAIBackend) -> object:
        async with backend:
            await backend.chat(ChatRequest(MESSAGES, max_tokens=8))
            return backend.info.extra.get("connections")

    assert asyncio.run(connections(make_backend(ok)[0])) == 3  # /props: total_slots 2
    assert asyncio.run(connections(make_backend(ok, max_connections=2)[0])) == 2  # asked fewer
    assert asyncio.run(connections(make_backend(ok, llama=False)[0])) is None  # not llama.cpp
    assert llama_connections(1) == 2 and llama_connections(None) == 2


def test_unreachable_server_message_names_the_url() -> None:
    backend = OpenAIBackend("http://127.0.0.1:1")  # nothing listens on port 1

    async def go() -> None:
        async with backend:
            pass

    with pytest.raises(BackendUnreachable, match=r"http://127\.0\.0\.1:1.*is the server running"):
        asyncio.run(go())


def test_registry_creates_backends_by_name() -> None:
    assert {"embedded", "openai", "ollama"} <= set(Backend.names())
    assert isinstance(Backend.create("openai", base_url="http://127.0.0.1:1/v1"), OpenAIBackend)
    with pytest.raises(ConfigError, match="unknown backend 'vllm'; choose one of"):
        Backend.create("vllm")
