"""Suites stay thin: a suite is the pytest glue around a phase (parametrize, call the phase,
gate); the phase's logic lives in harness/phases/, where it is unit-tested on the in-process
double. No function in suites/ is longer than MAX_LINES: one that grows past it fails here,
named with its file and line, so its logic moves to a phase (or splits) before it lands."""

from __future__ import annotations

import ast
from pathlib import Path

SUITES = Path(__file__).resolve().parent.parent / "suites"
MAX_LINES = 60


def long_functions(root: Path, limit: int) -> list[str]:
    """`file:line name (N lines)` for every function (methods and nested ones included) in
    `root`'s Python files longer than `limit` lines, decorators not counted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    rel = path.relative_to(root.parent)
                    out.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_the_suites_are_there() -> None:
    assert len(list(SUITES.rglob("test_*.py"))) >= 5, f"no suites found under {SUITES}"


def test_no_suite_function_is_longer_than_the_limit() -> None:
    long = long_functions(SUITES, MAX_LINES)
    assert not long, (
        f"suite functions over {MAX_LINES} lines (move their logic to harness/phases/, "
        "unit-tested on the in-process double, or split them): " + "; ".join(long)
    )


def test_the_check_names_a_long_function(tmp_path: Path) -> None:
    suite = tmp_path / "suites" / "demo"
    suite.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (suite / "test_demo.py").write_text(f"def short():\n    pass\n\n\ndef test_long():\n{body}\n")
    assert long_functions(tmp_path / "suites", MAX_LINES) == [
        f"suites/demo/test_demo.py:5 test_long ({MAX_LINES + 1} lines)"
    ]
