"""Phase 1: model memory, KV-cache memory per token, the largest context before OOM, a safe
threshold (80%) and a trim interval — measured, with a fresh server per context size, started
with the flags the later phases and `harness run` use (Ollama's by default). Then how much of
the rubric the server reuses by candidate length (`prefix_reuse_results.json`).

    pytest suites/context_limits                          # embedded default (CPU, RSS)
    pytest suites/context_limits --memory-budget 450MB    # a budget inside the sweep
    pytest suites/context_limits --harness-backend ollama # Gemma 3 12B on a GPU (NVML, /api/ps)
    pytest suites/context_limits --write-config           # write the values to harness.yaml
"""

from __future__ import annotations

import pytest

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
from harness.models import ModelGeometry, geometry_from_gguf, resolve_model
from harness.phases import context_shape, items_for, prompt_for, recommended_trim_interval
from harness.phases.context_limits import (
    SAFE_FRACTION,
    limits_figures,
    other_layout_kv,
    recommended_config,
    theory_or_none,
)
from harness.pytest import HarnessSession
from harness.reuse import ReuseRow, reuse_fall, reuse_sweep
from harness.runconfig import RunConfig

SCENARIO = "phase1_context_limits.yaml"
REUSE_SCENARIO = "prefix_reuse.yaml"
pytestmark = [pytest.mark.context_limits, pytest.mark.integration]


def probe_and_geometry(
    harness: HarnessSession, cfg: RunConfig
) -> tuple[ContextProbe, ModelGeometry]:
    model = cfg.model.value
    if cfg.backend.value == "embedded":
        probe = EmbeddedContextProbe(
            model,
            parallel=cfg.parallel.value,
            server_flags=cfg.server_flags.value,
            swa_full=cfg.swa_full.value,
        )
        return probe, geometry_from_gguf(resolve_model(model).path)
    if cfg.backend.value == "ollama":
        backend = harness.backend(cfg)
        geom = harness.run(backend.model_geometry())
        assert geom is not None
        return OllamaContextProbe(model, cfg.base_url.value), geom
    pytest.skip("context limits restart the server per size: use the embedded or ollama backend")


def memory_budget(
    harness: HarnessSession, cfg: RunConfig, scenario_budget: str | None
) -> tuple[int, str]:
    gpu_total: int | None = None
    if cfg.backend.value != "embedded":
        try:
            gpu_total = NvmlProbe().total_bytes()
        except NvmlUnavailable:
            gpu_total = None
    total = gpu_total or system_memory_bytes()
    if harness.memory_budget:
        return parse_bytes(harness.memory_budget, total=total), "--harness-memory-budget"
    if scenario_budget:
        return parse_bytes(scenario_budget, total=total), "scenario"
    if gpu_total:
        return gpu_total, "GPU total (NVML)"
    return total, "system memory"


def test_context_limits(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    profile = scenario.profile(harness.profile)
    cfg = harness.run_config(scenario)
    model = cfg.model.value
    probe, geom = probe_and_geometry(harness, cfg)
    theory, theory_note = theory_or_none(geom)
    sizes = [
        n for n in (profile.sweep or []) if not geom.context_length or n <= geom.context_length
    ]
    assert len(sizes) >= 2, f"{scenario.path}: the sweep needs two sizes within the trained context"

    def show(m: Measurement) -> None:
        shown = f"{m.memory_bytes / 2**20:.1f} MiB" if m.memory_bytes else f"failed: {m.error}"
        harness.say(f"context limits: n_ctx {m.n_ctx}: {shown} ({m.source}, {m.seconds:.1f} s)")

    budget, budget_source = memory_budget(harness, cfg, profile.memory_budget)
    measured, skipped = sweep(probe, sizes, budget, on_measure=show)
    fit = fit_memory(measured)
    search = search_max_context(
        probe, measured, fit, budget, trained=geom.context_length, step=256, on_measure=show
    )
    safe = int(search.max_context_tokens * SAFE_FRACTION)

    # Tokens of the workload (shared rubric, one exchange) give the trim interval.
    items = items_for(scenario, harness.profile, 20)

    backend = harness.backend(cfg)

    async def shape() -> dict[str, float]:
        async with open_token_counter(backend) as counter:
            return await context_shape(counter, items)

    tokens = harness.run(shape())
    harness.release(backend)
    interval = recommended_trim_interval(safe, tokens)
    flags = cfg.server_flags.value if cfg.backend.value == "embedded" else None
    recommended = recommended_config(
        max_ctx=search.max_context_tokens,
        fit=fit,
        interval=interval,
        parallel=cfg.parallel.value,
        server_flags=flags,
    )
    figures = limits_figures(
        model=model,
        geom=geom,
        theory=theory,
        theory_note=theory_note,
        measured=measured,
        skipped=skipped,
        fit=fit,
        search=search,
        budget=budget,
        budget_source=budget_source,
        tokens=tokens,
        recommended=recommended,
    )
    figures["server_flags"] = flags
    figures["config"] = cfg.to_dict()
    if cfg.backend.value == "embedded":
        figures["kv_other_layout"] = other_layout_kv(
            model, sizes, server_flags=cfg.server_flags.value, on_measure=show
        )
    report = harness.report("context_limit_results.json", scenario, figures, backend=backend)
    other = figures.get("kv_other_layout") or {}
    harness.say(
        f"context limits ({flags or cfg.backend.value}): base {fit.intercept / 2**20:.1f} MiB, "
        f"KV {fit.slope:.0f} B/token (theory {figures['kv_bytes_per_token_theory']}, "
        f"R² {fit.r_squared:.4f}); {other.get('layout', '')}: "
        f"{other.get('kv_bytes_per_token') or 0:.0f} B/token; max context "
        f"{search.max_context_tokens} ({search.limited_by}, budget {budget / 2**20:.0f} MiB), "
        f"safe {safe}, trim every {interval}"
    )
    # Neither the sweep nor the search ever loaded a server over the budget.
    assert figures["within_budget"], "a server was started whose memory exceeded the budget"
    harness.gate(report)
    # Only a phase that passed writes its figures to harness.yaml.
    harness.recommend(recommended, harness.report_dir / "context_limit_results.json", None)


def test_prefix_reuse_by_candidate_length(harness: HarnessSession) -> None:
    scenario = harness.scenario(REUSE_SCENARIO)
    profile = scenario.profile(harness.profile)
    cfg = harness.run_config(scenario)
    opts = profile.options
    lengths = [int(n) for n in opts.get("lengths", [100, 400, 800, 1600])]
    if cfg.backend.value == "ollama":
        paths = ["ollama"]
        production = "ollama"
    else:
        paths = [str(p) for p in opts.get("paths", ["chat", "text"])]
        production = str(opts.get("production_path", "text"))
    backend = harness.backend(cfg)
    wl = scenario.workload_for(harness.profile)
    prompt = prompt_for(scenario, harness.profile)

    async def measure() -> list[ReuseRow]:
        async with open_token_counter(backend) as counter:
            return await reuse_sweep(
                backend,
                counter,
                rubric=prompt.system,
                user_prefix="Candidate profile.",
                lengths=lengths,
                paths=paths,
                requests=int(opts.get("requests", 3)),
                max_tokens=wl.max_tokens,
            )

    rows = harness.run(measure())
    harness.release(backend)
    for r in rows:
        harness.say(
            f"prefix reuse: {r.path} path, ~{r.candidate_tokens:.0f} tokens after the rubric: "
            f"{r.reused} of {r.rubric_tokens} rubric tokens reused (cached {r.cached})"
        )
    workload_row = min((r for r in rows if r.path == production), key=lambda r: r.candidate_tokens)
    prod = [
        r.reused_fraction for r in rows if r.path == production and r.reused_fraction is not None
    ]
    figures = {
        "model": cfg.model.value,
        "rubric_prompt": prompt.name,
        "production_path": production,
        "rows": [r.to_dict() for r in rows],
        "prefix_reuse_at_workload": workload_row.reused_fraction,
        "prefix_reuse_min": min(prod) if prod else None,
        "reuse_falls_at_tokens": {p: reuse_fall(rows, p) for p in paths},
        "num_batch": backend.info.extra.get("llama_server_args"),
        "config": cfg.to_dict(),
    }
    report = harness.report("prefix_reuse_results.json", scenario, figures, backend=backend)
    harness.gate(report)
