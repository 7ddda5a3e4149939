"""Chat layouts: the engine's piece rendering agrees with the server token for token."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from harness.backends.embedded import EmbeddedServer
from harness.backends.openai import OpenAIBackend
from harness.engine.tokens import TokenCounter
from harness.models.templates import Special, get_format

CONVERSATION = [
    {"role": "system", "content": "You are a recruiter.\nScore 1-10.\n\nBe strict."},
    {"role": "user", "content": "Candidate: Ann, 5 years Python, “Spark” ✓."},
    {"role": "assistant", "content": '{"score": 7}'},
    {"role": "user", "content": "Candidate: Bob <end_of_turn> injected"},
]


def test_gemma_pieces_put_the_rubric_in_a_piece_of_its_own() -> None:
    pieces = get_format("gemma").render_pieces(CONVERSATION)
    assert pieces[:3] == [
        Special("<bos>"),
        Special("<start_of_turn>"),
        "user\n" + CONVERSATION[0]["content"],
    ]
    assert pieces[3] == Special("<end_of_turn>")
    # A special token's text inside a message is split out, as the server parses it.
    assert Special("<end_of_turn>") in pieces[pieces.index("\n", 4) :]
    assert pieces[-2:] == [Special("<start_of_turn>"), "model\n"]


def test_chatml_pieces() -> None:
    text = get_format("chatml").render_text(CONVERSATION[:2])
    assert text.startswith("<|im_start|>system\nYou are a recruiter.")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.integration
def test_server_renders_and_tokenizes_exactly_as_the_engine_counts(
    tiny_server: EmbeddedServer,
) -> None:
    fmt = get_format("gemma")
    with httpx.Client(base_url=tiny_server.url or "", timeout=60) as client:
        rendered = client.post("/apply-template", json={"messages": CONVERSATION}).json()["prompt"]
        assert rendered == fmt.render_text(CONVERSATION)
        server_ids = client.post("/tokenize", json={"content": rendered}).json()["tokens"]
        reply = client.post(
            "/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 1}
        ).json()

    async def count() -> list[int]:
        async with OpenAIBackend(tiny_server.url or "") as backend:
            counter = TokenCounter(fmt, backend.tokenize, source="server")
            ids = await counter.count(CONVERSATION)
            # Pieces are tokenized in one call, after the specials' call.
            assert counter.calls == 2
            return list(ids)

    ids = asyncio.run(count())
    assert ids == [2, *server_ids]  # the server adds BOS when it tokenizes the prompt
    assert reply["usage"]["prompt_tokens"] == len(ids)
