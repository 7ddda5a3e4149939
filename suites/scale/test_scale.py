"""Phases 2-4, 6, 7: the batch at 100 → 1K → 10K → 50K → 170K requests, through the engine.

    pytest -m scale_100                                  # embedded default (Gemma 3 270M)
    pytest -m scale_1k --harness-model tiny-gemma3 --benchmark-json out.json
    pytest -m scale_10k --harness-backend ollama         # production: Gemma 3 12B on a GPU

Each size writes `reports/performance_benchmarks_<N>.json`; with pytest-benchmark each run is
one pedantic round whose metrics are in `extra_info`. 10K and beyond run only when `-m` names
them. A run's time is checked against the projection from the largest smaller run of the same
profile, model, backend and strategy. A run that stops part-way still writes its report, with
what ran, and fails.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from harness.engine import run_job
from harness.engine.job import JobResult, partial_result
from harness.memory import EnergyMeter, NvmlProbe
from harness.models.registry import resolve_model
from harness.phases import items_for, scale_figures
from harness.phases.common import phase1_budget, phase_job
from harness.pytest import HarnessSession
from harness.run.preflight import fitted, spec_for
from harness.scoring import planned_mode

SIZES = [
    pytest.param(100, "phase2_scale_100.yaml", marks=pytest.mark.scale_100, id="100"),
    pytest.param(1_000, "phase3_scale_1k.yaml", marks=pytest.mark.scale_1k, id="1k"),
    pytest.param(10_000, "phase4_scale_10k.yaml", marks=pytest.mark.scale_10k, id="10k"),
    pytest.param(50_000, "phase6_scale_50k.yaml", marks=pytest.mark.scale_50k, id="50k"),
    pytest.param(170_000, "phase7_scale_170k.yaml", marks=pytest.mark.scale_170k, id="170k"),
]
SCALING_EFFICIENCY = 0.7
"""A pool run's throughput ÷ (its servers × one server's), gated where a pool ran (a scenario's
own `scaling_efficiency` criterion replaces it)."""
# Long phases run for hours on a CPU: no per-test timeout (pytest-timeout), Ctrl-C stops them.
pytestmark = [pytest.mark.scale, pytest.mark.integration, pytest.mark.timeout(0)]


@pytest.mark.parametrize(("size", "scenario_file"), SIZES)
def test_scale(harness: HarnessSession, benchmark: Any, size: int, scenario_file: str) -> None:
    scenario = harness.scenario(scenario_file)
    cfg = harness.run_config(scenario)
    backend = harness.backend(cfg)
    # The run's job, capped to the server (its concurrency per server × the servers).
    spec = phase_job(
        spec_for(cfg, backend, results=None, desc=f"scale {size}"),
        progress_stream=harness.terminal,
    )
    cfg = fitted(cfg, backend)  # the settings the job runs with, for the report
    items = items_for(scenario, harness.profile, size)
    gpu = backend.gpu_probe()  # energy only when the server runs on this machine's GPU
    energy: EnergyMeter | None = None
    with contextlib.ExitStack() as stack:
        if isinstance(gpu, NvmlProbe):
            energy = stack.enter_context(EnergyMeter(gpu))
        try:
            result: JobResult = benchmark.pedantic(
                lambda: harness.run(run_job(backend, items, spec)), rounds=1, iterations=1
            )
        except Exception as exc:  # a run that stops part-way still reports what it measured
            partial = partial_result(exc)
            if partial is None:
                raise
            result = partial
    info = backend.info
    figures = scale_figures(
        result,
        size=size,
        planned=len(items),
        report_dir=harness.report_dir,
        energy_wh=energy.watt_hours if energy is not None else None,
        price_per_kwh=harness.price_per_kwh,
        model_note=resolve_model(cfg.model.value).note if info.backend == "embedded" else "",
        server_name=info.server,
        identity={
            "profile": harness.profile,
            "model": info.model,
            "backend": info.backend,
            "strategy": cfg.strategy.value,
        },
        expected=scenario.profile(harness.profile).expected,
        memory_budget=phase1_budget(harness.report_dir, harness.profile, info.model),
        predicted_memory_gb=cfg.predicted_memory_gb,
        servers=cfg.pool_size,
    )
    figures.update(
        strategy=strategy_figures(cfg),
        config=cfg.to_dict(),
        score_mode=planned_mode(cfg.score_mode.value, items[0].output_schema if items else None),
        energy_source=f"{gpu.source} ({gpu.device_name()}): {energy.method}"
        if energy is not None and isinstance(gpu, NvmlProbe)
        else None,
    )
    benchmark.extra_info.update(figures)
    harness.release(backend)  # a 2-core machine: an idle server still takes CPU from the next
    report_and_gate(harness, scenario, figures, backend, size, len(items), result)


def strategy_figures(cfg: Any) -> dict[str, Any]:
    policy = cfg.policy
    return {
        "name": cfg.strategy.value,
        "max_context_tokens": policy.max_context_tokens,
        "trim_threshold": policy.threshold,
        "trim_interval": policy.trim_interval,
        "concurrency": cfg.concurrency.value,
        "servers": cfg.pool_size,
    }


def report_and_gate(
    harness: HarnessSession,
    scenario: Any,
    figures: dict[str, Any],
    backend: Any,
    size: int,
    planned: int,
    result: JobResult,
) -> None:
    stopped = None
    if result.error is not None:
        stopped = f"stopped after {result.ran} of {planned} requests: {result.error}"
    # Over several servers, their scaling is gated too (measured against one server's run).
    pool = (figures.get("strategy") or {}).get("servers", 1) > 1
    report = harness.report(
        f"performance_benchmarks_{size}.json",
        scenario,
        figures,
        backend=backend,
        key=f"scale_{size}",
        stopped=stopped,
        defaults=[f"scaling_efficiency >= {SCALING_EFFICIENCY}"] if pool else [],
    )
    savings, theory = figures["token_savings"], figures["token_savings_theoretical_max"]
    shown = f"{savings:.1%} of {theory or 0:.1%} possible" if savings is not None else "unknown"
    harness.say(
        f"scale {size}: {result.ran} of {planned} requests run, "
        f"{figures['throughput_rps']:.2f} req/s, {figures['uncached_tokens_per_request']} "
        f"uncached prompt tokens per request, savings {shown}, {figures['context_trims']} trims, "
        f"errors {figures['errors']}"
        + (f"; {len(result.reuse_alarms)} REUSE ALARM(S)" if result.reuse_alarms else "")
        + (f"; STOPPED: {result.error}" if result.error else "")
    )
    harness.gate(report)
