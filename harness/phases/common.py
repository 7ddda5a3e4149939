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
from harness.scenarios import Scenario, lookup
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
    "phase1_budget",
    "projection_check",
    "prompt_for",
    "recommended_trim_interval",
    "run_identity",
    "scale_figures",
    "table_for",
]

GB = 1e9
MB = 1e6


def prompt_for(scenario: Scenario, profile: str) -> PromptSpec:
    """The scenario's prompt file (relative to the scenario), default the recruiter rubric."""
    wl = scenario.workload_for(profile)
    return load_prompt(Path(scenario.path).parent / wl.prompt if wl.prompt else None)


def table_for(scenario: Scenario, profile: str, n: int | None = None) -> CandidateTable:
    """The scenario's candidates (generated, or its CSV), the first `n` of them."""
    wl = scenario.workload_for(profile)
    count = n or wl.requests or 100
    if wl.candidates == "generated":
        rows = tuple(generate_candidates(count, seed=wl.seed))
        return CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, count + 2)))
    table = read_candidates_csv(Path(scenario.path).parent / wl.candidates)
    return CandidateTable(
        table.path, table.columns, table.id_column, table.rows[:count], table.lines[:count]
    )


def items_for(
    scenario: Scenario,
    profile: str,
    n: int | None = None,
    *,
    table: CandidateTable | None = None,
) -> list[WorkItem]:
    """The scenario's work items (its workload with the profile's overrides)."""
    wl = scenario.workload_for(profile)
    prompt = prompt_for(scenario, profile)
    if table is None:
        table = table_for(scenario, profile, n)
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


def phase1_budget(report_dir: Path, profile: str) -> tuple[int, str] | None:
    """Phase 1's memory budget for this profile (from its report), when phase 1 ran."""
    path = report_dir / "context_limit_results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    budget = data.get("memory_budget_bytes")
    if data.get("profile") != profile or not isinstance(budget, int | float):
        return None
    return int(budget), f"phase 1 ({path.name}: {data.get('memory_budget_source')})"


def run_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two scale reports comparable: profile, model, backend and strategy."""
    backend = data.get("backend") if isinstance(data.get("backend"), Mapping) else {}
    strategy = data.get("strategy") if isinstance(data.get("strategy"), Mapping) else {}
    return {
        "profile": data.get("profile"),
        "model": (backend or {}).get("model"),
        "backend": (backend or {}).get("name"),
        "strategy": (strategy or {}).get("name"),
    }


def projection_check(
    report_dir: Path, size: int, elapsed_s: float, identity: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Compare this run's time with what the largest smaller run of the same profile, model,
    backend and strategy predicted; runs of anything else are listed as not comparable."""
    best: tuple[int, dict[str, Any]] | None = None
    others: list[str] = []
    for path in sorted(report_dir.glob("performance_benchmarks_*.json")):
        try:
            n = int(path.stem.rsplit("_", 1)[1])
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if n >= size or not data.get("throughput_rps") or data.get("finished") is False:
            continue  # larger, empty, or stopped part-way: predicts nothing
        theirs = run_identity(data)
        if theirs != dict(identity):
            differ = [k for k in identity if theirs.get(k) != identity[k]]
            others.append(f"{path.name} ({', '.join(f'{k} {theirs.get(k)}' for k in differ)})")
            continue
        if best is None or n > best[0]:
            best = (n, data)
    if best is None:
        if not others:
            return None
        return {"from_report": None, "not_comparable": others, "error": None}
    n, data = best
    predicted = size / float(data["throughput_rps"])
    return {
        "from_requests": n,
        "from_report": f"performance_benchmarks_{n}.json",
        "predicted_s": predicted,
        "actual_s": elapsed_s,
        "error": elapsed_s / predicted - 1.0,
        "not_comparable": others,
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
    identity: Mapping[str, Any] | None = None,
    expected: Mapping[str, Any] | None = None,
    memory_budget: tuple[int, str] | None = None,
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
    projection = None
    if result.error is None and identity is not None:
        projection = projection_check(report_dir, size, m.elapsed_s, identity)
    figures: dict[str, Any] = {
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
            "gpu_bytes_per_hour": (gpu.get("leak") or {}).get("bytes_per_hour"),
            "server_growth_bytes": (server.get("leak") or {}).get("growth_bytes"),
            "runner_growth_bytes": (runner.get("leak") or {}).get("growth_bytes"),
        },
        "degradation": m.degradation,
        "projected_170k_s": m.projected_170k_s,
        "projection": projection,
        "projection_error": projection["error"] if projection else None,
        "eta": result.eta,
        "eta_error_max": result.eta.get("max_abs_error"),
        "overflow_errors": sum(
            m.errors_by_type.get(k, 0) for k in ("ContextOverflow", "OutOfMemory", "LoadFailure")
        ),
        "energy_wh": energy_wh,
        "cost": energy_wh / 1000.0 * price_per_kwh if energy_wh is not None else None,
        "price_per_kwh": price_per_kwh,
        "projected_170k_cost": (
            energy_wh / m.completed * 170_000 / 1000.0 * price_per_kwh
            if energy_wh is not None and m.completed
            else None
        ),
        "model_note": model_note,
        # Over several servers (a pool): each one's rows, req/s, savings, errors, latency, and
        # when it left and why (harness.engine.job.endpoint_report). None for one server.
        "endpoints": result.endpoints or None,
    }
    reasons = figures["unknown_reasons"]
    if projection is None or projection.get("error") is None:
        reasons["projection_error"] = (
            f"no finished smaller scale report of the same profile, model, backend and strategy "
            f"in {report_dir} (run the smaller phases first)"
        )
    if energy_wh is None:
        reasons["projected_170k_cost"] = reasons["cost"] = (
            "energy not measured (NVML reads it only when the server's GPU is on this machine)"
        )
    if not gpu:
        reasons["leak.gpu_bytes_per_hour"] = "no GPU memory reading (NVML) on this machine"
    if memory_budget is None:
        reasons["memory.within_budget"] = (
            f"no phase 1 report of this profile in {report_dir} (run suites/context_limits first)"
        )
    else:
        budget, source = memory_budget
        figures["memory"]["budget_bytes"] = budget
        figures["memory"]["budget_source"] = source
        figures["memory"]["within_budget"] = peak is not None and peak <= budget
    if expected:
        figures["expected_vs_measured"] = {
            key: {"expected": want, "measured": lookup(figures, key)}
            for key, want in expected.items()
        }
    return figures


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
