"""Shared fixtures of the harness's own tests: real embedded llama.cpp servers, started once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.backends.embedded import EmbeddedServer
from harness.backends.server import ServerSettings


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[EmbeddedServer]:
    """tiny-gemma3 (random weights, real tokenizer) on 127.0.0.1, 16K context, one slot."""
    with EmbeddedServer(ServerSettings(model="tiny-gemma3", n_ctx=16384)) as server:
        yield server


@pytest.fixture(scope="session")
def gemma_server() -> Iterator[EmbeddedServer]:
    """The packaged Gemma 3 270M on 127.0.0.1, 8K context, one slot."""
    with EmbeddedServer(ServerSettings(model="gemma3-270m", n_ctx=8192)) as server:
        yield server
