"""The state of one pytest run of the harness: options, a private event loop, backends built
through the one configuration path (`harness.run`: resolved by `resolve`, built by
`open_backend`), scenarios, and the terminal.

Reports, gates, write-back and the summary live in `harness.pytest.reporting`; the session's
`report`, `gate` and `recommend` hand over to it, so a suite needs only the `harness` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.backends.base import Backend
from harness.config import DEFAULT_CONFIG_PATH
from harness.errors import ConfigError, HarnessError
from harness.pytest.reporting import ReportContext, Reports
from harness.report import machine_info
from harness.run.factory import open_backend
from harness.run.given import JOB_DATA, Given, from_pytest
from harness.run.resolve import RUN_RULES, default_profile, resolve
from harness.run.settings import DEFAULT, RunConfig, Value
from harness.scenarios import Scenario, load_scenario
from harness.workload import load_prompt, read_candidates_csv

__all__ = ["HarnessSession", "Terminal"]

T = TypeVar("T")
OPENAI_URL = "http://127.0.0.1:8080"
"""The openai server a suite talks to when neither --harness-base-url nor the profile names one."""


class HarnessSession:
    """State of one pytest run: options, a private event loop, backends, reports."""

    def __init__(self, config: pytest.Config) -> None:
        opt = config.option
        given = from_pytest(opt)  # the --harness-* options harness.run.given declares
        self.config = config
        self.root = Path(str(config.rootpath))
        if given["input"]:
            # The job validated for this input (harness.yaml `jobs`) gives the prompt and the id
            # column the options leave out, as it does for `harness run`.
            config_file = self._path(given["config"] or str(DEFAULT_CONFIG_PATH))
            given = given.with_validated_job(
                Path(given["input"]).resolve(), config_file, fields=JOB_DATA
            )
        self.given: Given = given
        """What the `--harness-*` options gave (`harness.run.given.Given`), the validated
        job's prompt and id column filled in."""
        self.backend_option: str | None = given["backend"]
        self.backend_name: str = self.backend_option or "embedded"
        """The backend named on the command line (else embedded); a scenario profile may name
        another (see `run_config`)."""
        self.model_option: str | None = given["model"]
        self.score_mode_option: str | None = given["score_mode"]
        self.threads: int | None = given["threads"]
        """CPU threads of each embedded server (None: llama.cpp's default)."""
        self.base_url: str | None = given["base_url"]
        self.profile: str = given["profile"] or default_profile(self.backend_name)
        self.report_dir = self._path(opt.harness_report_dir)
        self.scenario_dir = self._path(opt.harness_scenario_dir)
        self.config_path = self._path(given["config"] or str(DEFAULT_CONFIG_PATH))
        self.price_per_kwh: float = opt.harness_price_per_kwh
        self.memory_budget: str | None = opt.memory_budget
        self.write_config: bool = opt.write_config
        self.job: dict[str, str] = job_given(given)
        """The user's job (`--harness-input`, `--harness-prompt`, `--harness-id-column`) as
        workload settings, laid over every scenario (`Scenario.with_job`); empty: generated
        rows and each scenario's prompt."""
        self.reports = Reports(
            ReportContext(
                profile=self.profile,
                root=self.root,
                report_dir=self.report_dir,
                config_path=self.config_path,
                write_config=self.write_config,
                backend_info=self.backend_info,
                machine=self.machine,
                from_validated=given.from_validated,
                unlike_harness_run=self.unlike_harness_run,
                prompt=Path(self.job["prompt"]) if self.job.get("prompt") else None,
            )
        )
        """The phase reports written this session (harness.pytest.reporting)."""
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
                self._scenarios[filename] = load_scenario(path).with_job(self.job)
            except ConfigError as exc:
                problem = str(exc).replace(str(path), self.relpath(path))
            else:
                return self._scenarios[filename]
            pytest.fail(f"bad scenario: {problem}", pytrace=False)
        return self._scenarios[filename]

    def run_config(self, scenario: Scenario | None = None, **cli: Any) -> RunConfig:
        """The run's settings for a scenario: the command line, then harness.yaml (measured
        on the same backend), then the scenario's profile, then defaults (harness.run.resolve).
        `cli` overrides what a suite sets itself (a sweep's slots, say)."""
        given = {
            "backend": self.backend_option,
            "model": self.model_option,
            "base_url": self.base_url,
            "score_mode": self.score_mode_option,
            "threads": self.threads,
        }
        return resolve(
            profile=self.profile,
            config_path=self.config_path,
            scenario=scenario,
            cli={**given, **cli},
        )

    def model_for(self, scenario: Scenario | None = None) -> str:
        return self.run_config(scenario).model.value

    def backend(self, cfg: RunConfig) -> Backend:
        """A started backend for these settings, shared for the session."""
        if cfg.backend.value == "openai" and not cfg.base_url.value:
            cfg = replace(cfg, base_url=Value(OPENAI_URL, DEFAULT))
        key = (cfg.backend.value, cfg.pool_size, tuple(cfg.member_specs()), cfg.endpoints.value)
        if key not in self._backends:
            # Several servers (the profile's endpoints: or servers: N) are one pool over them;
            # the run's concurrency is per server (`RunConfig.total_concurrency`).
            backend = open_backend(cfg)
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

    def backend_info(
        self, backend: Backend | None, scenario: Scenario | None = None
    ) -> dict[str, Any]:
        """The server a report's figures came from; without a backend, what the scenario's
        settings name (a phase that built its own servers)."""
        if backend is None:
            cfg = self.run_config(scenario)
            return {"name": cfg.backend.value, "model": cfg.model.value}
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
        if info.extra.get("pool"):
            out["endpoints"] = list(info.extra.get("endpoints", []))
        for key in ("server_flags", "llama_server_args", "llama_cpp", "replay"):
            if key in info.extra:
                out[key] = info.extra[key]
        if info.backend == "embedded":
            out["note"] = (
                f"the embedded server runs {info.extra.get('llama_cpp', 'llama.cpp')}; Ollama "
                "runs its own pinned llama.cpp build. CPU memory readings do not predict GPU "
                "buffers or layer offload."
            )
        return out

    # -- reports (harness.pytest.reporting) ----------------------------------------------------

    def machine(self) -> dict[str, Any]:
        if self._machine is None:
            info = machine_info()
            self.config.hook.pytest_harness_machine_info(config=self.config, info=info)
            self._machine = info
        return self._machine

    def relpath(self, path: Path) -> str:
        return self.reports.context.relpath(path)

    def report(
        self,
        filename: str,
        scenario: Scenario,
        figures: dict[str, Any],
        *,
        backend: Backend | None = None,
        key: str | None = None,
        stopped: str | None = None,
        defaults: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Evaluate the scenario's criteria on `figures`, write the phase's report, remember it
        (see `Reports.write`)."""
        return self.reports.write(
            filename, scenario, figures, backend=backend, key=key, stopped=stopped,
            defaults=defaults,
        )  # fmt: skip

    def gate(self, report: dict[str, Any]) -> None:
        """Fail the current test unless the report's criteria were checked and met."""
        self.reports.gate(report)

    def recommend(
        self,
        values: dict[str, Any],
        report: dict[str, Any] | Path,
        backend: Backend | None,
        *,
        configured: Mapping[str, str] | None = None,
    ) -> None:
        """Write measured values back to harness.yaml (with --harness-write-config); `report`:
        the report (as `report()` returned it) they were measured in; `configured`: the values
        among them the phase was given, not measured, each with where it came from."""
        self.reports.recommend(values, report, backend, configured=configured)

    def unlike_harness_run(self, scenario: Scenario) -> dict[str, str]:
        """With a job, the settings this phase sends otherwise than `harness run` would send
        that job on the same backend (`harness.run.resolve` with and without the scenario and
        `RUN_RULES`): each `setting: "<phase's> (<source>); harness run: <run's> (<source>)"`.
        A phase varies them on purpose (the stand-in's scale phases send Ollama's text form,
        where `harness run` on the embedded server sends token ids); its report says so."""
        if not self.job:
            return {}
        phase = self.run_config(scenario)
        given = {"backend": phase.backend.value, "model": self.model_option,
                 "base_url": self.base_url, "score_mode": self.score_mode_option,
                 "threads": self.threads}  # fmt: skip
        run = resolve(
            profile=self.profile, config_path=self.config_path, cli=given, rules=RUN_RULES
        )
        out = {}
        for name in ("request_path", "concurrency", "strategy", "score_mode"):
            a, b = getattr(phase, name), getattr(run, name)
            if a.value != b.value:
                out[name] = f"{a.value} ({a.source}); harness run: {b.value} ({b.source})"
        return out

    def report_path(self, report: dict[str, Any]) -> Path:
        """The file a report written this session went to."""
        return self.reports.path_of(report)


def job_given(given: Mapping[str, Any]) -> dict[str, str]:
    """The job the `--harness-*` options give, as workload settings (paths absolute, read from
    where pytest was started), checked now: the input's rows and the prompt's columns, so a bad
    file stops the run before any server starts, with the file and line (a usage error)."""
    job: dict[str, str] = {}
    if given.get("input"):
        job["candidates"] = str(Path(given["input"]).resolve())
    if given.get("prompt"):
        job["prompt"] = str(Path(given["prompt"]).resolve())
    if given.get("id_column"):
        if "candidates" not in job:
            raise pytest.UsageError(
                "--harness-id-column names a column of --harness-input: give both"
            )
        job["id_column"] = str(given["id_column"])
    try:
        prompt = load_prompt(job.get("prompt"))
        if "candidates" in job:
            table = read_candidates_csv(job["candidates"], job.get("id_column", "id"))
            prompt.check_columns(table.columns, table.path)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    return job


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
