"""Which server flags and which strategy production should use, measured on the CPU stand-in.

    pytest suites/performance -k flags        # gemma3-270m: Ollama's flags vs swa_full, ~10 min

Ollama ≥ 0.30 starts llama-server without `--swa-full`: Gemma's sliding-window layers keep only
window + n_ubatch cells, so a conversation that goes back to its rubric at a trim may have to
recompute it (or restore a context checkpoint). `swa_full` keeps full-size windows, for several
times the KV memory per token, but production's Ollama does not run it. This test runs the same
candidates four ways, on the text path as Ollama sends it: {stateless, conversation} × {Ollama's
flags, swa_full}, each on a fresh server, and reports per variant the uncached (computed) prompt
tokens per request, token savings, req/s, beside the KV bytes per token phase 1 measured for
both layouts (when phase 1 ran in the same report folder); then the recommendation
(`flags_comparison.json`).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.engine import JobSpec, run_job
from harness.phases import items_for
from harness.pytest import HarnessSession
from harness.reportfiles import find_report

SCENARIO = "flags.yaml"
VARIANTS = [
    ("stateless", "ollama"),
    ("conversation", "ollama"),
    ("stateless", "harness"),
    ("conversation", "harness"),
]
pytestmark = [pytest.mark.performance, pytest.mark.integration, pytest.mark.timeout(7200)]


def run_variant(harness: HarnessSession, strategy: str, flags: str) -> dict[str, Any]:
    scenario = harness.scenario(SCENARIO)
    cfg = harness.run_config(
        scenario,
        strategy=strategy,
        server_flags=flags,
        swa_full=flags == "harness",
        request_path="text",
    )
    backend = harness.backend(cfg)
    n = int(scenario.profile(harness.profile).options.get("requests", 60))
    items = items_for(scenario, harness.profile, n)
    spec = JobSpec(
        strategy=strategy,
        policy=cfg.capped(backend.info.n_ctx_per_slot).policy,
        desc=f"flags: {strategy} / {flags}",
        progress_stream=harness.terminal,
    )
    m = harness.run(run_job(backend, items, spec)).metrics
    harness.release(backend)
    return {
        "strategy": strategy,
        "server_flags": flags,
        "llama_server_args": backend.info.extra.get("llama_server_args"),
        "requests": m.requests,
        "errors": m.errors,
        "throughput_rps": m.throughput_rps,
        "uncached_tokens_per_request": m.uncached_tokens_per_request,
        "token_savings": m.token_savings,
        "savings_efficiency": m.savings_efficiency,
        "context_trims": m.context_trims,
        "cached_tokens_source": m.cached_source,
    }


def test_flags_and_strategies(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    if harness.run_config(scenario).backend.value != "embedded":
        pytest.skip("compares llama-server launch flags: the embedded server only")
    rows = [run_variant(harness, s, f) for s, f in VARIANTS]
    for r in rows:
        harness.say(
            f"flags: {r['strategy']:<12} {r['server_flags']:<7} "
            f"{r['uncached_tokens_per_request']:.0f} uncached tokens/request, savings "
            f"{r['token_savings']:.1%}, {r['throughput_rps']:.2f} req/s, trims {r['context_trims']}"
        )
    figures = recommend(rows)
    figures["model"] = harness.run_config(scenario).model.value
    figures["kv_bytes_per_token"] = phase1_kv(harness)
    report = harness.report("flags_comparison.json", scenario, figures)
    harness.gate(report)


def phase1_kv(harness: HarnessSession) -> dict[str, Any] | None:
    """KV bytes per token of both layouts, as phase 1 measured them (when it ran)."""
    found = find_report(
        harness.report_dir, "context_limit_results.json", profile=harness.profile,
        model=harness.run_config().model.value,
    )  # fmt: skip
    if found is None:
        return None
    path, data = found
    other = data.get("kv_other_layout") or {}
    return {
        f"{data.get('server_flags')} flags": data.get("kv_bytes_per_token"),
        str(other.get("layout")): other.get("kv_bytes_per_token"),
        "source": f"{path.name} ({data.get('kv_bytes_per_token_source')})",
    }


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The strategy to run under Ollama's flags: the one that computes fewer prompt tokens."""
    by = {(r["strategy"], r["server_flags"]): r for r in rows}
    stateless, conversation = by[("stateless", "ollama")], by[("conversation", "ollama")]
    if stateless["uncached_tokens_per_request"] is None or (
        conversation["uncached_tokens_per_request"] is None
    ):
        return {
            "variants": rows,
            "recommendation": None,
            "errors": sum(r["errors"] for r in rows),
            "unknown_reasons": {"recommendation": "the server reported no cached tokens"},
        }
    best, other = sorted(
        (stateless, conversation), key=lambda r: float(r["uncached_tokens_per_request"])
    )
    return {
        "request_path": "text",
        "variants": rows,
        "recommended_strategy": best["strategy"],
        "recommended_server_flags": "ollama",
        "recommendation": (
            f"production runs Ollama's flags (no swa_full): use the {best['strategy']} strategy "
            f"there: {best['uncached_tokens_per_request']:.0f} uncached prompt tokens per "
            f"request against {other['uncached_tokens_per_request']:.0f} for {other['strategy']}"
        ),
        "uncached_ratio_conversation_over_stateless_ollama": (
            conversation["uncached_tokens_per_request"] / stateless["uncached_tokens_per_request"]
        ),
        "errors": sum(r["errors"] for r in rows),
    }
