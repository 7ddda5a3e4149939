"""The one configuration path (harness.run.resolve): precedence, sources, and values measured on
another backend or model never applied."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from harness.backends.embedded import EmbeddedBackend
from harness.config import load_profile, write_back
from harness.errors import ConfigError
from harness.run.factory import open_backend
from harness.run.resolve import resolve_run_config
from harness.run.settings import Value
from harness.scenarios import Scenario, load_scenario

# What the performance phase writes with --harness-write-config (suites/performance).
PERF = {"REQUEST_PATH": "tokens", "parallel": 2, "CONCURRENCY": 2, "STRATEGY": "stateless",
        "TRIM_INTERVAL": 25}  # fmt: skip
PROV = {"report": "reports/performance_comparison.json", "date": "2026-11-28",
        "backend": "embedded", "model": "gemma3-270m"}  # fmt: skip

SCENARIO = """\
name: t
phase: scale
strategy:
  name: conversation
  trim_interval: 50
  concurrency: 1
profiles:
  embedded:
    backend: embedded
    model: gemma3-270m
    n_ctx: 16384
  gpu:
    backend: ollama
    model: gemma3:12b
    n_ctx: 14000
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "harness.yaml"
    assert sorted(write_back(path, "embedded", PERF, PROV)) == sorted(PERF)
    return path


def scenario(tmp_path: Path) -> Scenario:
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO)
    return load_scenario(path)


def test_the_performance_phases_values_are_what_the_next_run_uses(
    tmp_path: Path, config: Path
) -> None:
    cfg = resolve_run_config(
        profile="embedded", config=load_profile(config, "embedded"), scenario=scenario(tmp_path)
    )
    assert (cfg.request_path.value, cfg.request_path.source) == ("tokens", "harness.yaml")
    assert (cfg.parallel.value, cfg.parallel.source) == (2, "harness.yaml")
    assert (cfg.concurrency.value, cfg.concurrency.source) == (2, "harness.yaml")
    # harness.yaml (measured) beats the scenario's starting settings.
    assert (cfg.strategy.value, cfg.strategy.source) == ("stateless", "harness.yaml")
    assert (cfg.trim_interval.value, cfg.trim_interval.source) == (25, "harness.yaml")
    # The scenario's n_ctx, as nothing measured one.
    assert (cfg.n_ctx.value, cfg.n_ctx.source) == (16384, "scenario")
    assert cfg.ignored == ()
    (spec,) = cfg.member_specs()
    assert (spec.parallel, spec.n_ctx, spec.request_path) == (2, 16384, "tokens")
    # The factory gives the server every slot's context: n_ctx × parallel (llama-server's -c).
    server = open_backend(cfg)
    assert isinstance(server, EmbeddedBackend)
    assert server.settings.parallel == 2 and server.settings.n_ctx == 2 * 16384
    assert server.request_path == "tokens"


def test_the_command_line_beats_what_was_measured(tmp_path: Path, config: Path) -> None:
    cfg = resolve_run_config(
        profile="embedded",
        config=load_profile(config, "embedded"),
        scenario=scenario(tmp_path),
        cli={"concurrency": 1, "request_path": "chat", "trim_interval": None},
    )
    assert (cfg.concurrency.value, cfg.concurrency.source) == (1, "command line")
    assert (cfg.request_path.value, cfg.request_path.source) == ("chat", "command line")
    # None on the command line is "not given": the measured value stays.
    assert (cfg.trim_interval.value, cfg.trim_interval.source) == (25, "harness.yaml")


def test_values_measured_on_another_backend_are_not_applied_and_are_listed(
    tmp_path: Path, config: Path
) -> None:
    # The same profile name run against Ollama: nothing measured on the embedded server applies.
    cfg = resolve_run_config(
        profile="embedded",
        config=load_profile(config, "embedded"),
        scenario=scenario(tmp_path),
        cli={"backend": "ollama", "model": "gemma3:12b"},
    )
    assert cfg.backend.value == "ollama"
    assert cfg.request_path.value is None and cfg.request_path.source == "default"
    assert (cfg.strategy.value, cfg.strategy.source) == ("conversation", "scenario")
    assert (cfg.trim_interval.value, cfg.trim_interval.source) == (50, "scenario")
    assert cfg.concurrency.source == "scenario"
    assert len(cfg.ignored) == len(PERF)
    assert all("measured on embedded, this run is ollama" in why for why in cfg.ignored)
    assert cfg.to_dict()["ignored"] == list(cfg.ignored)


def test_values_measured_with_another_model_are_not_applied(tmp_path: Path, config: Path) -> None:
    cfg = resolve_run_config(
        profile="embedded",
        config=load_profile(config, "embedded"),
        scenario=scenario(tmp_path),
        cli={"model": "tiny-gemma3"},
    )
    assert cfg.trim_interval.source == "scenario"
    assert all("measured with gemma3-270m, this run uses tiny-gemma3" in w for w in cfg.ignored)


def test_a_second_write_with_the_same_measurements_changes_nothing(config: Path) -> None:
    before = config.read_bytes()
    assert write_back(config, "embedded", PERF, {**PROV, "date": "2026-12-01"}) == []
    assert config.read_bytes() == before
    assert write_back(config, "embedded", {**PERF, "CONCURRENCY": 4}, PROV) == ["CONCURRENCY"]
    assert config.read_bytes() != before
    assert load_profile(config, "embedded").get("CONCURRENCY") == 4


def test_a_measured_cap_above_the_context_keeps_the_80_percent_margin(tmp_path: Path) -> None:
    path = tmp_path / "harness.yaml"
    write_back(path, "embedded", {"MAX_CONTEXT_TOKENS": 32768, "n_ctx": 8192}, PROV)
    cfg = resolve_run_config(profile="embedded", config=load_profile(path, "embedded"))
    assert cfg.max_context_tokens.value == 8192
    assert "capped to n_ctx 8192" in cfg.max_context_tokens.source
    assert cfg.trim_threshold.value == int(8192 * 0.8)
    capped = cfg.capped(4096)
    assert capped.max_context_tokens.value == 4096
    assert capped.trim_threshold.value == int(4096 * 0.8)


def test_a_threshold_measured_for_a_larger_cap_keeps_the_margin_below_the_lowered_one(
    tmp_path: Path,
) -> None:
    """Issue 42: MAX 20,000, threshold 16,000, --ctx 17,000 resolved a threshold of 16,000
    (94% of the cap)."""
    path = tmp_path / "harness.yaml"
    measured = {"MAX_CONTEXT_TOKENS": 20000, "CONTEXT_TRIM_THRESHOLD": 16000}
    write_back(path, "embedded", measured, PROV)
    config = load_profile(path, "embedded")
    cfg = resolve_run_config(profile="embedded", config=config, cli={"n_ctx": 17000})
    assert cfg.max_context_tokens.value == 17000
    assert cfg.trim_threshold.value == int(17000 * 0.8)
    # Uncapped, the measured threshold stands.
    cfg = resolve_run_config(profile="embedded", config=config, cli={"n_ctx": 20000})
    assert cfg.trim_threshold.value == 16000


def test_conversation_with_more_requests_in_flight_than_slots_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "harness.yaml"
    with pytest.raises(ConfigError, match=r"concurrency 4 \(command line\) on 1 server slot"):
        resolve_run_config(
            profile="embedded",
            config=load_profile(path, "embedded"),
            scenario=scenario(tmp_path),
            cli={"concurrency": 4},
        )


def test_an_unknown_backend_is_a_config_error_naming_the_known_ones(tmp_path: Path) -> None:
    """Not Ollama's constructor arguments handed to whatever was named (issue 28): the
    resolver and the factory both refuse it, naming the backends a run may use."""
    config = load_profile(tmp_path / "none.yaml", "embedded")
    with pytest.raises(ConfigError) as raised:
        resolve_run_config(profile="embedded", config=config, cli={"backend": "olama"})
    assert str(raised.value) == (
        "backend 'olama' (command line) is not known; choose one of: embedded, openai, ollama"
    )
    # The pool is registered but put together by a run, never named by one.
    with pytest.raises(ConfigError, match=r"'pool' .* is not known"):
        resolve_run_config(profile="embedded", config=config, cli={"backend": "pool"})
    cfg = resolve_run_config(profile="embedded", config=config)
    with pytest.raises(ConfigError, match=r"unknown backend 'olama'; choose one of: .*ollama"):
        open_backend(replace(cfg, backend=Value("olama", "command line")))
    with pytest.raises(ConfigError, match="cannot be built from a run's settings"):
        open_backend(replace(cfg, backend=Value("pool", "command line")))
