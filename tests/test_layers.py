"""The house's floors: no module imports one on a higher floor, and no import circle.

Read from the source (every `import` and `from ... import` in `harness/`, those inside
functions and the type-only ones under `if TYPE_CHECKING:` included: a type-only import is a
dependency too, and hiding a circle behind one is how two modules grow into each other), so a
back-import or a circle fails `make test`. The floors, lowest first, are the ones
`docs/architecture.md` draws; a new module must be given one here.
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
        "harness.csvfile",
        "harness.workload",
        "harness.scoring",
        "harness.agreement",
    ),
    # 2: model servers, behind one contract
    ("harness.backends",),
    # 3: the engine (strategies, token counting, runner, store, job)
    ("harness.engine",),
    # 4: what uses the engine: configuration, scenarios, reports, phases, baselines, test
    #    infrastructure
    (
        "harness.config",
        "harness.scenarios",
        "harness.report",
        "harness.reportmodels",
        "harness.limits",
        "harness.reuse",
        "harness.roofline",
        "harness.baselines",
        "harness.plots",
        "harness.phases",
        "harness.testing",
    ),
    # 5: the job every entry point runs: settings resolved once, the one backend factory, the
    #    preflight, the executors, the batch tool's Python API
    (
        "harness.run",
        "harness.batch",
        "harness.batchfiles",
        "harness.scoresfile",
        "harness.labels",
        "harness.scoremode",
        "harness.rayexec",
        "harness.doctor",
        "harness.validate",
        # what decides on reports: the verdict binds a GO to what `harness run` will send
        # (`run.resolve`), and the plan and the page read the verdict
        "harness.nextsteps",
        "harness.verdict",
        "harness.plan",
        "harness.htmlreport",
    ),
    # 6: the entry points: the pytest plugin, the command line, the Batch API service
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


def imports(path: Path, modules: dict[str, Path] | None = None) -> list[tuple[str, int]]:
    """(imported harness module, line) of a file, type-only imports included. For
    `from harness.x import y`, both `harness.x` and `harness.x.y` (when y is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("harness")]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("harness")
        ):
            out.append((node.module, node.lineno))
            out += [
                (f"{node.module}.{a.name}", node.lineno)
                for a in node.names
                if f"{node.module}.{a.name}" in (MODULES if modules is None else modules)
            ]
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


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's harness modules it imports (a package's own submodules importing it
    left out: `harness.engine.job` may import `harness.engine`'s siblings through it)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _ in imports(path, modules):
            # `from harness.x import y` may name a name in x: resolve to the longest module.
            name = target if target in modules else ".".join(target.split(".")[:-1])
            if name in modules and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order, the first repeated at the end)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle() -> None:
    circle = find_circle(import_graph(MODULES))
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_a_type_only_import_back_is_a_circle(tmp_path: Path) -> None:
    """The check sees what it exists for: a circle made only by an import under
    `if TYPE_CHECKING:` (as `batch.py` ⇄ `rayexec.py` and `pytest/reporting.py` ⇄
    `pytest/session.py` once were) fails it."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from harness.b import run\n", encoding="utf-8")
    b.write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from harness.a import Plan\n",
        encoding="utf-8",
    )
    modules = {**MODULES, "harness.a": a, "harness.b": b}
    assert find_circle(import_graph(modules)) == ["harness.a", "harness.b", "harness.a"]
    b.write_text("from harness.errors import ConfigError\n", encoding="utf-8")
    assert find_circle(import_graph(modules)) is None


def test_the_contract_imports_no_backend() -> None:
    targets = {t for t, _ in imports(HARNESS / "backends" / "base.py")}
    assert not {
        t for t in targets if t.startswith("harness.backends.") and t != "harness.backends.base"
    }
