"""A run's settings, resolved: each value with where it came from (`harness.run.resolve`).

`RunConfig` is what every entry point hands down once it is resolved: the factory builds the
backend from it (`member_specs`, one `BackendSpec` per server), `spec_for` (through `fitted`) caps
its trim policy to the server's context (`capped`, called there only) and the reports keep it
(`to_dict`, the `config` block the verdict and the plan read).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from harness.backends.base import BackendSpec
from harness.config import ProfileConfig
from harness.engine.strategies import SAFE_FRACTION, TrimPolicy

__all__ = ["CLI", "CONFIG", "DEFAULT", "SCENARIO", "RunConfig", "Value"]

T = TypeVar("T")

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


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The resolved settings of one run (see the module docstring and `harness.run.resolve`)."""

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
    threads: Value[int | None] = Value(None, "default: every core")
    """CPU threads of each embedded server (None: llama.cpp's default, every core). Not in
    `settings()`: the reports' config block is what it was."""
    context_from_server: bool = False
    """Ollama: use (and read) the context the server loads with, not `n_ctx` (`harness run`
    when nothing set a context)."""
    measured: ProfileConfig | None = field(default=None, compare=False, repr=False)
    """harness.yaml's profile as `resolve` read it (once), for what else reads it (the score
    mode's banner line names the measurement behind SCORE_MODE)."""

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

    def member_specs(self) -> list[BackendSpec]:
        """What the run wants of each server (one entry for one server): the same server
        `servers` times (embedded), or one per endpoint URL."""
        spec = BackendSpec(
            model=self.model.value,
            base_url=self.base_url.value,
            n_ctx=self.n_ctx.value,
            parallel=self.parallel.value,
            max_connections=max(64, self.concurrency.value),
            server_flags=self.server_flags.value,
            request_path=self.request_path.value,
            swa_full=self.swa_full.value,
            threads=self.threads.value,
            context_from_server=self.context_from_server,
        )
        if self.backend.value == "embedded":
            return [spec] * self.servers.value
        urls = self.endpoints.value or (self.base_url.value,)
        return [replace(spec, base_url=url) for url in urls]

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
        """This configuration with its policy within a server's context of one request (called
        by `harness.run.preflight.fitted` only: `spec_for` and the suites go through it)."""
        if not server_n_ctx or self.max_context_tokens.value <= server_n_ctx:
            return self
        note = f"capped to the server's context of {server_n_ctx}"
        threshold = self.trim_threshold
        margin = int(server_n_ctx * SAFE_FRACTION)
        if threshold.value > margin:
            threshold = Value(margin, f"{int(SAFE_FRACTION * 100)}% of the server's context")
        return replace(
            self,
            max_context_tokens=Value(server_n_ctx, note),
            trim_threshold=threshold,
        )

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
