"""Performance: calibrated roofline, and the ways of running the batch side by side.

    pytest suites/performance        # embedded default (Gemma 3 270M on the CPU), ~10 minutes

Writes `reports/performance_comparison.json`, PNG plots under `reports/plots/` and (at session
end) `reports/index.html`. Everything is measured in this one run, on the same server and
workload: the engine (stateless and conversation), a minimal direct httpx loop, a naive client
with prompt caching off, and a sweep of server slots and concurrency.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from harness.backends.base import Backend
from harness.baselines import DirectResult, direct_loop
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.job import JobResult, open_token_counter
from harness.phases import items_for
from harness.plots import (
    EfficiencyRow,
    SavingsRow,
    plot_efficiency,
    plot_savings_by_strategy,
    plot_throughput_over_run,
)
from harness.pytest import HarnessSession
from harness.roofline import Calibration, bound_seconds, calibrate

SCENARIO = "performance.yaml"
pytestmark = [pytest.mark.performance, pytest.mark.integration, pytest.mark.timeout(7200)]


def engine_figures(result: JobResult, cal: Calibration) -> dict[str, Any]:
    m = result.metrics
    bound = bound_seconds(cal, m.tokens["uncached"], m.tokens["completion"])
    return {
        "requests": m.requests,
        "elapsed_s": m.elapsed_s,
        "throughput_rps": m.throughput_rps,
        "token_savings": m.token_savings,
        "token_savings_theoretical_max": m.token_savings_theoretical_max,
        "tokens": m.tokens,
        "bound_s": bound,
        "efficiency": bound / m.elapsed_s if m.elapsed_s else None,
        "latency_ms_p50": m.latency_ms.p50,
    }


def direct_figures(result: DirectResult, cal: Calibration) -> dict[str, Any]:
    uncached = result.prompt_tokens - result.cached_tokens
    bound = bound_seconds(cal, uncached, result.completion_tokens)
    return {
        **result.to_dict(),
        "bound_s": bound,
        "efficiency": bound / result.elapsed_s if result.elapsed_s else None,
    }


def test_performance(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    profile = scenario.profile(harness.profile)
    opts: dict[str, Any] = profile.options
    # The direct loop sends chat bodies: the engine takes the same path, so they compare.
    cfg = harness.run_config(scenario, parallel=1, concurrency=1, request_path="chat")
    model = cfg.model.value
    per_slot = cfg.n_ctx.value
    n = int(opts.get("requests", 20))
    pool = items_for(scenario, harness.profile, n * (int(opts.get("rounds", 2)) + 1) + 100)
    calibration_items = items_for(scenario, harness.profile, 400)[-5:]  # not in the runs

    backend = harness.backend(cfg)
    cal = harness.run(
        calibrate(
            backend,
            [it.messages for it in calibration_items],
            decode_tokens=pool[0].max_tokens or 8,
        )
    )
    harness.say(
        f"performance: calibrated prefill {cal.prefill_tps:.1f} tok/s ({cal.chunk_tokens}-token "
        f"chunks at depth {cal.depth_tokens}), decode {cal.decode_tps:.1f} tok/s"
    )
    url = backend.info.base_url
    policy = TrimPolicy(max_context_tokens=per_slot, trim_interval=50)

    # Engine (stateless) and the direct loop, alternating on one warm server, distinct items
    # per round so the prefix cache helps each the same way.
    engine_runs: list[JobResult] = []
    direct_runs: list[DirectResult] = []
    rounds = int(opts.get("rounds", 2))

    async def engine_and_direct() -> None:
        await direct_loop(url, pool[:1])  # warm-up: the first request computes the rubric
        async with open_token_counter(backend) as counter:
            for r in range(rounds):
                chunk_e = pool[1 + 2 * r * n : 1 + (2 * r + 1) * n]
                chunk_d = pool[1 + (2 * r + 1) * n : 1 + (2 * r + 2) * n]
                spec = JobSpec(
                    strategy="stateless",
                    policy=policy,
                    keep_records=True,
                    desc=f"performance: engine stateless round {r + 1}",
                    progress_stream=harness.terminal,
                )
                engine_runs.append(await run_job(backend, chunk_e, spec, counter=counter))
                direct_runs.append(await direct_loop(url, chunk_d))
                harness.say(
                    f"performance: round {r + 1}: engine {engine_runs[-1].metrics.elapsed_s:.1f}"
                    f" s, direct {direct_runs[-1].elapsed_s:.1f} s"
                )

    harness.run(engine_and_direct())
    stateless = [engine_figures(r, cal) for r in engine_runs]
    direct = [direct_figures(r, cal) for r in direct_runs]
    engine_rps = statistics.median(f["throughput_rps"] for f in stateless)
    direct_rps = statistics.median(f["throughput_rps"] for f in direct)

    # Engine (conversation) on fresh candidates.
    conv_items = pool[-int(opts.get("conversation_requests", 20)) :]
    conv = harness.run(
        run_job(
            backend,
            conv_items,
            JobSpec(
                strategy="conversation",
                policy=policy,
                desc="performance: engine conversation",
                progress_stream=harness.terminal,
            ),
        )
    )
    conversation = engine_figures(conv, cal)

    # The naive client: prompt caching off, every request pays the whole prompt.
    naive_items = pool[-int(opts.get("naive_requests", 3)) - 50 : -50]
    naive_result = harness.run(direct_loop(url, naive_items, cache_prompt=False))
    naive = direct_figures(naive_result, cal)
    harness.say(f"performance: naive client {naive_result.throughput_rps:.3f} req/s")
    harness.release(backend)

    # Slots / concurrency sweep: where throughput and cache hits trade off.
    sweep: list[dict[str, Any]] = []
    sweep_n = int(opts.get("sweep_requests", 12))
    for slots in opts.get("sweep", [1, 2, 4]):
        be: Backend = harness.backend(
            harness.run_config(scenario, parallel=slots, concurrency=slots, request_path="chat")
        )
        items = pool[1 : 1 + sweep_n * 2][::2][:sweep_n]
        harness.run(direct_loop(be.info.base_url, pool[:slots], concurrency=slots))  # warm slots
        res = harness.run(
            run_job(
                be,
                items,
                JobSpec(
                    strategy="stateless",
                    policy=policy,
                    runner=RunnerConfig(concurrency=slots),
                    desc=f"performance: {slots} slot(s)",
                    progress_stream=harness.terminal,
                ),
            )
        )
        entry = {"slots": slots, "concurrency": slots, **engine_figures(res, cal)}
        sweep.append(entry)
        harness.release(be)

    plots_dir = harness.report_dir / "plots"
    first = engine_runs[0]
    t0 = min(r.started for r in first.records)
    rows = [
        SavingsRow("engine stateless", stateless[0]["token_savings"],
                   stateless[0]["token_savings_theoretical_max"]),
        SavingsRow("engine conversation", conversation["token_savings"],
                   conversation["token_savings_theoretical_max"]),
        SavingsRow("direct loop", direct[0]["token_savings"], None),
        SavingsRow("naive (no cache)", naive["token_savings"], None),
    ]  # fmt: skip
    eff_rows = [
        EfficiencyRow("engine stateless", stateless[0]["bound_s"], stateless[0]["elapsed_s"],
                      engine_rps),
        EfficiencyRow("engine conversation", conversation["bound_s"], conversation["elapsed_s"],
                      conversation["throughput_rps"]),
        EfficiencyRow("direct loop", direct[0]["bound_s"], direct[0]["elapsed_s"], direct_rps),
        EfficiencyRow("naive (no cache)", naive["bound_s"], naive["elapsed_s"],
                      naive["throughput_rps"]),
        *[EfficiencyRow(f"{s['slots']} slot(s)", s["bound_s"], s["elapsed_s"],
                        s["throughput_rps"]) for s in sweep],
    ]  # fmt: skip
    plots = [
        plot_throughput_over_run(
            [r.finished - t0 for r in first.records],
            [r.latency_ms if r.ok else None for r in first.records],
            plots_dir / "throughput_latency_stateless.png",
        ),
        plot_savings_by_strategy(rows, plots_dir / "savings_by_strategy.png"),
        plot_efficiency(eff_rows, plots_dir / "efficiency.png"),
    ]
    figures = {
        "model": model,
        "calibration": cal.to_dict(),
        "workload": {
            "requests_per_round": n,
            "rounds": rounds,
            "prompt_tokens_mean": stateless[0]["tokens"]["prompt"] / max(1, n),
            "max_tokens": pool[0].max_tokens,
        },
        "variants": {
            "engine_stateless": stateless,
            "direct_loop": direct,
            "engine_conversation": conversation,
            "naive_no_cache": naive,
        },
        "concurrency_sweep": sweep,
        "stateless_efficiency": statistics.median(f["efficiency"] for f in stateless),
        "engine_over_direct": engine_rps / direct_rps,
        "cached_over_naive": engine_rps / naive["throughput_rps"],
        "conversation_over_stateless": conversation["throughput_rps"] / engine_rps,
        "plots": [harness.relpath(p) for p in plots],
    }
    report = harness.report("performance_comparison.json", scenario, figures, backend=backend)
    harness.say(
        f"performance: stateless efficiency {figures['stateless_efficiency']:.3f}, engine/direct "
        f"{figures['engine_over_direct']:.3f}, cached/naive {figures['cached_over_naive']:.1f}x, "
        f"sweep {[(s['slots'], round(s['throughput_rps'], 3)) for s in sweep]}"
    )
    harness.gate(report)
