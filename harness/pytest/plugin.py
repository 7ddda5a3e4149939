"""The harness's pytest plugin (entry point `pytest11`): options, markers, hooks, fixtures.

- Options, all in one group with the `--harness-` prefix: `--harness-backend`,
  `--harness-model`, `--harness-base-url`, `--harness-score-mode`, `--harness-profile`,
  `--harness-threads`, `--harness-report-dir`, `--harness-scenario-dir`, `--harness-config`,
  `--harness-price-per-kwh`, `--harness-memory-budget`, `--harness-write-config` (the last two
  keep their old names, `--memory-budget` and `--write-config`, as aliases). The ones that
  set what `harness run`'s options set (backend, model, URL, score mode, threads, profile,
  config) are declared in `harness.run.given`'s table, with `harness run`'s and `harness api`'s.
- Markers, registered for `--strict-markers`; the long scale phases (`scale_10k`, `scale_50k`,
  `scale_170k`) run only when `-m` names them.
- The run session (`harness.pytest.session.HarnessSession`) is built in `pytest_configure`,
  kept in `config.stash` and its hooks registered as a plugin of that config (`SessionHooks`);
  the `harness` fixture hands it to tests. Reports, gates, write-back
  and the summary are `harness.pytest.reporting`'s.
- At the end: `summary.json` and `index.html` over every report in the folder, the verdict
  first, and the same on the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from harness.pytest.session import HarnessSession
from harness.run.given import harness_options

__all__ = ["HARNESS_KEY", "LONG_MARKERS", "MARKERS"]

MARKERS = {
    "integration": "runs a real embedded llama.cpp server",
    "slow": "takes more than a minute on a 2-core machine",
    "timing": "asserts a throughput figure; noisy on shared machines, so run on purpose",
    "ollama": "needs a live Ollama server at $OLLAMA_HOST",
    "gpu": "needs an NVIDIA GPU (NVML)",
    "browser": "opens a page in headless Chromium",
    "context_limits": "phase 1: memory against context size, and the largest context",
    "scale": "phases 2-4, 6, 7: the batch at growing sizes",
    "scale_100": "phase 2: 100 requests",
    "scale_1k": "phase 3: 1,000 requests",
    "scale_10k": "phase 4: 10,000 requests (long; runs only when -m names it)",
    "scale_50k": "phase 6: 50,000 requests (long; runs only when -m names it)",
    "scale_170k": "phase 7: 170,000 requests (long; runs only when -m names it)",
    "quality": "score consistency, reproducibility, drift",
    "reliability": "faults, kills, bad inputs: nothing lost",
    "performance": "roofline efficiency and strategies side by side",
}
LONG_MARKERS = ("scale_10k", "scale_50k", "scale_170k")
PHASE_MARKERS = ("context_limits", "scale", "quality", "reliability", "performance")


def _usage(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """A type of the table's (`harness.run.given`: ValueError with the message) as pytest's
    usage error, so a bad value ends the run with that one line."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None

    return parse


def _add_given(group: pytest.OptionGroup, *names: str) -> None:
    """The `--harness-*` options that set what `harness run` calls `names` (declared once, in
    `harness.run.given`)."""
    for flag, keywords in harness_options(*names):
        if "type" in keywords:
            keywords["type"] = _usage(keywords["type"])
        group.addoption(flag, **keywords)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise pytest.UsageError(f"{text!r} is not a number") from None
    if value < 0:
        raise pytest.UsageError(f"{text} must not be negative")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "LLM batch harness")
    _add_given(group, "backend", "model", "base_url", "score_mode", "threads", "profile")
    _add_given(group, "input", "prompt", "id_column")
    group.addoption(
        "--harness-report-dir",
        default="reports",
        help="where JSON reports are written. Default: %(default)r",
    )
    group.addoption(
        "--harness-scenario-dir",
        default="scenarios",
        help="where scenario YAML files are read. Default: %(default)r",
    )
    _add_given(group, "config")
    group.addoption(
        "--harness-price-per-kwh",
        type=_positive_float,
        default=0.30,
        help="electricity price for the cost estimate (GPU runs). Default: %(default)r",
    )
    group.addoption(
        "--harness-memory-budget",
        "--memory-budget",
        dest="memory_budget",
        default=None,
        help="memory budget of the context-limit search (12GB, 11.5GiB, 80%%); "
        "--memory-budget is the old name. Default: the scenario's, else the GPU's total "
        "(NVML), else this machine's RAM",
    )
    group.addoption(
        "--harness-write-config",
        "--write-config",
        dest="write_config",
        action="store_true",
        default=False,
        help="write measured values back to the active profile of the config file, for the "
        "phases that passed; --write-config is the old name. Default: %(default)r",
    )


HARNESS_KEY = pytest.StashKey[HarnessSession]()


class HarnessHooks:
    """Hook specifications of the plugin (see `pytest_harness_machine_info`)."""

    @pytest.hookspec(firstresult=True)
    def pytest_harness_machine_info(self, config: pytest.Config, info: dict[str, Any]) -> Any:
        """Add to or change the machine info that goes into every report.

        Example, in a ``conftest.py``::

            def pytest_harness_machine_info(config, info):
                info["rack"] = "lab-3"
                info["gpu_driver"] = read_driver_version()
        """


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(HarnessHooks)


SESSION_PLUGIN = "harness-session"
"""The name the run session's hooks are registered under (`config.pluginmanager`)."""


class SessionHooks:
    """The hooks that need this run's session, registered as a plugin of its own config (as
    pytest-benchmark registers its session), so each pytest run, nested ones included, reaches
    its own session and no other."""

    def __init__(self, harness: HarnessSession) -> None:
        self.harness = harness

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Remember phase tests that skipped, with their reasons, for the summary."""
        if not report.skipped or report.when not in ("setup", "call"):
            return
        if not any(marker in report.keywords for marker in PHASE_MARKERS):
            return  # not a phase test (the harness's own tests skip too)
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        self.harness.reports.skipped.append((report.nodeid, str(reason).removeprefix("Skipped: ")))


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    harness = config.stash[HARNESS_KEY] = HarnessSession(config)
    config.pluginmanager.register(SessionHooks(harness), SESSION_PLUGIN)


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin(SESSION_PLUGIN)
    if plugin is not None:
        config.pluginmanager.unregister(plugin)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.option.markexpr or ""
    keep, drop = [], []
    for item in items:
        long = [m for m in LONG_MARKERS if item.get_closest_marker(m) is not None]
        if long and not any(m in markexpr for m in long):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session: pytest.Session) -> None:
    harness = session.config.stash.get(HARNESS_KEY, None)
    if harness is None:
        return
    try:
        if harness.reports.write_summary() is not None:
            harness.reports.write_pages()
    finally:
        harness.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None or not (harness.reports.results or harness.reports.skipped):
        return
    tr = terminalreporter
    tr.section("harness reports")
    for line in harness.reports.lines():
        tr.write_line(line)
    for name in ("summary.json", "index.html"):
        path = harness.report_dir / name
        if path.exists():
            tr.write_line(f"{name.split('.')[0]}: {harness.relpath(path)}")
    if harness.reports.config_changes:
        changed = ", ".join(sorted(set(harness.reports.config_changes)))
        tr.write_line(f"config written: {harness.relpath(harness.config_path)} ({changed})")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def harness(pytestconfig: pytest.Config) -> HarnessSession:
    """The run session: options, scenarios, backends, report writing and gating."""
    return pytestconfig.stash[HARNESS_KEY]
