"""Scenario files, criteria, and the config write-back."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import load_profile, write_back
from harness.errors import ConfigError
from harness.scenarios import load_scenario

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_is_valid(path: Path) -> None:
    scenario = load_scenario(path)
    for name in scenario.profiles:
        scenario.workload_for(name)
        scenario.criteria_for(name)
    assert "embedded" in scenario.profiles


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


GOOD = """\
name: t
phase: scale
profiles:
  embedded:
    criteria:
      - token_savings >= 0.97
"""


def test_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("    criteria:", "    critera: []\n    criteria:"))
    with pytest.raises(ConfigError, match=r"s\.yaml:5: profiles\.embedded\.critera: unknown key"):
        load_scenario(path)


def test_unknown_metric_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("token_savings >=", "tokn_savings >="))
    with pytest.raises(
        ConfigError,
        match=r"s\.yaml:6: profiles\.embedded\.criteria\[0\]: unknown metric 'tokn_savings'",
    ):
        load_scenario(path)


def test_unknown_operator_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace(">=", "=>"))
    with pytest.raises(ConfigError, match="is not a criterion; write 'metric op threshold'"):
        load_scenario(path)


def test_bad_values_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"workload\.max_tokens"):
        load_scenario(write(tmp_path, GOOD + "workload:\n  max_tokens: 0\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"phase"):
        load_scenario(write(tmp_path, GOOD.replace("phase: scale", "phase: warp")))


def test_criteria_messages_have_the_promised_shape(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    (criterion,) = scenario.criteria_for("embedded")
    result = criterion.check({"token_savings": 0.9314})
    assert not result.passed
    assert (
        result.message()
        == f"token_savings = 0.931, needs >= 0.97 ({tmp_path / 's.yaml'}, profile embedded)"
    )
    assert criterion.check({"token_savings": 0.98}).passed
    assert criterion.check({}).message().startswith("token_savings = missing")


def test_write_back_is_idempotent_and_leaves_other_profiles_alone(tmp_path: Path) -> None:
    path = tmp_path / "harness.yaml"
    path.write_text("# my notes stay\nprofiles:\n  other:\n    TRIM_INTERVAL: 7  # hand-tuned\n")
    values = {"MAX_CONTEXT_TOKENS": 15360, "CONTEXT_TRIM_THRESHOLD": 12288, "TRIM_INTERVAL": 68,
              "KV_CACHE_PER_TOKEN_MB": 0.003082, "MODEL_VRAM_GB": 0.401}  # fmt: skip
    prov = {"report": "reports/context_limit_results.json", "date": "2026-11-27",
            "backend": "embedded", "model": "gemma3-270m"}  # fmt: skip
    assert sorted(write_back(path, "embedded", values, prov)) == sorted(values)
    first = path.read_text()
    assert "# my notes stay" in first and "TRIM_INTERVAL: 7  # hand-tuned" in first
    # The same measurements again: nothing changes, not even the file's bytes.
    assert write_back(path, "embedded", values, {**prov, "date": "2026-12-01"}) == []
    assert path.read_text() == first
    # One changed value: only it (and its provenance) is rewritten.
    assert write_back(path, "embedded", {**values, "TRIM_INTERVAL": 70}, {**prov, "date": "x"}) == [
        "TRIM_INTERVAL"
    ]
    embedded = load_profile(path, "embedded")
    assert embedded.get("TRIM_INTERVAL") == 70
    assert embedded.provenance["TRIM_INTERVAL"]["date"] == "x"
    assert embedded.provenance["MAX_CONTEXT_TOKENS"]["date"] == "2026-11-27"
    assert load_profile(path, "other").get("TRIM_INTERVAL") == 7


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "harness.yaml"
    path.write_text("profiles:\n  embedded:\n    MAX_CONTEXT: 100\n")
    with pytest.raises(ConfigError, match=r"profiles\.embedded\.MAX_CONTEXT: unknown setting"):
        load_profile(path, "embedded")
    assert load_profile(tmp_path / "missing.yaml", "embedded").values == {}
