"""One configuration path: what a run uses, and where each value came from.

Every suite and `harness run` build their server, their trim policy and their concurrency
here, from the same sources, in this order (the first that sets a value wins):

1. the **command line** (`--ctx`, `--concurrency`, `--strategy`, `--harness-model`, ...);
2. **harness.yaml**, the measured configuration (phase 1 and the performance phase write it
   with `--write-config`) — only values measured on the same backend as this run;
3. the **scenario** profile (`scenarios/*.yaml`), the phase's starting settings;
4. the harness's **defaults**.

The context of one request (`n_ctx`, Ollama's `num_ctx`, one llama.cpp slot) is that order's
`n_ctx`; the trim policy's cap (`MAX_CONTEXT_TOKENS`) is never above it, and when the cap is
lowered to fit the server the trim threshold keeps its 80% margin below the new cap. Phase 1's
base memory and KV bytes per token (`MODEL_VRAM_GB`, `KV_CACHE_PER_TOKEN_MB`) predict the
memory of the server this configuration starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from harness.config import ProfileConfig, measured_values
from harness.engine.strategies import SAFE_FRACTION, TrimPolicy
from harness.errors import ConfigError
from harness.models.registry import DEFAULT_MODEL
from harness.scenarios import Scenario
from harness.scoring import SCORE_MODES

__all__ = [
    "DEFAULT_MODELS",
    "RunConfig",
    "Value",
    "resolve_run_config",
]

T = TypeVar("T")

DEFAULT_MODELS = {"embedded": DEFAULT_MODEL, "ollama": "gemma3:12b", "openai": ""}
DEFAULT_CTX = 8192
CLI = "command line"
CONFIG = "harness.yaml"
SCENARIO = "scenario"
DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Value(Generic[T]):
    """A setting and where it came from (`command line`, `harness.yaml`, `scenario`,
    `default`, or a note such as `capped to the server's context`)."""

    value: T
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source}


def _first(default: T, *candidates: tuple[Any, str]) -> Value[T]:
    for value, source in candidates:
        if value is not None:
            return Value(value, source)
    return Value(default, DEFAULT)


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The resolved settings of one run (see the module docstring)."""

    profile: str
    backend: Value[str]
    model: Value[str]
    base_url: Value[str | None]
    n_ctx: Value[int]
    """Context of one request in tokens (one llama.cpp slot; Ollama's num_ctx)."""
    parallel: Value[int]
    """Server slots (embedded); with Ollama, what OLLAMA_NUM_PARALLEL must be."""
    concurrency: Value[int]
    """Requests in flight."""
    server_flags: Value[str]
    """How the embedded server is started: `ollama` (Ollama's llama-server flags) or
    `harness` (the harness's own tuning)."""
    request_path: Value[str | None]
    """`chat`, `text` or `tokens` (llama.cpp); None: the backend's default."""
    strategy: Value[str]
    max_context_tokens: Value[int]
    trim_threshold: Value[int]
    trim_interval: Value[int | None]
    keep_last: Value[int]
    swa_full: Value[bool]
    score_mode: Value[str] = Value("decode", DEFAULT)
    """`decode` (the model writes the reply) or `logprobs` (the reply's fixed part sent
    written, the score read from the probabilities: `harness.scoring`)."""
    ignored: tuple[str, ...] = ()
    """harness.yaml values that were not applied, with why (e.g. measured on another backend)."""
    model_memory_gb: float | None = None
    """Phase 1's base model memory (MODEL_VRAM_GB), when harness.yaml has it."""
    kv_mb_per_token: float | None = None
    """Phase 1's KV memory per token of context (KV_CACHE_PER_TOKEN_MB), when known."""
    endpoints: Value[tuple[str, ...]] = Value((), DEFAULT)
    """openai/ollama: every server's URL when the run goes over several (a pool)."""
    servers: Value[int] = Value(1, DEFAULT)
    """embedded: how many servers to start (more than one: a pool)."""

    @property
    def pool_size(self) -> int:
        """How many servers the run goes over."""
        if self.backend.value == "embedded":
            return self.servers.value
        return max(1, len(self.endpoints.value))

    @property
    def total_concurrency(self) -> int:
        """Requests in flight over every server: `concurrency` is per server."""
        return self.concurrency.value * self.pool_size

    def member_options(self) -> list[dict[str, Any]]:
        """`backend_options()` of each server of a pool (one entry for one server). Embedded
        servers share this machine's cores, at least one thread each."""
        opts = self.backend_options()
        if self.backend.value == "embedded":
            if self.servers.value > 1:
                opts["threads"] = max(1, (os.cpu_count() or 1) // self.servers.value)
            return [dict(opts) for _ in range(self.servers.value)]
        urls = self.endpoints.value or (self.base_url.value,)
        return [{**opts, "base_url": url} for url in urls]

    @property
    def policy(self) -> TrimPolicy:
        return TrimPolicy(
            max_context_tokens=self.max_context_tokens.value,
            trim_threshold=self.trim_threshold.value,
            trim_interval=self.trim_interval.value,
            keep_last=self.keep_last.value,
        )

    @property
    def predicted_memory_gb(self) -> float | None:
        """Phase 1's line at this run's total context (all slots): base + KV per token × n."""
        if self.model_memory_gb is None or self.kv_mb_per_token is None:
            return None
        tokens = self.n_ctx.value * self.parallel.value
        return self.model_memory_gb + self.kv_mb_per_token * tokens / 1000.0

    def capped(self, server_n_ctx: int | None) -> RunConfig:
        """This configuration with its policy within a server's context of one request."""
        if not server_n_ctx or self.max_context_tokens.value <= server_n_ctx:
            return self
        note = f"capped to the server's context of {server_n_ctx}"
        threshold = self.trim_threshold
        margin = int(server_n_ctx * SAFE_FRACTION)
        if threshold.value > margin:
            threshold = Value(margin, f"{int(SAFE_FRACTION * 100)}% of the server's context")
        return _replace(
            self,
            max_context_tokens=Value(server_n_ctx, note),
            trim_threshold=threshold,
        )

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments of `Backend.create(self.backend.value, ...)`."""
        name = self.backend.value
        if name == "embedded":
            opts: dict[str, Any] = {
                "model": self.model.value,
                "n_ctx": self.n_ctx.value * self.parallel.value,
                "parallel": self.parallel.value,
                "server_flags": self.server_flags.value,
                "swa_full": self.swa_full.value,
                "max_connections": max(64, self.concurrency.value),
            }
            if self.request_path.value:
                opts["request_path"] = self.request_path.value
            return opts
        if name == "openai":
            opts = {
                "base_url": self.base_url.value,
                "model": self.model.value or None,
                "max_connections": max(64, self.concurrency.value),
            }
            if self.request_path.value:
                opts["request_path"] = self.request_path.value
            return opts
        return {
            "base_url": self.base_url.value,
            "model": self.model.value,
            "num_ctx": self.n_ctx.value,
        }

    def settings(self) -> dict[str, Value[Any]]:
        return {
            "backend": self.backend,
            "model": self.model,
            "base_url": self.base_url,
            "n_ctx": self.n_ctx,
            "parallel": self.parallel,
            "concurrency": self.concurrency,
            "server_flags": self.server_flags,
            "request_path": self.request_path,
            "strategy": self.strategy,
            "MAX_CONTEXT_TOKENS": self.max_context_tokens,
            "CONTEXT_TRIM_THRESHOLD": self.trim_threshold,
            "TRIM_INTERVAL": self.trim_interval,
            "keep_last": self.keep_last,
            "swa_full": self.swa_full,
            "score_mode": self.score_mode,
            "endpoints": self.endpoints,
            "servers": self.servers,
        }

    def to_dict(self) -> dict[str, Any]:
        """For reports: every setting with its source."""
        out: dict[str, Any] = {k: v.to_dict() for k, v in self.settings().items()}
        out["profile"] = self.profile
        out["ignored"] = list(self.ignored)
        out["predicted_memory_gb"] = self.predicted_memory_gb
        return out


def _replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


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


def resolve_run_config(
    *,
    profile: str,
    config: ProfileConfig,
    scenario: Scenario | None = None,
    cli: Mapping[str, Any] | None = None,
    backend_default: str = "embedded",
) -> RunConfig:
    """Resolve a run's settings (see the module docstring); `cli` maps setting names
    (`backend`, `model`, `base_url`, `n_ctx`, `parallel`, `concurrency`, `server_flags`,
    `request_path`, `strategy`, `max_context_tokens`, `trim_threshold`, `trim_interval`,
    `score_mode`) to
    what the command line gave (None or absent: not given)."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    prof = (
        scenario.profile(profile) if scenario is not None and profile in scenario.profiles else None
    )
    st = scenario.strategy_for(profile) if prof is not None and scenario is not None else None
    scen: dict[str, Any] = {}
    if prof is not None and st is not None:
        scen = {
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
    backend: Value[str] = _first(
        backend_default, (cli.get("backend"), CLI), (scen.get("backend"), SCENARIO)
    )
    model_given = cli.get("model") or scen.get("model") or DEFAULT_MODELS.get(backend.value)
    measured, ignored = measured_values(config, backend.value, model_given or None)

    def pick(key: str, yaml_key: str | None, default: Any) -> Value[Any]:
        return _first(
            default,
            (cli.get(key), CLI),
            (measured.get(yaml_key) if yaml_key else None, CONFIG),
            (scen.get(key), SCENARIO),
        )

    model = pick("model", None, DEFAULT_MODELS.get(backend.value, ""))
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
    if max_ctx.value > n_ctx.value:
        max_ctx = Value(n_ctx.value, f"capped to n_ctx {n_ctx.value} ({n_ctx.source})")
    threshold = pick("trim_threshold", "CONTEXT_TRIM_THRESHOLD", None)
    if threshold.value is None or threshold.value > max_ctx.value:
        threshold = Value(
            int(max_ctx.value * SAFE_FRACTION), f"{int(SAFE_FRACTION * 100)}% of MAX_CONTEXT_TOKENS"
        )
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
    )
