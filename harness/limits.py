"""Context limits: memory against context size, and the largest context that fits a budget.

For each context size a fresh server is started (as Ollama reloads a model on a new `num_ctx`)
and its memory read; a least-squares line through the readings gives the model's base memory
(intercept) and the KV bytes per token (slope), compared with the theory from the model's
metadata. The largest context that fits a memory budget is then found by search: only sizes
whose predicted memory fits the budget are ever started, each is measured, and the search
narrows until one step separates the largest size that fit from the smallest that did not —
never by exhausting the machine. A load that fails (out of memory) or an Ollama model that
spills to system memory (`size_vram < size`) counts as not fitting.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from harness.backends.embedded import EmbeddedServer
from harness.backends.server import ServerSettings, ollama_settings
from harness.errors import ConfigError, LoadFailure
from harness.memory import local_gpu_probe
from harness.metrics import linear_fit

__all__ = [
    "ContextProbe",
    "EmbeddedContextProbe",
    "LimitSearch",
    "Measurement",
    "OllamaContextProbe",
    "fit_memory",
    "parse_bytes",
    "search_max_context",
    "sweep",
]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip


def parse_bytes(text: str | int | float, *, total: int | None = None) -> int:
    """`12GB`, `11.5 GiB`, `800MiB`, `123456` (bytes), or `80%` of `total`."""
    if isinstance(text, int | float):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    if s.endswith("%"):
        if total is None:
            raise ConfigError(f"memory budget {text!r}: a percentage needs a known total")
        return int(total * float(s[:-1]) / 100)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if m is None or m.group(2) not in _UNITS:
        raise ConfigError(
            f"memory budget {text!r} is not a size; write e.g. 12GB, 11.5GiB, 800MiB or 80%"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(slots=True)
class Measurement:
    """Memory of a freshly loaded server at one context size."""

    n_ctx: int
    memory_bytes: int | None
    source: str
    ok: bool = True
    """False when the load failed or (Ollama) the model spilled out of GPU memory."""
    error: str | None = None
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ContextProbe(Protocol):
    """Starts a fresh server at a context size and measures it."""

    def measure(self, n_ctx: int) -> Measurement: ...


class EmbeddedContextProbe:
    """A llama.cpp child process per size, started with the flags the run will use (Ollama's
    by default); memory is its resident set (RSS). `n_ctx` is the context of one request."""

    def __init__(
        self,
        model: str,
        *,
        parallel: int = 1,
        server_flags: str = "ollama",
        swa_full: bool = False,
        settle_s: float = 0.3,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.server_flags = server_flags
        self.swa_full = swa_full
        self.settle_s = settle_s

    def settings(self, n_ctx: int) -> ServerSettings:
        if self.server_flags == "ollama":
            return ollama_settings(self.model, n_ctx, num_parallel=self.parallel)
        return ServerSettings(
            model=self.model,
            n_ctx=n_ctx * self.parallel,
            parallel=self.parallel,
            swa_full=self.swa_full,
        )

    def measure(self, n_ctx: int) -> Measurement:
        started = time.perf_counter()
        server = EmbeddedServer(self.settings(n_ctx))
        try:
            server.start()
            time.sleep(self.settle_s)
            sample = server.memory_probe().sample()
            return Measurement(
                n_ctx, sample.used_bytes, sample.source, seconds=time.perf_counter() - started
            )
        except LoadFailure as exc:
            return Measurement(
                n_ctx, None, "rss", ok=False, error=str(exc), seconds=time.perf_counter() - started
            )
        finally:
            server.stop()


class OllamaContextProbe:
    """Ollama reloads the model for a new `num_ctx`. Memory is read from the GPU (NVML, the
    device's used memory) when Ollama runs on this machine's GPU, with `/api/ps` (`size`,
    Ollama's own accounting) beside it; else from `/api/ps` alone. A model that does not fit GPU
    memory (`size_vram < size`) counts as not fitting."""

    def __init__(self, model: str, base_url: str | None = None, *, nvml: Any | None = None) -> None:
        self.model = model
        self.base_url = base_url
        self.nvml = nvml

    def measure(self, n_ctx: int) -> Measurement:
        from harness.backends.base import BackendSpec, ChatRequest
        from harness.backends.ollama import OllamaBackend

        started = time.perf_counter()

        async def load() -> dict[str, Any]:
            spec = BackendSpec(model=self.model, base_url=self.base_url, n_ctx=n_ctx)
            backend = OllamaBackend.from_spec(spec)
            async with backend:
                await backend.chat(ChatRequest([{"role": "user", "content": "ok"}], max_tokens=1))
                probe = backend.memory_probe()
                try:
                    sample = probe.sample()
                finally:
                    probe.close()
                info = {"used": sample.used_bytes, **sample.detail, "source": sample.source}
                gpu = local_gpu_probe(backend.base_url, nvml=self.nvml)
                if gpu is not None:
                    reading = gpu.sample()
                    info["nvml_used_bytes"] = reading.used_bytes
                    info["nvml_source"] = reading.source
                    info["nvml_device"] = gpu.device_name()
                return info

        try:
            info = asyncio.run(load())
        except LoadFailure as exc:
            return Measurement(n_ctx, None, "ollama", ok=False, error=str(exc))
        spilled = bool(info.get("spilled"))
        nvml_used = info.get("nvml_used_bytes")
        keys = ("size", "size_vram", "context_length", "nvml_used_bytes", "nvml_device")
        return Measurement(
            n_ctx,
            int(nvml_used) if nvml_used is not None else int(info["size"]),
            str(info["nvml_source"]) if nvml_used is not None else str(info["source"]),
            ok=not spilled,
            error="model spilled to system memory (size_vram < size)" if spilled else None,
            seconds=time.perf_counter() - started,
            detail={k: info[k] for k in keys if k in info} | {"ollama_source": info["source"]},
        )


@dataclass(frozen=True, slots=True)
class MemoryFit:
    slope: float
    """Bytes per token of context."""
    intercept: float
    """Bytes at zero context: the model without KV cache."""
    r_squared: float

    def predict(self, n_ctx: int) -> float:
        return self.intercept + self.slope * n_ctx

    def crossing(self, budget: int) -> float | None:
        """Context size where the line reaches `budget` (None if memory does not grow)."""
        return (budget - self.intercept) / self.slope if self.slope > 0 else None


def sweep(
    probe: ContextProbe,
    sizes: list[int],
    budget: int | None = None,
    *,
    margin: float = 0.001,
    on_measure: Callable[[Measurement], None] | None = None,
) -> tuple[list[Measurement], list[int]]:
    """Measure each size, smallest first. With a budget, once two sizes are measured a size
    whose predicted memory is within `margin` of the budget or over it is not started (it is
    returned in the second list): the sweep never loads a server it expects to exceed."""
    done: list[Measurement] = []
    skipped: list[int] = []
    for n in sorted(sizes):
        ok = [m for m in done if m.ok and m.memory_bytes is not None]
        if (
            budget is not None
            and len(ok) >= 2
            and fit_memory(ok).predict(n) > budget * (1 - margin)
        ):
            skipped.append(n)
            continue
        m = probe.measure(n)
        done.append(m)
        if on_measure is not None:
            on_measure(m)
    return done, skipped


def fit_memory(measurements: list[Measurement]) -> MemoryFit:
    ok = [m for m in measurements if m.ok and m.memory_bytes is not None]
    if len({m.n_ctx for m in ok}) < 2:
        raise ConfigError("a memory fit needs readings at two or more context sizes that loaded")
    slope, intercept, r2 = linear_fit(
        [float(m.n_ctx) for m in ok], [float(m.memory_bytes or 0) for m in ok]
    )
    return MemoryFit(slope, intercept, r2)


@dataclass(slots=True)
class LimitSearch:
    max_context_tokens: int
    limited_by: str
    """`memory budget`, `trained context`, or `load failure` (nothing fitted)."""
    crossing_estimate: float | None
    steps: list[Measurement]
    skipped: list[int]
    """Sizes not started because their predicted memory exceeded the budget."""


def _down(n: float, step: int) -> int:
    return int(n // step) * step


def search_max_context(
    probe: ContextProbe,
    sweep: list[Measurement],
    fit: MemoryFit,
    budget: int,
    *,
    trained: int | None,
    step: int = 256,
    margin: float = 0.001,
    on_measure: Callable[[Measurement], None] | None = None,
) -> LimitSearch:
    """Largest context that loads within `budget`, to within `step` tokens (see module doc)."""
    fits = [m.n_ctx for m in sweep if m.ok and (m.memory_bytes or 0) <= budget]
    over = [m.n_ctx for m in sweep if not m.ok or (m.memory_bytes or 0) > budget]
    lo = max(fits, default=0)
    hi = min((n for n in over if n > lo), default=None)
    crossing = fit.crossing(budget)
    cap = trained or 1 << 24
    steps: list[Measurement] = []
    skipped: list[int] = []

    def fits_at(n: int) -> bool:
        if fit.predict(n) > budget * (1 - margin):
            skipped.append(n)  # predicted to exceed (or to come within margin): never started
            return False
        m = probe.measure(n)
        steps.append(m)
        if on_measure is not None:
            on_measure(m)
        return m.ok and (m.memory_bytes or 0) <= budget

    if hi is None:
        target = min(cap, _down(crossing, step)) if crossing is not None else cap
        if target > lo:
            if fits_at(target):
                lo = target
            else:
                hi = target
    while hi is not None and hi - lo > step:
        mid = _down((lo + hi) / 2, step)
        if mid <= lo:
            break
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        limited = "load failure"
    elif lo >= cap:
        limited = "trained context"
    else:
        limited = "memory budget"
    return LimitSearch(lo, limited, crossing, steps, skipped)
