"""One configuration path: what a run uses, and where each value came from.

Every entry point (`harness run`, `harness api`, `harness doctor`, the suites) resolves its
server, its trim policy and its concurrency here, from the same sources, in this order (the
first that sets a value wins):

1. the **command line** (`--ctx`, `--concurrency`, `--strategy`, `--harness-model`, ...);
2. **harness.yaml**, the measured configuration (phase 1 and the performance phase write it
   with `--write-config`) — only values measured on the same backend as this run;
3. the **scenario** profile (`scenarios/*.yaml`), the phase's starting settings;
4. the harness's **defaults** (a backend's default model is its class's `default_model`).

`resolve` reads harness.yaml once (`load_profile`, called here only, and by the verdict) and
then applies an entry point's own rules, declared as data (`RUN_RULES`: what `harness run`,
`harness api` and `harness doctor` decide beyond the sources above). An unknown backend is a
`ConfigError` naming the known ones.

The context of one request (`n_ctx`, Ollama's `num_ctx`, one llama.cpp slot) is that order's
`n_ctx`; the trim policy's cap (`MAX_CONTEXT_TOKENS`) is never above it, and when the cap is
lowered to fit the server the trim threshold keeps its 80% margin below the new cap
(`SAFE_FRACTION`, `harness.engine.strategies`). Phase 1's base memory and KV bytes per token
(`MODEL_VRAM_GB`, `KV_CACHE_PER_TOKEN_MB`) predict the memory of the server this configuration
starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from harness.backends import Backend  # the package: every backend registered
from harness.config import ProfileConfig, load_profile, measured_values
from harness.engine.strategies import SAFE_FRACTION
from harness.errors import ConfigError
from harness.run.settings import CLI, CONFIG, DEFAULT, SCENARIO, RunConfig, Value
from harness.scenarios import Scenario
from harness.scoring import SCORE_MODES

__all__ = [
    "DEFAULT_CTX",
    "RUN_RULES",
    "Rule",
    "default_model",
    "default_profile",
    "resolve",
    "resolve_run_config",
    "threads_per_server",
]

T = TypeVar("T")

DEFAULT_CTX = 8192


def default_model(backend: str) -> str:
    """The model a run on `backend` uses when none is named ("" for an unknown backend)."""
    klass = Backend._registry.get(backend)
    return klass.default_model if klass is not None else ""


def default_profile(backend: str) -> str:
    """The harness.yaml and scenario profile a run on `backend` reads by default."""
    klass = Backend._registry.get(backend)
    return klass.default_profile if klass is not None else "embedded"


def threads_per_server(threads: int | None, backend: str, servers: int) -> tuple[int | None, str]:
    """Threads of each embedded server, and where the number came from: the command line,
    else for several servers this machine's cores shared among them (at least one each), so
    they do not all spin on every core; one server: llama.cpp's default (every core)."""
    if threads is not None:
        return threads, CLI
    if backend != "embedded" or servers <= 1:
        return None, "default: every core"
    cores = os.cpu_count() or 1
    return max(1, cores // servers), (
        f"default: {cores} cores ÷ {servers} servers, at least 1 each"
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """What an entry point decides after the sources: when `when(cfg)` holds, the setting
    `field` becomes `value(cfg)` (a `Value`, its source saying why), or, for a plain field
    such as `context_from_server`, that value."""

    field: str
    when: Callable[[RunConfig], bool]
    value: Callable[[RunConfig], Any]
    why: str
    """What the rule is for (documentation, and `describe_rules`)."""


def _embedded(cfg: RunConfig) -> bool:
    return cfg.backend.value == "embedded"


RUN_RULES: tuple[Rule, ...] = (
    Rule(
        "request_path",
        lambda c: _embedded(c) and c.request_path.value is None,
        lambda c: Value("tokens", "default (harness run: the fastest)"),
        "a production run on this server, not a prediction of Ollama's: the fastest path",
    ),
    Rule(
        "parallel",
        lambda c: _embedded(c) and c.parallel.source == DEFAULT and c.concurrency.value > 1,
        lambda c: Value(c.concurrency.value, "= concurrency"),
        "the embedded server gets one slot per request in flight",
    ),
    Rule(
        "swa_full",
        lambda c: c.server_flags.value == "harness" and c.strategy.value == "conversation",
        lambda c: Value(True, "harness flags + conversation strategy"),
        "a rolling conversation goes back to its start at every trim; full-size sliding "
        "windows keep the rubric reusable then, for more KV memory per token",
    ),
    Rule(
        "context_from_server",
        lambda c: c.backend.value == "ollama" and c.n_ctx.source == DEFAULT,
        lambda c: True,
        "neither --ctx nor a measured n_ctx: use (and read) the context Ollama loads with",
    ),
)
"""`harness run`'s, `harness api`'s and `harness doctor`'s rules (the suites apply none: a
phase predicts the production server from the scenario)."""


def apply_rules(cfg: RunConfig, rules: Sequence[Rule]) -> RunConfig:
    """`cfg` with each rule that holds applied, in order."""
    for rule in rules:
        if rule.when(cfg):
            cfg = replace(cfg, **{rule.field: rule.value(cfg)})
    return cfg


def resolve(
    *,
    profile: str,
    config_path: str | Path,
    scenario: Scenario | None = None,
    cli: Mapping[str, Any] | None = None,
    rules: Sequence[Rule] = (),
) -> RunConfig:
    """A run's settings: harness.yaml read once (a bad file fails here, naming it), the
    sources resolved (`resolve_run_config`), then the entry point's `rules`."""
    config = load_profile(config_path, profile)
    cfg = resolve_run_config(profile=profile, config=config, scenario=scenario, cli=cli)
    return apply_rules(cfg, rules)


def _first(default: T, *candidates: tuple[Any, str]) -> Value[T]:
    for value, source in candidates:
        if value is not None:
            return Value(value, source)
    return Value(default, DEFAULT)


def _endpoints(given: str | None, prof: Any) -> tuple[Value[tuple[str, ...]], Value[str | None]]:
    """The servers' URLs (the command line's comma list, else the profile's `endpoints:`)
    and the first of them as the base URL."""
    urls = tuple(u.strip() for u in (given or "").split(",") if u.strip())
    source = CLI
    if not urls and prof is not None and prof.endpoints:
        urls, source = tuple(prof.endpoints), SCENARIO
    if len(set(urls)) < len(urls):
        raise ConfigError(f"endpoints ({source}) name a server twice: {', '.join(urls)}")
    if not urls:
        return Value((), DEFAULT), Value(None, DEFAULT)
    return Value(urls, source), Value(urls[0], source)


def _scenario_values(scenario: Scenario | None, profile: str) -> tuple[Any, dict[str, Any]]:
    """The scenario profile (None when the scenario has no such profile) and its settings."""
    prof = (
        scenario.profile(profile) if scenario is not None and profile in scenario.profiles else None
    )
    st = scenario.strategy_for(profile) if prof is not None and scenario is not None else None
    if prof is None or st is None:
        return prof, {}
    return prof, {
        "backend": prof.backend,
        "model": prof.model,
        "n_ctx": prof.n_ctx,
        "parallel": prof.parallel if "parallel" in prof.model_fields_set else None,
        "server_flags": prof.server_flags,
        "request_path": prof.request_path,
        "swa_full": prof.swa_full if "swa_full" in prof.model_fields_set else None,
        "strategy": st.name,
        "concurrency": st.concurrency,
        "max_context_tokens": st.max_context_tokens,
        "trim_threshold": st.trim_threshold,
        "trim_interval": st.trim_interval,
        "keep_last": st.keep_last,
    }


def resolve_run_config(
    *,
    profile: str,
    config: ProfileConfig,
    scenario: Scenario | None = None,
    cli: Mapping[str, Any] | None = None,
    backend_default: str = "embedded",
) -> RunConfig:
    """Resolve a run's settings (see the module docstring) from harness.yaml's profile
    already read; `cli` maps setting names (`backend`, `model`, `base_url`, `n_ctx`,
    `parallel`, `concurrency`, `server_flags`, `request_path`, `strategy`,
    `max_context_tokens`, `trim_threshold`, `trim_interval`, `score_mode`, `servers`,
    `threads`) to what the command line gave (None or absent: not given)."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    prof, scen = _scenario_values(scenario, profile)
    backend: Value[str] = _first(
        backend_default, (cli.get("backend"), CLI), (scen.get("backend"), SCENARIO)
    )
    if backend.value not in Backend.runnable():
        raise ConfigError(
            f"backend {backend.value!r} ({backend.source}) is not known; choose one of: "
            f"{', '.join(Backend.runnable())}"
        )
    model_given = cli.get("model") or scen.get("model") or default_model(backend.value)
    measured, ignored = measured_values(config, backend.value, model_given or None)

    def pick(key: str, yaml_key: str | None, default: Any) -> Value[Any]:
        return _first(
            default,
            (cli.get(key), CLI),
            (measured.get(yaml_key) if yaml_key else None, CONFIG),
            (scen.get(key), SCENARIO),
        )

    model = pick("model", None, default_model(backend.value))
    n_ctx = pick("n_ctx", "n_ctx", DEFAULT_CTX)
    parallel = pick("parallel", "parallel", 1)
    concurrency = _first(
        parallel.value,
        (cli.get("concurrency"), CLI),
        (measured.get("CONCURRENCY"), CONFIG),
        (scen.get("concurrency"), SCENARIO),
    )
    flags = pick("server_flags", "SERVER_FLAGS", "ollama")
    swa_full = pick("swa_full", None, False)
    if swa_full.value and flags.value == "ollama":
        raise ConfigError(
            f"swa_full ({swa_full.source}) is not among Ollama's llama-server flags "
            f"(server_flags: ollama, {flags.source}); drop it or set server_flags: harness"
        )
    max_ctx = pick("max_context_tokens", "MAX_CONTEXT_TOKENS", n_ctx.value)
    capped = max_ctx.value > n_ctx.value
    if capped:
        max_ctx = Value(n_ctx.value, f"capped to n_ctx {n_ctx.value} ({n_ctx.source})")
    threshold = pick("trim_threshold", "CONTEXT_TRIM_THRESHOLD", None)
    margin = int(max_ctx.value * SAFE_FRACTION)
    # A threshold measured against a larger cap keeps its 80% margin below the lowered one
    # (MAX 20,000, threshold 16,000, --ctx 17,000: 13,600, not 16,000, 94% of the cap).
    if (
        threshold.value is None
        or threshold.value > max_ctx.value
        or (capped and threshold.value > margin)
    ):
        threshold = Value(margin, f"{int(SAFE_FRACTION * 100)}% of MAX_CONTEXT_TOKENS")
    score_mode = pick("score_mode", "SCORE_MODE", "decode")
    if score_mode.value not in SCORE_MODES:
        raise ConfigError(
            f"score mode {score_mode.value!r} ({score_mode.source}): choose one of "
            f"{', '.join(SCORE_MODES)}"
        )
    for name, v in (("n_ctx", n_ctx), ("parallel", parallel), ("concurrency", concurrency)):
        if int(v.value) < 1:
            raise ConfigError(f"{name} = {v.value} ({v.source}) must be at least 1")
    strategy = pick("strategy", "STRATEGY", "stateless")
    if (
        backend.value == "embedded"
        and strategy.value == "conversation"
        and int(concurrency.value) > int(parallel.value)
    ):
        raise ConfigError(
            f"the conversation strategy with concurrency {concurrency.value} "
            f"({concurrency.source}) on {parallel.value} server slot(s) ({parallel.source}): "
            "two conversations would share a slot and evict each other's history; give as "
            "many slots as concurrent requests"
        )
    endpoints, base_url = _endpoints(cli.get("base_url"), prof)
    servers = _first(
        1,
        (cli.get("servers"), CLI),
        (
            prof.servers if prof is not None and "servers" in prof.model_fields_set else None,
            SCENARIO,
        ),
    )
    if backend.value == "embedded" and len(endpoints.value) > 1:
        raise ConfigError(
            f"{len(endpoints.value)} endpoints ({endpoints.source}) for the embedded backend, "
            "which starts its own servers: set servers: N instead"
        )
    if backend.value != "embedded" and servers.value > 1:
        raise ConfigError(
            f"servers: {servers.value} ({servers.source}) starts embedded servers; for "
            f"{backend.value}, list each server's URL under endpoints:"
        )
    threads, threads_source = threads_per_server(
        cli.get("threads"), backend.value, int(servers.value)
    )
    return RunConfig(
        profile=profile,
        backend=backend,
        model=model,
        base_url=base_url,
        endpoints=endpoints,
        servers=servers,
        n_ctx=Value(int(n_ctx.value), n_ctx.source),
        parallel=Value(int(parallel.value), parallel.source),
        concurrency=Value(int(concurrency.value), concurrency.source),
        server_flags=flags,
        request_path=pick("request_path", "REQUEST_PATH", None),
        strategy=strategy,
        max_context_tokens=Value(int(max_ctx.value), max_ctx.source),
        trim_threshold=Value(int(threshold.value), threshold.source),
        trim_interval=pick("trim_interval", "TRIM_INTERVAL", None),
        keep_last=pick("keep_last", None, 0),
        swa_full=swa_full,
        score_mode=score_mode,
        ignored=tuple(ignored),
        model_memory_gb=measured.get("MODEL_VRAM_GB"),
        kv_mb_per_token=measured.get("KV_CACHE_PER_TOKEN_MB"),
        threads=Value(threads, threads_source),
        measured=config,
    )
