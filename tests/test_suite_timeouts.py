"""Each phase suite runs under a timeout that fits its phase: pyproject's 15-minute default
would cut phase 1 on Ollama (30-60 minutes in the README) part-way."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Minimum seconds per suite (0: no timeout at all, the long scale phases).
NEEDED = {
    "context_limits/test_context_limits.py": 3600,
    "scale/test_scale.py": 0,
    "performance/test_performance.py": 3600,
    "performance/test_flags.py": 3600,
    "quality/test_quality.py": 3600,
}


def default_timeout() -> int:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"^timeout\s*=\s*(\d+)", text, re.M)
    assert m, "pyproject.toml sets no pytest timeout"
    return int(m.group(1))


@pytest.mark.parametrize("suite", sorted(NEEDED))
def test_a_suite_has_the_timeout_its_phase_needs(suite: str) -> None:
    spec = importlib.util.spec_from_file_location(f"suite_{suite}", ROOT / "suites" / suite)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    marks = [m for m in module.pytestmark if m.name == "timeout"]
    assert marks, f"suites/{suite} runs under pyproject's {default_timeout()} s default"
    seconds = marks[0].args[0]
    if NEEDED[suite] == 0:
        assert seconds == 0, f"suites/{suite}: {seconds} s, the long phases need none"
    else:
        assert seconds == 0 or seconds >= NEEDED[suite] > default_timeout(), suite
