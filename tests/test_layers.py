"""The house's floors: no module imports one on a higher floor, and no import circle.

Read from the source (every `import` and `from ... import` in `harness/`, type-only imports
under `if TYPE_CHECKING:` excepted), so a back-import fails `make test`. The floors, lowest
first, are the ones `docs/architecture.md` draws; a new module must be given one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "harness"

FLOORS: list[tuple[str, ...]] = [
    # 0: the ground: errors, file writing, one writer per file, the per-request record, report
    #    file names
    (
        "harness",
        "harness.errors",
        "harness.fileio",
        "harness.lock",
        "harness.records",
        "harness.reportfiles",
    ),
    # 1: what knows models, memory and figures, and the work's shape
    (
        "harness.models",
        "harness.memory",
        "harness.metrics",
        "harness.inputs",
        "harness.workload",
        "harness.scoring",
    ),
    # 2: model servers, behind one contract
    ("harness.backends",),
    # 3: the engine (strategies, token counting, runner, store, job)
    ("harness.engine",),
    # 4: what uses the engine: configuration, scenarios, reports, phases, baselines, the batch
    #    tool, test infrastructure
    (
        "harness.config",
        "harness.scenarios",
        "harness.runconfig",
        "harness.report",
        "harness.verdict",
        "harness.reportmodels",
        "harness.limits",
        "harness.reuse",
        "harness.roofline",
        "harness.baselines",
        "harness.plots",
        "harness.htmlreport",
        "harness.phases",
        "harness.batch",
        "harness.scoremode",
        "harness.rayexec",
        "harness.doctor",
        "harness.plan",
        "harness.testing",
    ),
    # 5: the entry points: the pytest plugin, the command line, the Batch API service
    ("harness.pytest", "harness.cli", "harness.__main__", "harness.api"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(HARNESS.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def floor_of(module: str) -> int:
    best = (-1, -1)
    for level, names in enumerate(FLOORS):
        for name in names:
            if module == name or module.startswith(name + "."):
                best = max(best, (len(name), level))
    if best[1] < 0:
        raise AssertionError(f"{module} has no floor in tests/test_layers.py: give it one")
    return best[1]


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported harness module, line) of a file, type-only imports left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("harness")]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("harness")
        ):
            out.append((node.module, node.lineno))
    return out


MODULES = {module_name(p): p for p in sorted(HARNESS.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_floor(module: str) -> None:
    mine = floor_of(module)
    up = [
        f"{MODULES[module].relative_to(HARNESS.parent)}:{line} imports {target} "
        f"(floor {floor_of(target)} > {mine})"
        for target, line in imports(MODULES[module])
        if floor_of(target) > mine
    ]
    assert not up, "\n".join(up)


def test_no_import_circle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in imports(path):
            # `from harness.x import y` may name a submodule y: resolve to the longest module.
            name = target if target in MODULES else ".".join(target.split(".")[:-1])
            if name in MODULES and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_contract_imports_no_backend() -> None:
    targets = {t for t, _ in imports(HARNESS / "backends" / "base.py")}
    assert not {
        t for t in targets if t.startswith("harness.backends.") and t != "harness.backends.base"
    }
