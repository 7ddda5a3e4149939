"""`harness plan`: servers, time and cost from a scale report, each with its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.plan import parse_duration


def scale_report(folder: Path, **figures: object) -> Path:
    data = {
        "harness_version": "t",
        "phase": "scale",
        "scenario": "s",
        "profile": "gpu-gemma3-12b",
        "generated_at": "2026-11-28T00:00:00+00:00",
        "machine_info": {},
        "commit_info": None,
        "backend": {"name": "ollama", "model": "gemma3:12b"},
        "criteria": [
            {"metric": "error_rate", "op": "<", "threshold": 0.01, "value": 0.002, "passed": True}
        ],
        "passed": True,
        "result": "PASS",
        "requests": 1000,
        "completed": 998,
        "finished": True,
        "throughput_rps": 6.5,
        "error_rate": 0.002,
        "energy_wh": 40.0,
        "energy_source": "nvml:gpu0 (RTX 4080): NVML energy counter",
        "strategy": {"name": "stateless"},
        **figures,
    }
    path = folder / str(figures.pop("file", "performance_benchmarks_1000.json"))
    path.write_text(json.dumps({**data, **figures}))
    return path


def test_plan_from_a_measured_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scale_report(tmp_path)
    args = [
        "plan",
        "--rows",
        "1700000",
        "--deadline",
        "24h",
        "--model",
        "gemma3:12b",
        "--backend",
        "ollama",
        "--report-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    # 1,700,000 / (6.5 req/s x 86,400 s) = 3.03: four servers.
    assert "servers: 4 of this kind (6.500 completed req/s each, measured in " in out
    assert "performance_benchmarks_1000.json (gemma3:12b on ollama" in out
    # The mode its throughput was measured in: this report predates score modes.
    assert "score mode decode (reported before score modes existed))" in out
    # 40 Wh for 998 requests -> 68.1 kWh for 1.7M rows, $20.44 at $0.30.
    assert "energy: 68.1 kWh, cost $20.44 at $0.3/kWh (nvml:gpu0 (RTX 4080)" in out
    assert "~3,400 rows to retry" in out
    # 1,700,000 / 6.5 req/s = 72.6 server-hours, however many servers share them.
    assert "server time: 72.6 server-hours" in out
    assert "stand-in" not in out


def test_plan_refuses_another_model_and_lists_what_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scale_report(tmp_path)
    args = [
        "plan",
        "--rows",
        "1000",
        "--deadline",
        "1h",
        "--model",
        "qwen3:8b",
        "--report-dir",
        str(tmp_path),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no finished, passing scale report" in err and "model qwen3:8b" in err
    assert "gemma3:12b on ollama, stateless (performance_benchmarks_1000.json)" in err


def test_a_stopped_run_plans_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scale_report(tmp_path, finished=False)
    assert main(["plan", "--rows", "10", "--deadline", "1h", "--report-dir", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    ("figures", "why"),
    [
        ({"finished": False}, "stopped part-way"),
        ({"result": "FAIL", "passed": False}, "failed its criteria"),
        ({"result": "ungated", "passed": None, "criteria": []}, "ungated"),
        ({"cached_tokens_source": "double"}, "a test double or replay"),
        (
            {"backend": {"name": "ollama", "model": "gemma3:12b", "replay": "tests/ollama_replay"}},
            "a test double or replay",
        ),
    ],
)
def test_plan_refuses_what_the_verdict_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: dict[str, object], why: str
) -> None:
    """One rule with the verdict (`projection_sources`): finished, passed, measured."""
    scale_report(tmp_path, **figures)
    assert main(["plan", "--rows", "10", "--deadline", "1h", "--report-dir", str(tmp_path)]) == 2
    assert f"performance_benchmarks_1000.json ({why})" in capsys.readouterr().err


def test_a_pool_report_plans_per_server_with_its_measured_scaling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two servers together ran 9.0 req/s: 4.5 each; measured against one server's 6.0: 0.75.
    scale_report(
        tmp_path,
        file="performance_benchmarks_10000.gpu-gemma3-12b.gemma3-12b.json",
        requests=10000,
        throughput_rps=9.0,
        strategy={"name": "stateless", "servers": 2},
        scaling={"efficiency": 0.75, "one_server_rps": 6.0},
    )
    args = ["plan", "--rows", "1700000", "--deadline", "24h", "--report-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4.500 completed req/s each: 2 servers together ran 9.000" in out
    # 1,700,000 / (4.5 x 0.75 x 86,400) = 5.83: six servers, 1.7M / (4.5 x 6 x 0.75) s = 23.3 h.
    assert "servers: 6 of this kind" in out
    assert "time: 23.3 h on 6 servers at a scaling efficiency of 0.75" in out


def test_a_plan_without_measured_scaling_says_it_assumes_servers_add_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scale_report(tmp_path)
    assert main(["plan", "--rows", "1700000", "--deadline", "24h", "--report-dir",
                 str(tmp_path)]) == 0  # fmt: skip
    assert "assuming they add up (scaling not measured" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h", 86400), ("90m", 5400), ("2d", 172800), ("3600", 3600)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_the_plan_prints_the_verdicts_reasons_word_for_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 38: one rule for every reader. A plan from a passing scale report of a folder the
    verdict does not call GO prints the verdict's decision and every reason it gives."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "reports"
    folder.mkdir()
    scale_report(folder)
    argv = ["plan", "--rows", "170000", "--deadline", "8h", "--report-dir", str(folder)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert main(["verdict", str(folder)]) == 1
    said = capsys.readouterr().out.splitlines()
    decision = said[0].removeprefix("verdict: ")
    assert decision != "GO"
    at = out.index(f"verdict on these reports (harness verdict): {decision}")
    reasons = []
    for line in said[1:]:
        if not line.startswith("  "):
            break
        reasons.append(line)
    assert reasons and out[at + 1 : at + 1 + len(reasons)] == reasons
