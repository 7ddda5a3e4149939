"""The flags comparison passes only when it recommended something: a strategy ahead by more
than the rounds' spread. A PASS with `recommendation: None` told the user nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from harness.scenarios import evaluate, load_scenario

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def flags() -> Any:
    spec = importlib.util.spec_from_file_location(
        "suite_flags", ROOT / "suites" / "performance" / "test_flags.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(strategy: str, flags: str, uncached: float, low: float, high: float) -> dict[str, Any]:
    return {
        "strategy": strategy, "server_flags": flags, "errors": 0,
        "uncached_tokens_per_request": uncached, "uncached_tokens_per_request_range": [low, high],
        "throughput_rps": 1.0, "throughput_rps_range": [0.9, 1.1],
    }  # fmt: skip


def gate(figures: dict[str, Any]) -> list[str]:
    scenario = load_scenario(ROOT / "scenarios" / "flags.yaml")
    return [r.message() for r in evaluate(scenario.criteria_for("embedded"), figures)
            if not r.passed]  # fmt: skip


def test_no_difference_beyond_the_spread_fails_the_gate_saying_why(flags: Any) -> None:
    rows = [
        row("stateless", "ollama", 120, 100, 140),
        row("conversation", "ollama", 115, 95, 150),
        row("stateless", "harness", 120, 110, 130),
        row("conversation", "harness", 118, 100, 130),
    ]
    figures = flags.gated(flags.recommend(rows))
    assert figures["recommendation_made"] == 0
    (failed,) = gate(figures)
    assert failed.startswith("recommendation_made = 0, needs >= 1")
    assert "within the spread of the rounds" in failed and "options.rounds" in failed


def test_a_difference_beyond_the_spread_is_a_recommendation_and_passes(flags: Any) -> None:
    rows = [
        row("stateless", "ollama", 120, 118, 124),
        row("conversation", "ollama", 160, 150, 170),
        row("stateless", "harness", 121, 119, 123),
        row("conversation", "harness", 150, 148, 155),
    ]
    figures = flags.gated(flags.recommend(rows))
    assert figures["recommended_strategy"] == "stateless"
    assert figures["recommendation_made"] == 1 and gate(figures) == []
