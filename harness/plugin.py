"""The harness's pytest plugin (entry point `pytest11`).

- Options, all in one group: `--harness-backend`, `--harness-model`, `--harness-base-url`,
  `--harness-profile`, `--harness-report-dir`, `--harness-scenario-dir`, `--harness-config`,
  `--harness-price-per-kwh`, `--memory-budget`, `--write-config`.
- Markers, registered for `--strict-markers`; the long scale phases (`scale_10k`, `scale_50k`,
  `scale_170k`) run only when `-m` names them.
- The run session (`HarnessSession`) is built in `pytest_configure` and kept in
  `config.stash`; the `harness` fixture hands it to tests.
- Reports: a suite calls `harness.report(...)`, which evaluates the scenario's criteria, writes
  the phase's JSON report and remembers it; `harness.gate(report)` fails the test with one
  line per failed criterion (`token_savings = 0.931, needs >= 0.970 (scenarios/x.yaml,
  profile embedded)`). At session end a `summary.json` is written and a table printed.
- `--write-config` writes measured values back to the active profile of `harness.yaml`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness import __version__
from harness.backends.base import Backend
from harness.config import DEFAULT_CONFIG_PATH, load_profile, write_back
from harness.errors import ConfigError
from harness.fileio import atomic_write_json
from harness.report import commit_info, machine_info, now_iso, write_report
from harness.runconfig import RunConfig, resolve_run_config
from harness.scenarios import Scenario, evaluate, load_scenario

__all__ = ["HARNESS_KEY", "MARKERS", "HarnessSession"]

T = TypeVar("T")

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
DEFAULT_PROFILES = {"embedded": "embedded", "openai": "embedded", "ollama": "gpu-gemma3-12b"}


def _backend_name(text: str) -> str:
    if text not in ("embedded", "openai", "ollama"):
        raise pytest.UsageError(f"--harness-backend {text!r}: choose embedded, openai or ollama")
    return text


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
    group.addoption(
        "--harness-backend",
        type=_backend_name,
        default=None,
        help="model server: embedded (llama.cpp started here), openai, ollama. "
        "Default: the scenario profile's backend, else 'embedded'",
    )
    group.addoption(
        "--harness-model",
        default=None,
        help="model name or .gguf path (embedded), served model (openai), Ollama tag. "
        "Default: the scenario profile's, else gemma3-270m / gemma3:12b",
    )
    group.addoption(
        "--harness-base-url",
        default=None,
        help="server URL for openai/ollama (ollama: $OLLAMA_HOST). Default: %(default)r",
    )
    group.addoption(
        "--harness-profile",
        default=None,
        help="scenario profile (embedded, gpu-gemma3-12b). Default: by backend",
    )
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
    group.addoption(
        "--harness-config",
        default=str(DEFAULT_CONFIG_PATH),
        help="the production config file to read and write back. Default: %(default)r",
    )
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


@dataclass
class PhaseResult:
    """A written phase report, for the terminal table and the summary."""

    key: str
    path: Path
    report: dict[str, Any]
    failed: list[str] = field(default_factory=list)


class HarnessSession:
    """State of one pytest run: options, a private event loop, backends, reports."""

    def __init__(self, config: pytest.Config) -> None:
        opt = config.option
        self.config = config
        self.root = Path(str(config.rootpath))
        self.backend_option: str | None = opt.harness_backend
        self.backend_name: str = self.backend_option or "embedded"
        """The backend named on the command line (else embedded); a scenario profile may name
        another (see `run_config`)."""
        self.model_option: str | None = opt.harness_model
        self.base_url: str | None = opt.harness_base_url
        self.profile: str = opt.harness_profile or DEFAULT_PROFILES[self.backend_name]
        self.report_dir = self._path(opt.harness_report_dir)
        self.scenario_dir = self._path(opt.harness_scenario_dir)
        self.config_path = self._path(opt.harness_config)
        self.price_per_kwh: float = opt.harness_price_per_kwh
        self.memory_budget: str | None = opt.memory_budget
        self.write_config: bool = opt.write_config
        self.results: list[PhaseResult] = []
        self.config_changes: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backends: dict[tuple[Any, ...], Backend] = {}
        self._scenarios: dict[str, Scenario] = {}
        self._machine: dict[str, Any] | None = None
        self.terminal = Terminal(config)
        """Progress and figures for the user, shown even while pytest captures output."""

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def say(self, text: str) -> None:
        """One line to the terminal, past output capture."""
        self.terminal.write(text + "\n")

    # -- async plumbing ---------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the session's event loop (backends live on it)."""
        return self.loop.run_until_complete(coro)

    # -- scenarios, profiles, backends ------------------------------------------------------

    def scenario(self, filename: str) -> Scenario:
        """The validated scenario; a bad file fails the test with its message, no traceback."""
        if filename not in self._scenarios:
            path = self.scenario_dir / filename
            try:
                self._scenarios[filename] = load_scenario(path)
            except ConfigError as exc:
                problem = str(exc).replace(str(path), self.relpath(path))
            else:
                return self._scenarios[filename]
            pytest.fail(f"bad scenario: {problem}", pytrace=False)
        return self._scenarios[filename]

    def run_config(self, scenario: Scenario | None = None, **cli: Any) -> RunConfig:
        """The run's settings for a scenario: the command line, then harness.yaml (measured
        on the same backend), then the scenario's profile, then defaults (harness.runconfig).
        `cli` overrides what a suite sets itself (a sweep's slots, say)."""
        given = {
            "backend": self.backend_option,
            "model": self.model_option,
            "base_url": self.base_url,
        }
        return resolve_run_config(
            profile=self.profile,
            config=load_profile(self.config_path, self.profile),
            scenario=scenario,
            cli={**given, **cli},
        )

    def model_for(self, scenario: Scenario | None = None) -> str:
        return self.run_config(scenario).model.value

    def backend(self, cfg: RunConfig) -> Backend:
        """A started backend for these settings, shared for the session."""
        name = cfg.backend.value
        options = cfg.backend_options()
        if name == "openai" and not options.get("base_url"):
            options["base_url"] = "http://127.0.0.1:8080"
        key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._backends:
            backend = Backend.create(name, **options)
            self.run(backend.__aenter__())
            self._backends[key] = backend
        return self._backends[key]

    def release(self, backend: Backend) -> None:
        """Stop a backend before the session ends (frees its CPU threads and memory)."""
        for key, value in list(self._backends.items()):
            if value is backend:
                del self._backends[key]
                with contextlib.suppress(Exception):
                    self.run(backend.stop())

    def close(self) -> None:
        for backend in self._backends.values():
            with contextlib.suppress(Exception):
                self.run(backend.stop())
        self._backends.clear()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def backend_info(self, backend: Backend | None) -> dict[str, Any]:
        if backend is None:
            return {"name": self.backend_name, "model": self.model_for()}
        info = backend.info
        out = {
            "name": info.backend,
            "model": info.model,
            "server": info.server,
            "base_url": info.base_url,
            "n_ctx_per_slot": info.n_ctx_per_slot,
            "n_slots": info.n_slots,
            "request_path": info.extra.get("request_path", "native"),
        }
        for key in ("server_flags", "llama_server_args", "llama_cpp"):
            if key in info.extra:
                out[key] = info.extra[key]
        if info.backend == "embedded":
            out["note"] = (
                f"the embedded server runs {info.extra.get('llama_cpp', 'llama.cpp')}; Ollama "
                "runs its own pinned llama.cpp build. CPU memory readings do not predict GPU "
                "buffers or layer offload."
            )
        return out

    # -- reports ----------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        if self._machine is None:
            info = machine_info()
            self.config.hook.pytest_harness_machine_info(config=self.config, info=info)
            self._machine = info
        return self._machine

    def relpath(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def report(
        self,
        filename: str,
        scenario: Scenario,
        figures: dict[str, Any],
        *,
        backend: Backend | None = None,
        key: str | None = None,
        stopped: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate the scenario's criteria on `figures`, write the report, remember it.

        `stopped` says why the phase's run ended before its end: the report then keeps the
        figures of what ran, and fails on a `run_finished` criterion that carries the reason.
        """
        criteria = scenario.criteria_for(self.profile) if self.profile in scenario.profiles else []
        results = evaluate(criteria, figures)
        rows = [r.to_dict() for r in results]
        failed = [r.message() for r in results if not r.passed]
        if stopped is not None:
            rows.insert(
                0,
                {
                    "metric": "run_finished",
                    "op": "==",
                    "threshold": 1,
                    "value": 0,
                    "passed": False,
                    "reason": stopped,
                },
            )
            failed.insert(0, f"run_finished = 0: {stopped}")
        path = self.report_dir / filename
        report = write_report(
            path,
            phase=scenario.phase,
            scenario=self.relpath(Path(scenario.path)),
            profile=self.profile,
            backend=self.backend_info(backend),
            figures=figures,
            criteria=rows,
            machine=self.machine(),
            commit=commit_info(self.root),
        )
        # Messages name the scenario relative to the project, as users wrote it.
        failed = [m.replace(scenario.path, self.relpath(Path(scenario.path))) for m in failed]
        self.results.append(PhaseResult(key or filename, path, report, failed))
        return report

    def gate(self, report: dict[str, Any]) -> None:
        """Fail the current test when the report's criteria failed."""
        for result in self.results:
            if result.report is report and result.failed:
                pytest.fail("\n".join(result.failed), pytrace=False)

    def recommend(self, values: dict[str, Any], report_path: Path, backend: Backend | None) -> None:
        """Write measured values back to the config file when `--write-config` was given."""
        if not self.write_config:
            return
        info = self.backend_info(backend)
        provenance = {
            "report": self.relpath(report_path),
            "date": now_iso()[:10],
            "backend": info.get("name"),
            "model": info.get("model"),
        }
        changed = write_back(self.config_path, self.profile, values, provenance)
        self.config_changes += changed

    def write_pages(self) -> Path | None:
        """Plots that need only the reports on disk, and `index.html` linking everything."""
        from harness.htmlreport import build_index
        from harness.plots import plot_memory_vs_context

        limits = self.report_dir / "context_limit_results.json"
        if limits.exists():
            data = json.loads(limits.read_text())
            budget = data.get("memory_budget_bytes")
            peak = data.get("max_measured_bytes") or 0
            if budget and budget > 3 * peak:
                budget = None  # far above every reading: drawing it would flatten the plot
            plot_memory_vs_context(
                [(m["n_ctx"], m["memory_bytes"]) for m in data.get("measurements", [])]
                + [(m["n_ctx"], m["memory_bytes"]) for m in data.get("search_measurements", [])],
                data.get("kv_bytes_per_token_theory"),
                data.get("base_model_memory_bytes"),
                self.report_dir / "plots" / "memory_vs_context.png",
                budget_bytes=budget,
                max_context=data.get("max_context_tokens"),
                title=f"Memory against context: {data.get('model', '')}",
            )
        return build_index(self.report_dir)

    def write_summary(self) -> Path | None:
        if not self.results:
            return None
        summary = {
            "harness_version": __version__,
            "generated_at": now_iso(),
            "profile": self.profile,
            "machine_info": self.machine(),
            "commit_info": commit_info(self.root),
            "phases": [
                {
                    "key": r.key,
                    "phase": r.report.get("phase"),
                    "scenario": r.report.get("scenario"),
                    "report": self.relpath(r.path),
                    "passed": not r.failed,
                    "failed_criteria": r.failed,
                }
                for r in self.results
            ],
            "config_written": sorted(set(self.config_changes)),
        }
        path = self.report_dir / "summary.json"
        atomic_write_json(path, summary)
        return path


class Terminal(io.TextIOBase):
    """A text stream to the real terminal, past pytest's output capture (for progress on long
    phases); `isatty()` answers for the real stderr, so tqdm draws a bar only on a terminal."""

    def __init__(self, config: pytest.Config) -> None:
        self._capman = config.pluginmanager.getplugin("capturemanager")

    def _outside(self) -> Any:
        if self._capman is None:
            return contextlib.nullcontext()
        return self._capman.global_and_fixture_disabled()

    def write(self, text: str) -> int:
        with self._outside():
            sys.stderr.write(text)
            sys.stderr.flush()
        return len(text)

    def isatty(self) -> bool:
        with self._outside():
            return sys.stderr.isatty()


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


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    config.stash[HARNESS_KEY] = HarnessSession(config)


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
        if harness.write_summary() is not None:
            harness.write_pages()
    finally:
        harness.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None or not harness.results:
        return
    tr = terminalreporter
    tr.section("harness reports")
    for line in summary_table(harness):
        tr.write_line(line)
    for name in ("summary.json", "index.html"):
        path = harness.report_dir / name
        if path.exists():
            tr.write_line(f"{name.split('.')[0]}: {harness.relpath(path)}")
    if harness.config_changes:
        changed = ", ".join(sorted(set(harness.config_changes)))
        tr.write_line(f"config written: {harness.relpath(harness.config_path)} ({changed})")


_HEADLINES = (
    ("throughput_rps", "{:.2f} req/s"),
    ("token_savings", "savings {:.1%}"),
    ("savings_efficiency", "eff {:.3f}"),
    ("error_rate", "errors {:.2%}"),
    ("kv_bytes_per_token", "KV {:.0f} B/tok"),
    ("max_context_tokens", "max ctx {}"),
    ("safe_context_tokens", "safe {}"),
    ("parse_rate", "parsed {:.1%}"),
    ("consistency_rate", "consistent {:.1%}"),
    ("drift_spread", "drift {}"),
)


def summary_table(harness: HarnessSession) -> list[str]:
    rows = [("phase", "result", "figures", "report")]
    for r in harness.results:
        figures = []
        for key, fmt in _HEADLINES:
            value = r.report.get(key)
            if value is not None:
                with contextlib.suppress(ValueError, TypeError):
                    figures.append(fmt.format(value))
        rows.append(
            (r.key, "PASS" if not r.failed else "FAIL", ", ".join(figures), harness.relpath(r.path))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}"
        for row in rows
    ]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def harness(pytestconfig: pytest.Config) -> HarnessSession:
    """The run session: options, scenarios, backends, report writing and gating."""
    return pytestconfig.stash[HARNESS_KEY]
