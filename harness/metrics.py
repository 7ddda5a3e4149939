"""Aggregation of per-request records into run metrics, streamed.

The collector keeps compact numeric columns (arrays of doubles and ints), never the records, so
a 170,000-request run costs a few megabytes. Definitions:

- `token_savings` = cached prompt tokens ÷ prompt tokens, over completed requests whose cached
  tokens are known (server-reported, never estimated; a count a server that sends it left out
  is 0, `cached_omitted`); `cached_source` is the source of every one of them, or `mixed`;
- `token_savings_theoretical_max` = Σ reusable tokens ÷ Σ prompt tokens, where a request's
  reusable tokens are the longest prefix it shares with what its slot held before (at most
  its prompt minus one token: the server must compute at least one); for the first request on
  a slot, whose cache this run did not fill, the server's own report;
- `savings_efficiency` = savings ÷ theoretical maximum;
- `degradation` = throughput of the last tenth of completions ÷ that of the first tenth;
- leak slopes: least-squares slope of memory samples against time, in bytes per hour.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.records import RequestRecord

__all__ = [
    "EndpointTally",
    "LatencyStats",
    "MetricsCollector",
    "RunMetrics",
    "endpoint_figures",
    "linear_fit",
    "percentile",
    "source_label",
]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) by linear interpolation; None for no values."""
    n = len(sorted_values)
    if n == 0:
        return None
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line through (xs, ys): (slope, intercept, r²). Needs two distinct xs."""
    n = len(xs)
    if n < 2 or n != len(ys):
        raise ValueError("a fit needs at least two points")
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a fit needs at least two distinct x values")
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return slope, intercept, r2


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency percentiles of completed requests, in milliseconds."""

    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    max: float | None


@dataclass(slots=True)
class RunMetrics:
    """The figures of one run. Token counts are totals; rates are per second."""

    requests: int
    completed: int
    errors: int
    error_rate: float
    elapsed_s: float
    throughput_rps: float
    tokens_per_s: float
    tokens: dict[str, int]
    token_savings: float | None
    token_savings_theoretical_max: float | None
    savings_efficiency: float | None
    cached_source: str
    uncached_tokens_per_request: float | None
    """Prompt tokens the server computed per completed request that reported its cache: the
    figure that compares across strategies (conversation batching re-sends its history, which
    raises `token_savings` without saving work)."""
    cached_coverage: float | None
    """Share of completed requests whose cached tokens are known: reported, or left out by a
    server that leaves a zero out (`cached_omitted`)."""
    cached_sources: dict[str, int]
    """Completed requests with a cached-token figure, by its source."""
    cached_omitted: int
    """Of those, replies whose server left the count out, counted as 0 (it sent the field on
    earlier replies)."""
    context_shifts: int
    """Requests the server answered after shifting its context (dropping tokens)."""
    latency_ms: LatencyStats
    context_trims: int
    trims_by_reason: dict[str, int]
    retries: int
    errors_by_type: dict[str, int]
    degradation: dict[str, float | None]
    projected_170k_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_label(sources: Mapping[str, int]) -> str:
    """The source of every cached-token figure counted: its one word, `mixed` when they came
    from several (never the majority's: a `== server` criterion must hold for every request),
    `unknown` when none was."""
    names = [name for name, n in sources.items() if n]
    return names[0] if len(names) == 1 else ("mixed" if names else "unknown")


def count_error(by_type: dict[str, int], rec: RequestRecord) -> None:
    """One more failed request of `rec`'s error type."""
    key = rec.error_type or "Error"
    by_type[key] = by_type.get(key, 0) + 1


class MetricsCollector:
    """Accumulates records into compact columns; `summary()` gives `RunMetrics`."""

    def __init__(self) -> None:
        self.latency = array("d")
        self.finished = array("d")
        self.started_at: float | None = None
        self.requests = 0
        self.completed = 0
        self.errors = 0
        self.prompt = 0
        self.cached = 0
        self.prompt_with_cache_info = 0
        self.reusable = 0
        self.completion = 0
        self.prompt_ms = array("d")
        """Server prefill time of each completed request that reported one, in ms."""
        self.decode_ms = array("d")
        """Server generation time of each completed request that reported one, in ms."""
        self.retries = 0
        self.trims: dict[str, int] = {}
        self.errors_by_type: dict[str, int] = {}
        self.cached_sources: dict[str, int] = {}
        self.with_cache_info = 0
        self.cached_omitted = 0
        """Completed requests whose server left its cached count out, counted as 0."""
        self.context_shifts = 0
        self.by_endpoint: dict[str, EndpointTally] = {}
        """Figures per server of a pool (records that name their `endpoint`)."""

    def add(self, rec: RequestRecord) -> None:
        if rec.endpoint is not None:
            tally = self.by_endpoint.get(rec.endpoint)
            if tally is None:
                tally = self.by_endpoint[rec.endpoint] = EndpointTally()
            tally.add(rec)
        self.requests += 1
        if self.started_at is None or rec.started < self.started_at:
            self.started_at = rec.started
        self.finished.append(rec.finished)
        self.retries += max(0, rec.attempts - 1)
        if rec.trim:
            self.trims[rec.trim] = self.trims.get(rec.trim, 0) + 1
        if rec.context_shifted:
            self.context_shifts += 1
        if not rec.ok:
            self.errors += 1
            count_error(self.errors_by_type, rec)
            return
        self.completed += 1
        self.latency.append(rec.latency_ms)
        self.prompt += rec.prompt_tokens
        self.completion += rec.completion_tokens
        if rec.prompt_ms is not None:
            self.prompt_ms.append(rec.prompt_ms)
        if rec.decode_ms is not None:
            self.decode_ms.append(rec.decode_ms)
        if rec.cached_tokens is not None:
            source = rec.cached_source
            self.cached_sources[source] = self.cached_sources.get(source, 0) + 1
            self.cached_omitted += rec.cached_omitted
            self.with_cache_info += 1
            self.cached += rec.cached_tokens
            self.prompt_with_cache_info += rec.prompt_tokens
            self.reusable += rec.reusable_tokens

    def _degradation(self, t0: float) -> dict[str, float | None]:
        times = sorted(self.finished)
        n = len(times)
        tenth = n // 10
        if tenth < 2:
            return {"first_tenth_rps": None, "last_tenth_rps": None, "ratio": None}
        first_span = times[tenth - 1] - t0
        last_span = times[-1] - times[n - tenth - 1]
        first = tenth / first_span if first_span > 0 else None
        last = tenth / last_span if last_span > 0 else None
        ratio = last / first if first and last else None
        return {"first_tenth_rps": first, "last_tenth_rps": last, "ratio": ratio}

    def summary(self, elapsed_s: float | None = None, *, scale_to: int = 170_000) -> RunMetrics:
        t0 = self.started_at or 0.0
        if elapsed_s is None:
            elapsed_s = (max(self.finished) - t0) if self.finished else 0.0
        lat = sorted(self.latency)
        savings = self.cached / self.prompt_with_cache_info if self.prompt_with_cache_info else None
        theory = (
            self.reusable / self.prompt_with_cache_info if self.prompt_with_cache_info else None
        )
        efficiency = savings / theory if savings is not None and theory else None
        # Completed requests only: an error or a refusal finishes at once and is no work done.
        rps = self.completed / elapsed_s if elapsed_s > 0 else 0.0
        source = source_label(self.cached_sources)
        return RunMetrics(
            requests=self.requests,
            completed=self.completed,
            errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else 0.0,
            elapsed_s=elapsed_s,
            throughput_rps=rps,
            tokens_per_s=(self.prompt + self.completion) / elapsed_s if elapsed_s > 0 else 0.0,
            tokens={
                "prompt": self.prompt,
                "cached": self.cached,
                "uncached": self.prompt - self.cached,
                "completion": self.completion,
                "reusable_bound": self.reusable,
            },
            token_savings=savings,
            token_savings_theoretical_max=theory,
            savings_efficiency=efficiency,
            cached_source=source,
            uncached_tokens_per_request=(
                (self.prompt_with_cache_info - self.cached) / self.with_cache_info
                if self.with_cache_info
                else None
            ),
            cached_coverage=self.with_cache_info / self.completed if self.completed else None,
            cached_sources=dict(self.cached_sources),
            cached_omitted=self.cached_omitted,
            context_shifts=self.context_shifts,
            latency_ms=LatencyStats(
                p50=percentile(lat, 50),
                p95=percentile(lat, 95),
                p99=percentile(lat, 99),
                mean=sum(lat) / len(lat) if lat else None,
                max=lat[-1] if lat else None,
            ),
            context_trims=sum(self.trims.values()),
            trims_by_reason=dict(self.trims),
            retries=self.retries,
            errors_by_type=dict(self.errors_by_type),
            degradation=self._degradation(t0),
            projected_170k_s=scale_to / rps if rps > 0 else None,
            extra={"endpoints": endpoint_figures(self, elapsed_s)} if self.by_endpoint else {},
        )


_BUCKET = math.log(1.02)
_FLOOR_MS = 0.01


class EndpointTally:
    """One server's figures in a pool run, in constant memory (counts, and latencies in
    buckets 2% wide, so its percentiles are within 2%; mean and max are exact): a
    million-request run keeps no per-request state per server."""

    __slots__ = (
        "buckets", "cached", "completed", "errors", "errors_by_type", "latency_max",
        "latency_sum", "prompt", "prompt_with_cache_info", "requests", "retries",
        "with_cache_info",
    )  # fmt: skip

    def __init__(self) -> None:
        self.requests = self.completed = self.errors = self.retries = 0
        self.prompt = self.cached = self.prompt_with_cache_info = self.with_cache_info = 0
        self.latency_sum = self.latency_max = 0.0
        self.errors_by_type: dict[str, int] = {}
        self.buckets: dict[int, int] = {}

    def add(self, rec: RequestRecord) -> None:
        self.requests += 1
        self.retries += max(0, rec.attempts - 1)
        if not rec.ok:
            self.errors += 1
            count_error(self.errors_by_type, rec)
            return
        self.completed += 1
        ms = rec.latency_ms
        self.latency_sum += ms
        self.latency_max = max(self.latency_max, ms)
        k = int(math.log(max(ms, _FLOOR_MS) / _FLOOR_MS) / _BUCKET)
        self.buckets[k] = self.buckets.get(k, 0) + 1
        self.prompt += rec.prompt_tokens
        if rec.cached_tokens is not None:
            self.with_cache_info += 1
            self.cached += rec.cached_tokens
            self.prompt_with_cache_info += rec.prompt_tokens

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0–100) of completed requests' latency, to 2%."""
        if not self.completed:
            return None
        rank = q / 100.0 * (self.completed - 1)
        seen = 0
        for k in sorted(self.buckets):
            seen += self.buckets[k]
            if seen > rank:
                return min(_FLOOR_MS * math.exp((k + 0.5) * _BUCKET), self.latency_max)
        return self.latency_max

    def figures(self, elapsed_s: float) -> dict[str, Any]:
        info = self.prompt_with_cache_info
        return {
            "rows": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "errors_by_type": dict(self.errors_by_type),
            "retries": self.retries,
            "throughput_rps": self.completed / elapsed_s if elapsed_s > 0 else 0.0,
            "token_savings": self.cached / info if info else None,
            "uncached_tokens_per_request": (
                (info - self.cached) / self.with_cache_info if self.with_cache_info else None
            ),
            "latency_ms": {
                "p50": self.percentile(50),
                "p95": self.percentile(95),
                "p99": self.percentile(99),
                "mean": self.latency_sum / self.completed if self.completed else None,
                "max": self.latency_max if self.completed else None,
                "resolution": "percentiles within 2% (bucketed); mean and max exact",
            },
        }


def endpoint_figures(collector: MetricsCollector, elapsed_s: float) -> dict[str, dict[str, Any]]:
    """Per server of a pool: rows (requests recorded), completed, errors, req/s over the run's
    `elapsed_s`, token savings, uncached prompt tokens per request, latency percentiles."""
    return {name: t.figures(elapsed_s) for name, t in collector.by_endpoint.items()}


def memory_slope(
    samples: Sequence[tuple[float, int]], *, skip_fraction: float = 0.1
) -> dict[str, float | None]:
    """Leak figures from (time, bytes) samples: slope in bytes/hour after a warm-up share."""
    if len(samples) < 3:
        return {"bytes_per_hour": None, "r_squared": None, "growth_bytes": None}
    start = int(len(samples) * skip_fraction)
    use = samples[start:] if len(samples) - start >= 3 else samples
    xs = [t for t, _ in use]
    ys = [float(b) for _, b in use]
    try:
        slope, _, r2 = linear_fit(xs, ys)
    except ValueError:
        return {"bytes_per_hour": None, "r_squared": None, "growth_bytes": None}
    return {"bytes_per_hour": slope * 3600.0, "r_squared": r2, "growth_bytes": ys[-1] - ys[0]}
