"""What the phase suites share: workloads from scenarios, the shape of a workload's prompts,
and the figures of a scale report. Suites stay thin; the logic lives here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.engine.job import JobResult
from harness.engine.tokens import TokenCounter
from harness.metrics import RunMetrics
from harness.scenarios import Scenario
from harness.workload import (
    CandidateTable,
    PromptSpec,
    WorkItem,
    generate_candidates,
    items_from_table,
    load_prompt,
    read_candidates_csv,
)

__all__ = [
    "context_shape",
    "items_for",
    "projection_check",
    "prompt_for",
    "recommended_trim_interval",
    "scale_figures",
]

GB = 1e9
MB = 1e6


def prompt_for(scenario: Scenario, profile: str) -> PromptSpec:
    """The scenario's prompt file (relative to the scenario), default the recruiter rubric."""
    wl = scenario.workload_for(profile)
    return load_prompt(Path(scenario.path).parent / wl.prompt if wl.prompt else None)


def items_for(scenario: Scenario, profile: str, n: int | None = None) -> list[WorkItem]:
    """The scenario's work items (its workload with the profile's overrides)."""
    wl = scenario.workload_for(profile)
    base = Path(scenario.path).parent
    prompt = prompt_for(scenario, profile)
    count = n or wl.requests or 100
    if wl.candidates == "generated":
        rows = tuple(generate_candidates(count, seed=wl.seed))
        table = CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, count + 2)))
    else:
        table = read_candidates_csv(base / wl.candidates)
        table = CandidateTable(
            table.path, table.columns, table.id_column, table.rows[:count], table.lines[:count]
        )
    return items_from_table(
        table,
        prompt,
        max_tokens=wl.max_tokens,
        temperature=wl.temperature,
        seed=wl.seed,
        structured=wl.structured,
    )


async def context_shape(counter: TokenCounter, items: Sequence[WorkItem]) -> dict[str, float]:
    """Tokens of the shared prefix and of one exchange (candidate turn + reply room)."""
    await counter.prepare(it.messages for it in items)
    first = items[0]
    prefix = len(await counter.count(list(first.prefix), add_generation_prompt=False)) + 1
    per_turn = []
    for it in items:
        whole = len(await counter.count(list(it.messages), add_generation_prompt=True))
        # The turn's tokens, plus the reply and its closing tokens when it joins the history.
        per_turn.append(whole - prefix + (it.max_tokens or 0) + 2)
    return {
        "prefix_tokens": float(prefix),
        "tokens_per_exchange": sum(per_turn) / len(per_turn),
        "max_tokens": float(first.max_tokens or 0),
    }


def recommended_trim_interval(safe_tokens: int, shape: Mapping[str, float]) -> int:
    """Exchanges that fit between the shared prefix and the safe threshold."""
    room = safe_tokens - shape["prefix_tokens"] - shape["max_tokens"]
    return max(1, math.floor(room / shape["tokens_per_exchange"]))


def projection_check(report_dir: Path, size: int, elapsed_s: float) -> dict[str, Any] | None:
    """Compare this run's time with what the largest smaller run's rate predicted."""
    best: tuple[int, dict[str, Any]] | None = None
    for path in report_dir.glob("performance_benchmarks_*.json"):
        try:
            n = int(path.stem.rsplit("_", 1)[1])
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if data.get("finished") is False:
            continue  # a run that stopped part-way predicts nothing
        if n < size and data.get("throughput_rps") and (best is None or n > best[0]):
            best = (n, data)
    if best is None:
        return None
    n, data = best
    predicted = size / float(data["throughput_rps"])
    return {
        "from_requests": n,
        "from_report": f"performance_benchmarks_{n}.json",
        "predicted_s": predicted,
        "actual_s": elapsed_s,
        "error": elapsed_s / predicted - 1.0,
    }


def scale_figures(
    result: JobResult,
    *,
    size: int,
    planned: int | None = None,
    report_dir: Path,
    energy_wh: float | None = None,
    price_per_kwh: float = 0.30,
    model_note: str = "",
    server_name: str = "the server",
) -> dict[str, Any]:
    """The figures of a scale report (performance_benchmarks_<N>.json)."""
    m = result.metrics
    server = result.memory.get("server") or {}
    gpu = result.memory.get("gpu") or {}
    runner = result.memory.get("runner") or {}
    # Read from the device when the server is on this machine's GPU; else what the server
    # (its process RSS, Ollama's /api/ps) says.
    primary = gpu or server
    peak = primary.get("peak_bytes")
    projection = projection_check(report_dir, size, m.elapsed_s) if result.error is None else None
    return {
        "requests_planned": planned if planned is not None else size,
        "requests": m.requests,
        "completed": m.completed,
        "finished": result.error is None,
        "stopped_by": result.error,
        "errors": m.errors,
        "error_rate": m.error_rate,
        "errors_by_type": m.errors_by_type,
        "elapsed_s": m.elapsed_s,
        "throughput_rps": m.throughput_rps,
        "tokens_per_s": m.tokens_per_s,
        "tokens": m.tokens,
        "token_savings": m.token_savings,
        "token_savings_theoretical_max": m.token_savings_theoretical_max,
        "savings_efficiency": m.savings_efficiency,
        "cached_tokens_source": m.cached_source,
        "cached_sources": m.cached_sources,
        "cached_coverage": m.cached_coverage,
        "uncached_tokens_per_request": m.uncached_tokens_per_request,
        "context_shifts": m.context_shifts,
        "unknown_reasons": _unknown_reasons(m, server_name),
        "token_counts_source": result.token_counter,
        "latency_ms": {
            "p50": m.latency_ms.p50,
            "p95": m.latency_ms.p95,
            "p99": m.latency_ms.p99,
            "mean": m.latency_ms.mean,
        },
        "context_trims": m.context_trims,
        "trims_by_reason": m.trims_by_reason,
        "retries": m.retries,
        "memory": {
            "peak_bytes": peak,
            "peak_gb": peak / GB if peak is not None else None,
            "source": primary.get("source"),
            "kind": primary.get("kind"),
            "spilled": bool(server.get("spilled")),
            "server_peak_bytes": server.get("peak_bytes"),
            "server_source": server.get("source"),
            "gpu_peak_bytes": gpu.get("peak_bytes"),
            "gpu_source": gpu.get("source"),
            "runner_peak_bytes": runner.get("peak_bytes"),
        },
        "leak": {
            "server_bytes_per_hour": (server.get("leak") or {}).get("bytes_per_hour"),
            "runner_bytes_per_hour": (runner.get("leak") or {}).get("bytes_per_hour"),
            "server_growth_bytes": (server.get("leak") or {}).get("growth_bytes"),
            "runner_growth_bytes": (runner.get("leak") or {}).get("growth_bytes"),
        },
        "degradation": m.degradation,
        "projected_170k_s": m.projected_170k_s,
        "projection": projection,
        "projection_error": projection["error"] if projection else None,
        "energy_wh": energy_wh,
        "cost": energy_wh / 1000.0 * price_per_kwh if energy_wh is not None else None,
        "price_per_kwh": price_per_kwh,
        "model_note": model_note,
    }


def _unknown_reasons(m: RunMetrics, server: str) -> dict[str, str]:
    """Why figures are unknown, for the criteria's messages."""
    reasons: dict[str, str] = {}
    if not m.cached_coverage:
        why = f"cached prompt tokens not reported by {server}"
        if server.startswith("ollama"):
            why += " (Ollama reports prompt_eval_cached_count from 0.33.x on)"
        for key in ("token_savings", "savings_efficiency", "uncached_tokens_per_request"):
            reasons[key] = why
    return reasons
