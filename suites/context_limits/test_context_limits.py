"""Phase 1: model memory, KV-cache memory per token, the largest context before OOM, a safe
threshold (80%) and a trim interval — measured, with a fresh server per context size.

    pytest suites/context_limits                          # embedded default (CPU, RSS)
    pytest suites/context_limits --memory-budget 450MB    # a budget inside the sweep
    pytest suites/context_limits --harness-backend ollama # Gemma 3 12B on a GPU (/api/ps)
    pytest suites/context_limits --write-config           # write the values to harness.yaml
"""

from __future__ import annotations

import pytest

from harness.backends.embedded import EmbeddedBackend
from harness.engine.job import open_token_counter
from harness.limits import (
    ContextProbe,
    EmbeddedContextProbe,
    Measurement,
    OllamaContextProbe,
    fit_memory,
    parse_bytes,
    search_max_context,
    sweep,
)
from harness.memory import NvmlProbe, NvmlUnavailable, system_memory_bytes
from harness.models import ModelGeometry, geometry_from_gguf, kv_theory, resolve_model
from harness.phases import context_shape, items_for, recommended_trim_interval
from harness.plugin import HarnessSession

SCENARIO = "phase1_context_limits.yaml"
pytestmark = [pytest.mark.context_limits, pytest.mark.integration]


def probe_and_geometry(harness: HarnessSession, model: str) -> tuple[ContextProbe, ModelGeometry]:
    if harness.backend_name == "embedded":
        return EmbeddedContextProbe(model), geometry_from_gguf(resolve_model(model).path)
    if harness.backend_name == "ollama":
        backend = harness.backend(model=model)
        geom = harness.run(backend.model_geometry())
        assert geom is not None
        return OllamaContextProbe(model, harness.base_url), geom
    pytest.skip("context limits restart the server per size: use the embedded or ollama backend")


def memory_budget(harness: HarnessSession, scenario_budget: str | None) -> tuple[int, str]:
    gpu_total: int | None = None
    if harness.backend_name != "embedded":
        try:
            gpu_total = NvmlProbe().total_bytes()
        except NvmlUnavailable:
            gpu_total = None
    total = gpu_total or system_memory_bytes()
    if harness.memory_budget:
        return parse_bytes(harness.memory_budget, total=total), "--memory-budget"
    if scenario_budget:
        return parse_bytes(scenario_budget, total=total), "scenario"
    if gpu_total:
        return gpu_total, "GPU total (NVML)"
    return total, "system memory"


def test_context_limits(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    profile = scenario.profile(harness.profile)
    model = harness.model_for(scenario)
    probe, geom = probe_and_geometry(harness, model)
    theory = kv_theory(geom)
    sizes = [
        n for n in (profile.sweep or []) if not geom.context_length or n <= geom.context_length
    ]
    assert len(sizes) >= 2, f"{scenario.path}: the sweep needs two sizes within the trained context"

    def show(m: Measurement) -> None:
        shown = f"{m.memory_bytes / 2**20:.1f} MiB" if m.memory_bytes else f"failed: {m.error}"
        harness.say(f"context limits: n_ctx {m.n_ctx}: {shown} ({m.source}, {m.seconds:.1f} s)")

    budget, budget_source = memory_budget(harness, profile.memory_budget)
    measured, skipped = sweep(probe, sizes, budget, on_measure=show)
    fit = fit_memory(measured)
    search = search_max_context(
        probe, measured, fit, budget, trained=geom.context_length, step=256, on_measure=show
    )
    max_ctx = search.max_context_tokens
    safe = int(max_ctx * 0.8)

    # Tokens of the workload (shared rubric, one exchange) give the trim interval.
    items = items_for(scenario, harness.profile, 20)

    async def shape() -> dict[str, float]:
        if harness.backend_name == "embedded":
            async with (
                EmbeddedBackend(model, n_ctx=2048) as backend,
                open_token_counter(backend) as counter,
            ):
                return await context_shape(counter, items)
        backend = harness.backend(model=model)
        async with open_token_counter(backend) as counter:
            return await context_shape(counter, items)

    tokens = harness.run(shape())
    interval = recommended_trim_interval(safe, tokens)
    measured_max = max((m.memory_bytes or 0) for m in [*measured, *search.steps])
    recommended = {
        "MAX_CONTEXT_TOKENS": max_ctx,
        "CONTEXT_TRIM_THRESHOLD": safe,
        "TRIM_INTERVAL": interval,
        "MODEL_VRAM_GB": round(fit.intercept / 1e9, 3),
        "KV_CACHE_PER_TOKEN_MB": round(fit.slope / 1e6, 6),
        "n_ctx": max_ctx,
        "parallel": profile.parallel,
    }
    figures = {
        "model": model,
        "model_geometry": {
            "layers": geom.n_layers,
            "kv_heads": geom.n_kv_heads,
            "key_length": geom.key_length,
            "sliding_window": geom.sliding_window,
            "global_layers": list(geom.global_layers),
            "trained_context": geom.context_length,
            "source": geom.source,
        },
        "measurements": [
            {"n_ctx": m.n_ctx, "memory_bytes": m.memory_bytes, "source": m.source, "ok": m.ok}
            for m in measured
        ],
        "sweep_skipped_predicted_over_budget": skipped,
        "search_measurements": [m.to_dict() for m in search.steps],
        "search_steps": len(search.steps),
        "search_skipped_predicted_over_budget": search.skipped,
        "base_model_memory_bytes": fit.intercept,
        "kv_bytes_per_token": fit.slope,
        "kv_bytes_per_token_theory": theory.bytes_per_token_growing,
        "kv_bytes_per_token_theory_no_window": theory.bytes_per_token_all_layers,
        "kv_theory_ratio": fit.slope / theory.bytes_per_token_growing,
        "r_squared": fit.r_squared,
        "memory_budget_bytes": budget,
        "memory_budget_source": budget_source,
        "budget_crossing_tokens": search.crossing_estimate,
        "max_context_tokens": max_ctx,
        "limited_by": search.limited_by,
        "max_measured_bytes": measured_max,
        "safe_context_tokens": safe,
        "workload_tokens": tokens,
        "recommended": recommended,
    }
    report = harness.report("context_limit_results.json", scenario, figures)
    harness.recommend(recommended, harness.report_dir / "context_limit_results.json", None)
    harness.say(
        f"context limits: base {fit.intercept / 2**20:.1f} MiB, KV {fit.slope:.0f} B/token "
        f"(theory {theory.bytes_per_token_growing:.0f}, R² {fit.r_squared:.4f}); max context "
        f"{max_ctx} ({search.limited_by}, budget {budget / 2**20:.0f} MiB), safe {safe}, "
        f"trim every {interval}"
    )
    harness.gate(report)
    # Neither the sweep nor the search ever loaded a server over the budget.
    assert measured_max <= budget, "a server was started whose memory exceeded the budget"
