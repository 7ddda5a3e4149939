"""The roadmap's success criteria as gates of the shipped scale scenarios (1K and above).

Each test feeds a report with one bad figure through the criteria a shipped scenario declares
and checks that the gate fails, and that the same gate passes the good figure: a gate that
cannot fail, or one that fails everything, is caught here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.phases.common import projection_check
from harness.scenarios import CriterionResult, load_scenario

ROOT = Path(__file__).resolve().parent.parent
SCALE = {
    1_000: "phase3_scale_1k.yaml",
    10_000: "phase4_scale_10k.yaml",
    50_000: "phase6_scale_50k.yaml",
    170_000: "phase7_scale_170k.yaml",
}
PROFILES = ("embedded", "gpu-gemma3-12b")


def gate(size: int, profile: str, metric: str, report: dict[str, Any]) -> list[CriterionResult]:
    """The results of the scenario's criteria on `metric` only; at least one must exist."""
    scenario = load_scenario(ROOT / "scenarios" / SCALE[size])
    results = [c.check(report) for c in scenario.criteria_for(profile) if c.metric == metric]
    assert results, f"{SCALE[size]}, profile {profile}: no criterion on {metric}"
    return results


def passes(results: list[CriterionResult]) -> bool:
    return all(r.passed for r in results)


@pytest.mark.parametrize("size", sorted(SCALE))
@pytest.mark.parametrize("profile", PROFILES)
def test_a_leaking_harness_fails_at_1k_and_above(size: int, profile: str) -> None:
    leak = {"runner_bytes_per_hour": 2e6}
    assert passes(gate(size, profile, "leak.runner_bytes_per_hour", {"leak": leak}))
    leak = {"runner_bytes_per_hour": 400e6}  # 2.8 GB over a 7-hour run
    assert not passes(gate(size, profile, "leak.runner_bytes_per_hour", {"leak": leak}))


@pytest.mark.parametrize("size", sorted(SCALE))
def test_a_leak_in_gpu_memory_fails_the_production_profile(size: int) -> None:
    report = {"leak": {"gpu_bytes_per_hour": 300e6}}
    assert not passes(gate(size, "gpu-gemma3-12b", "leak.gpu_bytes_per_hour", report))
    report = {"leak": {"gpu_bytes_per_hour": 0.0}}
    assert passes(gate(size, "gpu-gemma3-12b", "leak.gpu_bytes_per_hour", report))
    # Not measured (the GPU is on another machine): unknown, never a pass.
    report = {
        "leak": {"gpu_bytes_per_hour": None},
        "unknown_reasons": {"leak.gpu_bytes_per_hour": "no GPU"},
    }
    (result,) = gate(size, "gpu-gemma3-12b", "leak.gpu_bytes_per_hour", report)
    assert not result.passed and "no GPU" in result.message()


@pytest.mark.parametrize("size", sorted(SCALE))
@pytest.mark.parametrize("profile", PROFILES)
def test_throughput_that_degrades_over_the_run_fails(size: int, profile: str) -> None:
    assert passes(gate(size, profile, "degradation.ratio", {"degradation": {"ratio": 0.95}}))
    assert not passes(gate(size, profile, "degradation.ratio", {"degradation": {"ratio": 0.6}}))


@pytest.mark.parametrize("size", sorted(SCALE))
@pytest.mark.parametrize("profile", PROFILES)
def test_an_overflow_at_a_trim_fails(size: int, profile: str) -> None:
    assert passes(gate(size, profile, "overflow_errors", {"overflow_errors": 0}))
    assert not passes(gate(size, profile, "overflow_errors", {"overflow_errors": 1}))


@pytest.mark.parametrize("size", sorted(SCALE))
def test_a_context_shift_means_the_trim_came_too_late(size: int) -> None:
    for profile in PROFILES:
        assert passes(gate(size, profile, "context_shifts", {"context_shifts": 0}))
        assert not passes(gate(size, profile, "context_shifts", {"context_shifts": 3}))


@pytest.mark.parametrize("size", sorted(SCALE))
def test_memory_over_phase_1s_budget_or_no_budget_fails_production(size: int) -> None:
    within = gate(
        size, "gpu-gemma3-12b", "memory.within_budget", {"memory": {"within_budget": True}}
    )
    assert passes(within)
    over = gate(
        size, "gpu-gemma3-12b", "memory.within_budget", {"memory": {"within_budget": False}}
    )
    assert not passes(over)
    assert not passes(gate(size, "gpu-gemma3-12b", "memory.within_budget", {"memory": {}}))


@pytest.mark.parametrize("size", [s for s in SCALE if s >= 10_000])
@pytest.mark.parametrize("profile", PROFILES)
def test_a_wrong_eta_fails_at_10k_and_above(size: int, profile: str) -> None:
    assert passes(gate(size, profile, "eta_error_max", {"eta_error_max": 0.08}))
    assert not passes(gate(size, profile, "eta_error_max", {"eta_error_max": 0.45}))
    assert not passes(gate(size, profile, "eta_error_max", {"eta_error_max": None}))


@pytest.mark.parametrize("size", [s for s in SCALE if s >= 10_000])
def test_a_projected_170k_cost_over_100_dollars_or_unmeasured_fails(size: int) -> None:
    profile = "gpu-gemma3-12b"
    assert passes(gate(size, profile, "projected_170k_cost", {"projected_170k_cost": 12.5}))
    assert not passes(gate(size, profile, "projected_170k_cost", {"projected_170k_cost": 140.0}))
    assert not passes(gate(size, profile, "projected_170k_cost", {"projected_170k_cost": None}))


def scale_report(path: Path, n: int, rps: float, *, result: str = "PASS", server: str = "",
                 **identity: Any) -> None:  # fmt: skip
    ident = {"profile": "embedded", "model": "gemma3-270m", "backend": "embedded"} | identity
    path.joinpath(f"performance_benchmarks_{n}.json").write_text(
        json.dumps(
            {
                "profile": ident["profile"],
                "backend": {"name": ident["backend"], "model": ident["model"], "server": server},
                "strategy": {"name": ident.get("strategy", "conversation")},
                "throughput_rps": rps,
                "finished": True,
                "result": result,
            }
        )
    )


IDENTITY = {
    "profile": "embedded",
    "model": "gemma3-270m",
    "backend": "embedded",
    "strategy": "conversation",
}


def test_a_projection_is_never_taken_from_a_report_of_another_profile(tmp_path: Path) -> None:
    # A faster 10K run of another profile, and one of another strategy, sit in the folder.
    scale_report(
        tmp_path, 10_000, 6.7, profile="gpu-gemma3-12b", backend="ollama", model="gemma3:12b"
    )
    scale_report(tmp_path, 1_000, 9.0, strategy="stateless")
    check = projection_check(tmp_path, 50_000, 25_000.0, IDENTITY)
    assert check is not None and check["from_report"] is None and check["error"] is None
    assert any("gpu-gemma3-12b" in s for s in check["not_comparable"])
    assert any("stateless" in s for s in check["not_comparable"])
    # The 50K gate then fails: no comparable reference is not a pass.
    report = {"projection_error": None}
    assert not passes(gate(50_000, "embedded", "projection_error", report))


def test_a_projection_from_the_same_kind_of_run_is_gated_both_ways(tmp_path: Path) -> None:
    scale_report(tmp_path, 1_000, 2.0)
    scale_report(tmp_path, 10_000, 2.5)  # the largest smaller one is the reference
    scale_report(tmp_path, 100_000, 9.9)  # larger than the run: predicts nothing
    good = projection_check(tmp_path, 50_000, 21_000.0, IDENTITY)
    assert good is not None and good["from_report"] == "performance_benchmarks_10000.json"
    assert good["predicted_s"] == pytest.approx(20_000.0)
    assert good["error"] == pytest.approx(0.05)
    assert passes(gate(50_000, "embedded", "projection_error", {"projection_error": good["error"]}))
    slow = projection_check(tmp_path, 50_000, 30_000.0, IDENTITY)
    fast = projection_check(tmp_path, 50_000, 14_000.0, IDENTITY)
    assert slow is not None and fast is not None
    for check in (slow, fast):
        report = {"projection_error": check["error"]}
        assert not passes(gate(50_000, "embedded", "projection_error", report))


def test_a_projection_reference_is_finished_passing_and_measured(tmp_path: Path) -> None:
    """Issue 42: projection_check took FAIL reports and replays as a gate's baseline."""
    scale_report(tmp_path, 1_000, 2.0)
    scale_report(tmp_path, 10_000, 9.0, result="FAIL")
    scale_report(tmp_path, 5_000, 8.0, server="ollama 0.34.0 (a replay: tests/ollama_replay.py)")
    check = projection_check(tmp_path, 50_000, 25_000.0, IDENTITY)
    assert check is not None and check["from_report"] == "performance_benchmarks_1000.json"
    shown = " ".join(check["not_comparable"])
    assert "performance_benchmarks_10000.json (result FAIL, not PASS)" in shown
    assert "performance_benchmarks_5000.json (a replayed server" in shown
