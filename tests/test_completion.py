"""Every backend's reply as an OpenAI `chat.completion` body (`harness.backends.completion`).

Ollama's side is checked on bodies recorded from real Ollama servers
(tests/data/ollama/recorded/, SOURCES.md names each source), read by `OllamaBackend` through
the official client's transport, and against Ollama's own OpenAI layer
(`openai/openai.go` `ToChatCompletion`: `created` from `created_at`, `finish_reason` from
`done_reason`, `reasoning` from `thinking`, usage from the eval counts). The llama.cpp side runs
on the tiny model's real server, both request paths. The official `openai` client parses every
body (`ChatCompletion.model_validate`), as a user's code reading an output file would.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from openai.types.chat import ChatCompletion
from test_ollama_backend import MESSAGES, FakeOllama, chat_with, load

from harness.backends.base import ChatRequest, ChatResult, Timings, Usage
from harness.backends.completion import chat_completion, unix_seconds
from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.records import RequestRecord
from harness.testing import InProcessDouble

OLLAMA_CHATS = [
    "chat_qwen2.5vl_3b_nonstream_turn1.json",
    "chat_granite3.3_8b_nonstream_turn1.json",
    "chat_gemma3_1b_reassembled_nonstream_cold_load.json",
    "chat_gemma3_1b_stream_final_warm.json",
    "unattributed_chat_qwen2.5_7b_prompt_eval_cached_count_v0.34.0.json",
]


def parsed(body: dict[str, Any]) -> ChatCompletion:
    """The body as the official client's type reads it (it fails on a wrong shape)."""
    return ChatCompletion.model_validate(body)


@pytest.mark.parametrize("name", OLLAMA_CHATS)
def test_a_recorded_ollama_reply_maps_as_ollamas_own_openai_layer_maps_it(name: str) -> None:
    recorded = load(name)
    result = chat_with(FakeOllama({"POST /api/chat": (200, recorded)}))
    body = chat_completion(result, model="gemma3:12b")
    reply = parsed(body)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == recorded["model"]  # the reply's own, not the option's
    stamp = datetime.fromisoformat(recorded["created_at"].replace("Z", "+00:00"))
    assert reply.created == int(stamp.timestamp())
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == recorded["message"]["content"]
    assert choice.finish_reason == recorded["done_reason"] == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == recorded["prompt_eval_count"]
    assert reply.usage.completion_tokens == recorded["eval_count"]
    assert reply.usage.total_tokens == recorded["prompt_eval_count"] + recorded["eval_count"]
    if "prompt_eval_cached_count" in recorded:  # reported: given, even when 0
        assert body["usage"]["prompt_tokens_details"] == {
            "cached_tokens": recorded["prompt_eval_cached_count"]
        }
    else:  # not reported: absent, never a 0 that was not measured
        assert "prompt_tokens_details" not in body["usage"]


def test_ollama_thinking_becomes_the_messages_reasoning_as_in_ollamas_openai_layer() -> None:
    recorded = load("chat_granite3.3_8b_nonstream_turn1.json")
    recorded["message"]["thinking"] = "First, the secret word."  # set here; not recorded
    result = chat_with(FakeOllama({"POST /api/chat": (200, recorded)}))
    assert chat_completion(result)["choices"][0]["message"]["reasoning"] == (
        "First, the secret word."
    )


def test_go_timestamps_with_nanoseconds_and_offsets_read_as_unix_seconds() -> None:
    ns = "2025-08-16T21:50:45.146929735Z"  # Go writes 9 fraction digits (OBL demos)
    assert unix_seconds(ns) == int(datetime(2025, 8, 16, 21, 50, 45, tzinfo=UTC).timestamp())
    assert unix_seconds("2025-08-16T23:50:45+02:00") == unix_seconds("2025-08-16T21:50:45Z")
    assert unix_seconds("yesterday") is None and unix_seconds(None) is None


def test_an_openai_shaped_reply_keeps_its_own_id_created_and_model() -> None:
    recorded = load("v1_chat_completions_qwen3_0.6b_reasoning_reassembled.json")
    result = OpenAIBackend.parse_reply(recorded, 12.0, "http://x/v1/chat/completions")
    body = chat_completion(result, model="other")
    assert (body["id"], body["created"], body["model"]) == (
        "chatcmpl-150",
        1776298304,
        "qwen3:0.6b",
    )
    assert body["choices"][0]["message"]["content"] == recorded["choices"][0]["message"]["content"]
    assert "prompt_tokens_details" not in body["usage"]  # v1 reply without them: not reported
    cached = {
        **recorded,
        "usage": {**recorded["usage"], **load("derived_v1_usage_cached_tokens.json")["usage"]},
    }
    body = chat_completion(OpenAIBackend.parse_reply(cached, 1.0, "u"))
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
    parsed(body)


def test_reasoning_token_counts_are_carried_when_the_server_gave_them() -> None:
    raw = load("v1_chat_completions_gemma3_4b.json")
    raw["usage"]["completion_tokens_details"] = {"reasoning_tokens": 5}  # set here
    body = chat_completion(OpenAIBackend.parse_reply(raw, 1.0, "u"))
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}


def test_a_reply_that_names_nothing_gets_the_harnesss_id_time_and_model() -> None:
    result = ChatResult("hi", "length", Usage(3, 1, None, "unknown"), Timings(1.0), {})
    body = chat_completion(result, model="served")
    reply = parsed(body)
    assert reply.model == "served" and reply.choices[0].finish_reason == "length"
    assert body["id"] != chat_completion(result, model="served")["id"]  # made per reply


@pytest.mark.integration
@pytest.mark.parametrize("path", ["chat", "text", "tokens"])
def test_llama_cpp_replies_on_every_request_path_map_and_keep_the_servers_own(
    tiny_server: EmbeddedServer, path: str
) -> None:
    """On the tiny model's real server: the body is a chat.completion the official client
    reads; the server's reply is kept as it came (less the echoed prompt), never as the body."""

    async def one() -> tuple[ChatResult, str]:
        assert tiny_server.url is not None
        from harness.models.templates import get_format

        backend = OpenAIBackend(
            tiny_server.url, api_key_env=None, request_path=path, chat_format=get_format("gemma")
        )
        async with backend:
            result = await backend.chat(ChatRequest(MESSAGES, max_tokens=3, temperature=0.0))
            return result, backend.info.model

    result, model = asyncio.run(one())
    body = chat_completion(result, model=model)
    reply = parsed(body)
    assert reply.choices[0].message.content == result.content
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == result.usage.cached_tokens
    raw = dict(result.raw)
    assert "prompt" not in raw and "generation_settings" not in raw
    if str(raw.get("model", "")).endswith(".gguf"):  # llama.cpp names the file it loaded
        assert body["model"] == model  # the served name (here /v1/models says the path too)
    if path == "chat":
        assert raw["id"] == body["id"] and raw["object"] == "chat.completion"
    else:  # /completion: the server's own reply, which is no chat.completion
        assert "choices" not in raw and raw["content"] == result.content and "timings" in raw
    # In a results line: the body as response.body, the server's reply beside it.
    rec = RequestRecord("a", "ok", content=result.content, raw=result.raw, completion=body)
    line = rec.to_batch_line(1)
    assert line["response"]["body"] == body and line["harness"]["server_reply"] == raw


def test_the_engine_records_the_mapped_body(tmp_path: Any) -> None:
    from harness.engine import JobSpec, read_results, run_job
    from harness.workload import WorkItem

    items = [WorkItem(f"r{i}", ({"role": "user", "content": f"hi {i}"},)) for i in range(2)]
    results = tmp_path / "r.jsonl"
    asyncio.run(run_job(InProcessDouble(), items, JobSpec(results_path=results, progress=False)))
    for line in read_results(results):
        body = line["response"]["body"]
        reply = parsed(body)
        assert (
            reply.model == "double"
            and reply.choices[0].message.content == line["harness"]["content"]
        )
        assert (
            line["harness"]["server_reply"]["choices"][0]["message"]["content"]
            == (line["harness"]["content"])
        )
