"""The harness's pytest plugin (entry point `pytest11`): markers for now."""

from __future__ import annotations

import pytest

MARKERS = {
    "integration": "runs a real embedded llama.cpp server",
    "slow": "takes more than a minute on a 2-core machine",
    "ollama": "needs a live Ollama server at $OLLAMA_HOST",
    "gpu": "needs an NVIDIA GPU (NVML)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
