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

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from harness.memory import NvmlProbe, NvmlUnavailable, is_loopback_url, system_memory_bytes
from harness.models import ModelGeometry, geometry_from_gguf, resolve_model
from harness.phases import context_shape, items_for, prompt_for, recommended_trim_interval
from harness.phases.common import longest_rows, reply_tokens
from harness.phases.context_limits import (
    limits_figures,
    longest_prompt_figures,
    other_layout_kv,
    recommended_config,
    theory_or_none,
)
from harness.pytest import HarnessSession
from harness.reuse import ReuseRow, reuse_fall, reuse_sweep
from harness.run.settings import RunConfig

SCENARIO = "phase1_context_limits.yaml"
REUSE_SCENARIO = "prefix_reuse.yaml"
# On Ollama the README budgets phase 1 at 30-60 minutes (a fresh load per context size): two
# hours, not pyproject's 15-minute default (tests/test_suite_timeouts.py checks it).
pytestmark = [pytest.mark.context_limits, pytest.mark.integration, pytest.mark.timeout(7200)]


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
        url = harness.backend(cfg).info.base_url
        if not harness.memory_budget and not scenario_budget and not is_loopback_url(url):
            # This machine's RAM or GPU says nothing of a server elsewhere: a budget read here
            # would size the context for the wrong machine.
            pytest.exit(
                f"context limits: the server at {url} is not on this machine, so its memory "
                "cannot be read here: give --harness-memory-budget (e.g. 15GB or 90%: what the "
                "model may use there)",
                returncode=pytest.ExitCode.USAGE_ERROR,
            )
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
    probe, geom = probe_and_geometry(harness, cfg)
    sizes = [
        n for n in (profile.sweep or []) if not geom.context_length or n <= geom.context_length
    ]
    assert len(sizes) >= 2, f"{scenario.path}: the sweep needs two sizes within the trained context"
    budget, budget_source = memory_budget(harness, cfg, profile.memory_budget)
    measured, skipped = sweep(probe, sizes, budget, on_measure=show(harness))
    fit = fit_memory(measured)
    search = search_max_context(
        probe,
        measured,
        fit,
        budget,
        trained=geom.context_length,
        step=256,
        on_measure=show(harness),
    )
    backend, tokens, widest = shapes(harness, cfg, scenario)
    flags = cfg.server_flags.value if cfg.backend.value == "embedded" else None
    recommended = recommended_config(
        max_ctx=search.max_context_tokens, fit=fit, parallel=cfg.parallel.value, server_flags=flags
    )
    theory, theory_note = theory_or_none(geom)
    figures = limits_figures(
        model=cfg.model.value,
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
    figures.update(
        longest_prompt_figures(widest, figures["safe_context_tokens"], 20, input_name(scenario)),
        server_flags=flags,
        trim_interval_that_fits=recommended_trim_interval(figures["safe_context_tokens"], tokens),
        config=cfg.to_dict(),
    )
    if cfg.backend.value == "embedded":
        figures["kv_other_layout"] = other_layout_kv(
            cfg.model.value, sizes, server_flags=cfg.server_flags.value, on_measure=show(harness)
        )
    report = harness.report("context_limit_results.json", scenario, figures, backend=backend)
    say_limits(harness, figures)
    # Neither the sweep nor the search ever loaded a server over the budget.
    assert figures["within_budget"], "a server was started whose memory exceeded the budget"
    harness.gate(report)
    # Only a phase that passed writes its figures to harness.yaml.
    harness.recommend(recommended, report, backend, configured=given_to_phase(cfg))


def given_to_phase(cfg: RunConfig) -> dict[str, str]:
    """The values phase 1 writes that it was given, not measured: the slots and the flags."""
    return {
        "parallel": f"the context was measured with it: {cfg.parallel.source}",
        "SERVER_FLAGS": f"the memory was measured with them: {cfg.server_flags.source}",
    }


def input_name(scenario: Any) -> str | None:
    """The user's input file's name (None: the phase draws generated or its own rows)."""
    job = scenario.job or {}
    return Path(job["candidates"]).name if "candidates" in job else None


def shapes(
    harness: HarnessSession, cfg: RunConfig, scenario: Any
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """On the run's server (stopped after): the workload's tokens (the shared rubric, one
    exchange: they bound the trim interval) and those of its longest prompts (the rubric, the
    input's 20 longest rows and their replies: they must fit the safe context)."""
    backend = harness.backend(cfg)
    tokens = harness.run(workload_shape(backend, items_for(scenario, harness.profile, 20)))
    longest = longest_rows(scenario, harness.profile, 20)
    widest = harness.run(
        workload_shape(backend, items_for(scenario, harness.profile, table=longest))
    )
    harness.release(backend)
    return backend, tokens, widest


def show(harness: HarnessSession) -> Callable[[Measurement], None]:
    def say(m: Measurement) -> None:
        shown = f"{m.memory_bytes / 2**20:.1f} MiB" if m.memory_bytes else f"failed: {m.error}"
        harness.say(f"context limits: n_ctx {m.n_ctx}: {shown} ({m.source}, {m.seconds:.1f} s)")

    return say


def say_limits(harness: HarnessSession, f: dict[str, Any]) -> None:
    other = f.get("kv_other_layout") or {}
    harness.say(
        f"context limits ({f['server_flags'] or 'ollama'}): base "
        f"{f['base_model_memory_bytes'] / 2**20:.1f} MiB, KV {f['kv_bytes_per_token']:.0f} B/token "
        f"(theory {f['kv_bytes_per_token_theory']}, R² {f['r_squared']:.4f}); "
        f"{other.get('layout', '')}: {other.get('kv_bytes_per_token') or 0:.0f} B/token; max "
        f"context {f['max_context_tokens']} ({f['limited_by']}), safe {f['safe_context_tokens']}, "
        f"trim interval that fits {f['trim_interval_that_fits']}"
    )


def test_prefix_reuse_by_candidate_length(harness: HarnessSession) -> None:
    scenario = harness.scenario(REUSE_SCENARIO)
    opts = scenario.profile(harness.profile).options
    cfg = harness.run_config(scenario)
    if cfg.backend.value == "ollama":
        paths, production = ["ollama"], "ollama"
    else:
        paths = [str(p) for p in opts.get("paths", ["chat", "text"])]
        production = str(opts.get("production_path", "text"))
    assert production in paths, f"{scenario.path}: production_path {production!r} not in {paths}"
    backend = harness.backend(cfg)
    prompt = prompt_for(scenario, harness.profile)
    rows = harness.run(
        sweep_reuse(backend, prompt.system, opts, paths, reply_tokens(scenario, harness.profile))
    )
    for r in rows:
        harness.say(
            f"prefix reuse: {r.path} path, ~{r.candidate_tokens:.0f} tokens after the rubric: "
            f"{r.reused} of {r.rubric_tokens} rubric tokens reused (cached {r.cached})"
        )
    # The row nearest the workload's own candidates (tokens after the rubric, reply included).
    shape = harness.run(workload_shape(backend, items_for(scenario, harness.profile, 20)))
    prod = [r for r in rows if r.path == production]
    at = min(prod, key=lambda r: abs(r.candidate_tokens - shape["tokens_per_exchange"]))
    known = [r.reused_fraction for r in prod if r.reused_fraction is not None]
    figures = {
        "model": cfg.model.value,
        "rubric_prompt": prompt.name,
        "production_path": production,
        "rows": [r.to_dict() for r in rows],
        "workload_candidate_tokens": shape["tokens_per_exchange"],
        "prefix_reuse_at_workload": at.reused_fraction,
        "prefix_reuse_min": min(known) if known else None,
        "reuse_falls_at_tokens": {p: reuse_fall(rows, p) for p in paths},
        "llama_server_args": backend.info.extra.get("llama_server_args"),
        "config": cfg.to_dict(),
    }
    harness.release(backend)
    report = harness.report("prefix_reuse_results.json", scenario, figures, backend=backend)
    harness.gate(report)


async def sweep_reuse(
    backend: Any, rubric: str, opts: dict[str, Any], paths: list[str], max_tokens: int
) -> list[ReuseRow]:
    async with open_token_counter(backend) as counter:
        return await reuse_sweep(
            backend,
            counter,
            rubric=rubric,
            user_prefix="Candidate profile.",
            lengths=[int(n) for n in opts.get("lengths", [100, 400, 800, 1600])],
            paths=paths,
            requests=int(opts.get("requests", 3)),
            max_tokens=max_tokens,
        )


async def workload_shape(backend: Any, items: list[Any]) -> dict[str, float]:
    async with open_token_counter(backend) as counter:
        return await context_shape(counter, items)
