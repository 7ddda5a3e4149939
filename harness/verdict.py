"""The answer a user came for: go or no-go for the production run, read from every report.

`read_reports(report_dir)` lists every phase report in the folder (not only this session's),
each with its model, backend, profile, prompt, server, time, harness version and result:
`PASS` (criteria checked and met), `FAIL`, or `ungated` (no criteria: never a pass).
`verdict(...)` then says, for the production profile (`PRODUCTION`: Ollama, Gemma 3 12B):

- **GO** only when every phase the roadmap asks for has a report of that profile that passed,
  and every one of them measured what will run: the profile's backend and model, one server
  and its flags, the prompt `harness run` sends (its sha256), the settings harness.yaml holds
  now, written by this harness version — from a real server, never a test double or a replay;
- **NO-GO** when a production report failed, or measured something else (another model or
  backend, a second prompt or server, a test double, a replayed Ollama), or was gated more
  loosely than the project's own scenario for its phase (a criterion left out, a threshold
  loosened: `looser_gates`), or was run otherwise than `harness run` will run the job (another
  strategy, concurrency, score mode or request path than harness.yaml and harness run's own
  rules resolve now: `unlike_the_run`): it names the report and the field;
- **incomplete** when phases are missing, ungated, or their evidence is stale (another harness
  version, settings harness.yaml no longer holds, a report that does not name its prompt or
  the run settings it measured with);
- **not measured for production** when only a stand-in ran (the embedded CPU profile): what it
  predicts, and that it is a prediction.

With it: the settings to run with (harness.yaml's values and their provenance), every report
the decision read (its date, harness version and commit), the 170K projection from a finished,
passing scale run of the same identity (`projection_sources`, the rule `harness plan` uses
too), and what was not measured. Every rule that can make it GO has a test in
tests/test_verdict.py that fails when the rule is removed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__
from harness.config import ProfileConfig, load_profile, measured_values
from harness.errors import ConfigError, HarnessError
from harness.nextsteps import Evidence, next_step
from harness.reportfiles import base_name, not_a_measurement
from harness.run.resolve import RUN_RULES, resolve
from harness.scenarios import load_scenario
from harness.scoring import mode_of_report
from harness.workload import load_prompt

__all__ = [
    "PRODUCTION",
    "PRODUCTION_PROFILE",
    "PROMPT_BOUND",
    "REQUIRED_PHASES",
    "ReportEntry",
    "Verdict",
    "failed_runs",
    "is_double",
    "largest",
    "measured_as",
    "projection_sources",
    "read_reports",
    "servers_of",
    "verdict",
]

PRODUCTION_PROFILE = "gpu-gemma3-12b"
PRODUCTION: Mapping[str, str] = {
    "profile": PRODUCTION_PROFILE,
    "backend": "ollama",
    "model": "gemma3:12b",
}
"""What the production run is; the scenarios' `gpu-gemma3-12b` profiles name the same backend
and model (tests/test_verdict.py checks they agree)."""
REQUIRED_PHASES: tuple[tuple[str, str], ...] = (
    ("context limits", "context_limit_results.json"),
    ("prefix reuse", "prefix_reuse_results.json"),
    ("scale 100", "performance_benchmarks_100.json"),
    ("scale 1K", "performance_benchmarks_1000.json"),
    ("scale 10K", "performance_benchmarks_10000.json"),
    ("quality", "quality_results.json"),
    ("reliability", "reliability_results.json"),
)
"""The roadmap's phases a production run needs, by report (base) name."""
PROMPT_BOUND = frozenset({"context_limits", "scale", "quality", "performance"})
"""Phases whose figures depend on the prompt (its length, its reuse, its scores): their reports
must name the prompt `harness run` sends. Reliability counts ids, retries and faults: its own
short prompt does not change what it shows. Prefix reuse (phase `context_limits`) is bound."""
PROJECT_SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
"""The project's own scenarios: a production report must have been gated by its phase's
criteria there, no looser (`looser_gates`)."""
ROWS = 170_000
_CONFIG_KEYS = {
    "MAX_CONTEXT_TOKENS": "MAX_CONTEXT_TOKENS",
    "CONTEXT_TRIM_THRESHOLD": "CONTEXT_TRIM_THRESHOLD",
    "TRIM_INTERVAL": "TRIM_INTERVAL",
    "n_ctx": "n_ctx",
    "parallel": "parallel",
    "CONCURRENCY": "concurrency",
    "STRATEGY": "strategy",
    "REQUEST_PATH": "request_path",
    "SERVER_FLAGS": "server_flags",
}
"""harness.yaml keys → the setting's name in a report's `config` block."""
AS_RUN: Mapping[str, tuple[str, ...]] = {
    "scale": ("strategy", "concurrency", "score_mode", "request_path"),
    "quality": ("score_mode",),
}
"""Per phase, the settings of `harness run` its figures depend on: throughput, savings and the
projection on all four; the scores on the score mode. A production report must have measured
with the values `harness run` resolves for the job now (`unlike_the_run`)."""


@dataclass(frozen=True, slots=True)
class ReportEntry:
    """One phase report found in the folder."""

    file: str
    phase: str
    profile: str
    model: str
    backend: str
    generated_at: str
    result: str
    """`PASS`, `FAIL` or `ungated`."""
    failed: tuple[str, ...]
    data: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def base(self) -> str:
        """The roadmap's name of the report (`performance_benchmarks_100.json`)."""
        return base_name(self.file)

    @property
    def strategy(self) -> str | None:
        st = self.data.get("strategy")
        return st.get("name") if isinstance(st, Mapping) else None

    @property
    def backend_block(self) -> Mapping[str, Any]:
        b = self.data.get("backend")
        return b if isinstance(b, Mapping) else {}

    @property
    def server(self) -> str | None:
        """The server software and version that answered (`ollama 0.34.0`), when named."""
        s = self.backend_block.get("server")
        return str(s) if s else None

    @property
    def server_identity(self) -> tuple[str, str] | None:
        """(server, flags): what must be one across a production set."""
        if self.server is None:
            return None
        flags = self.backend_block.get("server_flags") or "-"
        return (self.server, str(flags))

    @property
    def prompt_sha256(self) -> str | None:
        prompt = self.data.get("prompt")
        sha = prompt.get("sha256") if isinstance(prompt, Mapping) else None
        return str(sha) if sha else None

    @property
    def provenance(self) -> str:
        """`<date>, harness <version> @ <commit>`: who wrote the report, when."""
        commit = self.data.get("commit_info")
        ident = "no commit"
        if isinstance(commit, Mapping) and commit.get("id"):
            ident = str(commit["id"])[:12] + (" (dirty)" if commit.get("dirty") else "")
        version = self.data.get("harness_version")
        return f"{self.generated_at or 'no date'}, harness {version} @ {ident}"

    @property
    def finished(self) -> bool:
        return self.data.get("finished") is not False


def _result(data: Mapping[str, Any]) -> str:
    passed = data.get("passed")
    if passed is True and data.get("criteria"):
        return "PASS"
    if passed is False:
        return "FAIL"
    return "ungated"


def read_reports(report_dir: Path, *, unreadable: list[str] | None = None) -> list[ReportEntry]:
    """Every phase report (a JSON file with `phase` and `criteria`) in the folder, by name.
    Files that do not parse are skipped; their names go to `unreadable` when given."""
    out: list[ReportEntry] = []
    for path in sorted(report_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if unreadable is not None:
                unreadable.append(f"{path.name}: unreadable ({type(exc).__name__})")
            continue
        if not isinstance(data, dict) or "phase" not in data or "criteria" not in data:
            continue
        raw_backend = data.get("backend")
        backend: dict[str, Any] = raw_backend if isinstance(raw_backend, dict) else {}
        failed = tuple(
            f"{c.get('metric')} = {c.get('value')!r}, needs {c.get('op')} {c.get('threshold')}"
            + (f" ({c['reason']})" if c.get("reason") else "")
            + (f"; {c['note']}" if c.get("note") else "")
            for c in data.get("criteria") or []
            if isinstance(c, dict) and c.get("passed") is False
        )
        out.append(
            ReportEntry(
                file=path.name,
                phase=str(data.get("phase")),
                profile=str(data.get("profile")),
                model=str(backend.get("model") or data.get("model") or "?"),
                backend=str(backend.get("name") or "?"),
                generated_at=str(data.get("generated_at", "")),
                result=_result(data),
                failed=failed,
                data=data,
            )
        )
    return out


def is_double(e: ReportEntry) -> str | None:
    """Why a report's figures are not a measurement (a test double, a replayed server), or
    None (`reportfiles.not_a_measurement`)."""
    return not_a_measurement(e.data)


def projection_sources(
    entries: Sequence[ReportEntry],
    *,
    model: str | None = None,
    backend: str | None = None,
    strategy: str | None = None,
    profile: str | None = None,
    result: str = "PASS",
) -> list[ReportEntry]:
    """The scale reports a projection may come from: finished, passed, measured (no double or
    replay), with a throughput; of this model, backend, strategy and profile where given.
    `harness plan` and the verdict both take the largest of these (`max(..., key=requests)`).
    `result="FAIL"`: the same runs that failed (`failed_runs`: shown, never a reference)."""
    return [
        e
        for e in entries
        if e.phase == "scale"
        and e.finished
        and e.result == result
        and is_double(e) is None
        and float(e.data.get("throughput_rps") or 0) > 0
        and (model is None or e.model == model)
        and (backend is None or e.backend == backend)
        and (strategy is None or e.strategy == strategy)
        and (profile is None or e.profile == profile)
    ]


def largest(entries: Sequence[ReportEntry]) -> ReportEntry:
    """The report of the most requests (the longest, steadiest measurement)."""
    return max(entries, key=lambda e: int(e.data.get("requests") or 0))


@dataclass(slots=True)
class Verdict:
    decision: str
    """`GO`, `NO-GO`, `incomplete` or `not measured for production`."""
    reasons: list[str]
    settings: list[str]
    projection: list[str]
    not_measured: list[str]
    evidence: list[str] = field(default_factory=list)
    """Each report the decision read: its file, result, date, harness version and commit."""

    @property
    def exit_code(self) -> int:
        """`harness verdict`'s exit status: 0 for GO, 1 for anything else."""
        return 0 if self.decision == "GO" else 1

    def lines(self) -> list[str]:
        out = [f"verdict: {self.decision}"]
        out += [f"  {r}" for r in self.reasons]
        if self.evidence:
            out.append("evidence read:")
            out += [f"  {e}" for e in self.evidence]
        if self.settings:
            out.append("settings to run with (harness.yaml):")
            out += [f"  {s}" for s in self.settings]
        if self.projection:
            out.append("projection:")
            out += [f"  {p}" for p in self.projection]
        if self.not_measured:
            out.append("not measured:")
            out += [f"  {n}" for n in self.not_measured]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reasons": self.reasons,
            "settings": self.settings,
            "projection": self.projection,
            "not_measured": self.not_measured,
            "evidence": self.evidence,
        }


def _settings(config: ProfileConfig | str) -> list[str]:
    if isinstance(config, str):
        return [config]
    out = []
    for key, value in config.values.items():
        prov = config.provenance.get(key)
        src = (
            f"{prov.get('report')} ({prov.get('backend')}, {prov.get('date')})"
            if isinstance(prov, Mapping)
            else "set by hand"
        )
        if isinstance(prov, Mapping) and prov.get("kind") == "configured":
            src = f"configured, not measured: {prov.get('configured')}; written with {src}"
        out.append(f"{key}: {value} — {src}")
    return out


def _load_config(config_path: Path, profile: str) -> ProfileConfig | str:
    try:
        return load_profile(config_path, profile)
    except HarnessError as exc:  # a broken harness.yaml is reported, not fatal here
        return f"{config_path}: {exc}"


def stale_reasons(e: ReportEntry, config: ProfileConfig | None) -> list[str]:
    """Why a report no longer describes what would run: another harness version wrote it, or
    it measured settings harness.yaml no longer holds (values harness.yaml takes for this
    backend and model, other than those the report itself wrote back)."""
    out: list[str] = []
    if e.data.get("harness_version") != __version__:
        out.append(
            f"written by harness {e.data.get('harness_version')}, this is harness {__version__}"
        )
    block = e.data.get("config")
    if config is None or not isinstance(block, Mapping):
        return out
    applies, _ = measured_values(config, e.backend, e.model)
    for key, value in applies.items():
        name = _CONFIG_KEYS.get(key)
        setting = block.get(name) if name else None
        if not isinstance(setting, Mapping):
            continue
        prov = config.provenance.get(key)
        if isinstance(prov, Mapping) and base_name(Path(str(prov.get("report"))).name) == e.base:
            continue  # this report wrote the value: it does not depend on it
        source = str(setting.get("source", ""))
        if source.startswith("capped") or "server's context" in source:
            continue  # the server's context capped it: `harness run` caps it the same way
        if setting.get("value") != value:
            out.append(
                f"measured with {name} = {setting.get('value')!r} ({source}); harness.yaml "
                f"now says {key}: {value!r}"
            )
    return out


def _measured_with(e: ReportEntry, key: str) -> Any:
    """The value of run setting `key` a report measured with (None: not recorded)."""
    block = e.data.get("config")
    setting = block.get(key) if isinstance(block, Mapping) else None
    if isinstance(setting, Mapping) and "value" in setting:
        return setting["value"]
    if key == "score_mode" and isinstance(e.data.get("score_mode"), str):
        return e.data["score_mode"]  # the quality phase's report names its mode alone
    return None


def unlike_the_run(e: ReportEntry, run: Any) -> tuple[list[str], list[str]]:
    """(differs, unrecorded): the `AS_RUN` settings of its phase `e` measured otherwise than
    `run` (`harness run`'s resolved settings for the job) will send, each naming the field, the
    value and where each side's came from; and those the report does not record."""
    differs: list[str] = []
    unrecorded: list[str] = []
    for key in AS_RUN.get(e.phase, ()):
        want = getattr(run, key)
        if want.value is None:
            continue  # the backend's own (Ollama's request path): nothing to compare
        got = _measured_with(e, key)
        if got is None:
            unrecorded.append(key)
        elif got != want.value:
            block = e.data.get("config")
            setting = block.get(key) if isinstance(block, Mapping) else None
            source = f" ({setting.get('source')})" if isinstance(setting, Mapping) else ""
            differs.append(
                f"config.{key} = {got!r}{source}; harness run will send {want.value!r} "
                f"({want.source})"
            )
    return differs, unrecorded


def _run_settings(config_path: Path) -> Any:
    """What `harness run` resolves for the production job now (harness.yaml, its rules), or
    the error that stops it."""
    cli = {"backend": PRODUCTION["backend"], "model": PRODUCTION["model"]}
    try:
        return resolve(
            profile=PRODUCTION_PROFILE, config_path=config_path, cli=cli, rules=RUN_RULES
        )
    except HarnessError as exc:
        return f"what harness run will send cannot be resolved: {exc}"


def _newest(entries: Sequence[ReportEntry]) -> ReportEntry:
    return max(entries, key=lambda e: e.generated_at)


def failed_runs(
    entries: Sequence[ReportEntry], *, model: str | None = None, backend: str | None = None
) -> list[ReportEntry]:
    """Finished, measured scale runs with a throughput that failed their criteria: the time a
    NO-GO's job would take is shown from one, labelled, and never used as a reference."""
    return projection_sources(entries, model=model, backend=backend, result="FAIL")


def measured_as(e: ReportEntry) -> str:
    """What a scale run sent, for a line that quotes its throughput: its rows, strategy,
    concurrency and uncached tokens a request (what its rate depends on)."""
    job = e.data.get("job")
    rows = job.get("rows") if isinstance(job, Mapping) and job.get("rows") else "generated rows"
    cfg = e.data.get("config")
    conc = cfg.get("concurrency") if isinstance(cfg, Mapping) else None
    parts = [str(rows), f"strategy {e.strategy or '?'}"]
    if isinstance(conc, Mapping) and conc.get("value") is not None:
        parts.append(f"concurrency {conc['value']}")
    uncached = e.data.get("uncached_tokens_per_request")
    if isinstance(uncached, int | float):
        parts.append(f"{uncached:.0f} uncached tokens a row")
    return ", ".join(parts)


def _projection(
    source: Sequence[ReportEntry], note: str = "", *, failed: Sequence[ReportEntry] = ()
) -> list[str]:
    if source:
        best = largest(source)
        how = "a finished run that passed its criteria"
    elif failed:
        best = largest(failed)
        first = best.failed[0].split(";")[0] if best.failed else "its criteria"
        how = f"from a run that failed ({first}): shown, not a reference"
    else:
        return []
    rps = float(best.data["throughput_rps"])
    servers = servers_of(best)
    each = f", {rps / servers:.2f} req/s per server over {servers} servers" if servers > 1 else ""
    out = [
        f"{ROWS:,} rows at {rps:.2f} req/s{each} (measured in {best.file}, {best.model} on "
        f"{best.backend}, {mode_of_report(best.data)}, {measured_as(best)}; {how}): "
        f"{ROWS / rps / 3600:.1f} h{note}"
    ]
    energy, done = best.data.get("energy_wh"), best.data.get("completed")
    price = best.data.get("price_per_kwh")
    if energy and done:
        kwh = float(energy) / float(done) * ROWS / 1000
        cost = f", ${kwh * float(price):.2f} at ${price}/kWh" if price is not None else ""
        out.append(
            f"energy: {kwh:.1f} kWh for {ROWS:,} rows{cost} ({best.data.get('energy_source')}, "
            f"{best.file})"
        )
    else:
        out.append(f"cost: not measured ({best.file} has no GPU energy reading)")
    return out


def _as_strict(op: str, threshold: Any, want_op: str, want: Any) -> bool:
    """Whether `metric op threshold` (a report's gate) lets through no value the project's
    `metric want_op want` refuses."""
    if isinstance(want, str) or isinstance(threshold, str) or want_op in ("==", "!="):
        return (op, threshold) == (want_op, want) or (
            op == "==" and want_op != "!=" and not isinstance(want, str)
            and not isinstance(threshold, str) and threshold == want
        )  # fmt: skip
    try:
        t, w = float(threshold), float(want)
    except (TypeError, ValueError):
        return False
    if want_op in (">=", ">"):
        if op == "==":
            return t > w or (t == w and want_op == ">=")
        return op in (">=", ">") and (t > w or (t == w and (op == ">" or want_op == ">=")))
    if op == "==":
        return t < w or (t == w and want_op == "<=")
    return op in ("<=", "<") and (t < w or (t == w and (op == "<" or want_op == "<=")))


def looser_gates(e: ReportEntry, scenarios: Path = PROJECT_SCENARIOS) -> list[str]:
    """What the report's gates miss or loosen of the project's own for its phase and profile
    (the scenario of the same name under `scenarios`), one line each; empty when every one of
    the project's criteria was checked as strictly or more (a stricter scenario is fine)."""
    named = str(e.data.get("scenario") or "")
    path = scenarios / Path(named).name
    if not named or not path.is_file():
        return [f"gated by {named or 'no scenario'}, not one of the project's scenarios"]
    try:
        want = load_scenario(path).criteria_for(e.profile)
    except HarnessError as exc:
        return [f"the project's gates cannot be read: {exc}"]
    got = [c for c in e.data.get("criteria") or [] if isinstance(c, Mapping)]
    out = []
    for c in want:
        mine = [g for g in got if g.get("metric") == c.metric]
        shown = f"{c.metric} {c.op} {c.threshold:g}" if not isinstance(c.threshold, str) else (
            f"{c.metric} {c.op} {c.threshold}")  # fmt: skip
        if not mine:
            out.append(f"{shown} (scenarios/{path.name}) was not checked")
        elif not any(_as_strict(str(g.get("op")), g.get("threshold"), c.op, c.threshold)
                     for g in mine):  # fmt: skip
            had = ", ".join(f"{g.get('op')} {g.get('threshold')}" for g in mine)
            out.append(f"{c.metric} was checked {had}, looser than the project's {shown} "
                       f"(scenarios/{path.name})")  # fmt: skip
    return out


def servers_of(e: ReportEntry) -> int:
    """How many servers a scale run went over (a pool's aggregate throughput is theirs)."""
    st = e.data.get("strategy")
    n = st.get("servers") if isinstance(st, Mapping) else None
    endpoints = e.data.get("endpoints")
    if isinstance(endpoints, list) and endpoints:
        return len(endpoints)
    return int(n) if isinstance(n, int) and n > 0 else 1


def verdict(report_dir: Path, config_path: Path, *, prompt: Path | None = None) -> Verdict:
    """The verdict over every report in `report_dir` (see the module docstring). `prompt`: the
    prompt file `harness run` will send (default: the packaged rubric, as `harness run`)."""
    unreadable: list[str] = []
    entries = read_reports(report_dir, unreadable=unreadable)
    not_measured = list(unreadable)
    for e in entries:
        why = is_double(e)
        if e.result == "ungated":
            not_measured.append(f"{e.file}: ungated (no criteria were checked)")
        if why:
            not_measured.append(f"{e.file}: {why}")
        source = e.data.get("cached_tokens_source")
        if e.phase == "scale" and not why and source not in (None, "server", "llama.cpp timings"):
            not_measured.append(f"{e.file}: cached tokens {source}, not reported by the server")
    prod = [e for e in entries if e.profile == PRODUCTION_PROFILE]
    if not prod:
        return _stand_in(entries, config_path, not_measured)

    config = _load_config(config_path, PRODUCTION_PROFILE)
    no_go: list[str] = []
    incomplete: list[str] = []
    # Measured on the production backend and model, by a real server.
    for e in prod:
        why = is_double(e)
        if why:
            no_go.append(f"{e.file}: {why} (backend.server: {e.server})")
        if e.backend != PRODUCTION["backend"]:
            no_go.append(
                f"{e.file}: backend.name is {e.backend!r}, the production profile runs "
                f"{PRODUCTION['backend']!r}"
            )
        if e.model != PRODUCTION["model"]:
            no_go.append(
                f"{e.file}: backend.model is {e.model!r}, the production profile runs "
                f"{PRODUCTION['model']!r} (a run with --harness-model under "
                f"{PRODUCTION_PROFILE}: move the report away or measure {PRODUCTION['model']})"
            )
    # Per phase, the newest report of the production model (older ones are superseded).
    chosen: dict[str, ReportEntry] = {}
    for name, base in REQUIRED_PHASES:
        mine = [e for e in prod if e.base == base and e.model == PRODUCTION["model"]]
        if mine:
            chosen[name] = _newest(mine)
    missing = [name for name, _ in REQUIRED_PHASES if name not in chosen]
    # One prompt: the one `harness run` sends.
    try:
        expected = load_prompt(prompt)
        want_sha: str | None = expected.sha256
    except HarnessError as exc:
        want_sha = None
        incomplete.append(f"the prompt harness run sends cannot be read: {exc}")
    for e in chosen.values():
        if e.phase not in PROMPT_BOUND:
            continue
        sha = e.prompt_sha256
        if sha is None:
            incomplete.append(
                f"{e.file}: names no prompt (written before reports named theirs): re-run it"
            )
        elif want_sha is not None and sha != want_sha:
            shown = (e.data.get("prompt") or {}).get("file")
            no_go.append(
                f"{e.file}: prompt.sha256 {sha[:12]} ({shown}) is not the prompt harness run "
                f"sends ({expected.path}, sha256 {want_sha[:12]})"
            )
    # One server and one set of flags across the set.
    servers: dict[tuple[str, str], list[str]] = {}
    for e in chosen.values():
        ident = e.server_identity
        if ident is not None:
            servers.setdefault(ident, []).append(e.file)
    if len(servers) > 1:
        shown = "; ".join(
            f"{s} (flags {f}): {', '.join(files)}" for (s, f), files in servers.items()
        )
        no_go.append(f"backend.server differs across the reports: {shown}")
    # Stale evidence.
    cfg = config if isinstance(config, ProfileConfig) else None
    for e in chosen.values():
        for why in stale_reasons(e, cfg):
            incomplete.append(f"{e.file}: stale: {why}")
    failed = [e for e in chosen.values() if e.result == "FAIL"]
    evidence_of = _evidence([e for e in prod if e.model == PRODUCTION["model"]])
    no_go += [line for e in failed for line in failed_with_next_steps(e, evidence_of)]
    # Gated by the project's own criteria, no looser: a report's PASS is only as good as them
    # (an ungated report is missing evidence: incomplete, below).
    for e in (e for e in chosen.values() if e.result == "PASS"):
        no_go += [f"{e.file}: gates looser than the project's: {why}" for why in looser_gates(e)]
    # Measured as `harness run` will run the job: the settings its figures depend on.
    run = _run_settings(config_path)
    if isinstance(run, str):
        incomplete.append(run)
    else:
        for e in chosen.values():
            differs, unrecorded = unlike_the_run(e, run)
            no_go += [
                f"{e.file}: not measured as harness run will run the job: {d}" for d in differs
            ]
            if unrecorded:
                incomplete.append(
                    f"{e.file}: names no {', '.join(f'config.{k}' for k in unrecorded)} "
                    f"(written before reports named them): re-run it"
                )
    ungated = [e.file for e in chosen.values() if e.result == "ungated"]
    if ungated:
        incomplete.append("ungated production reports: " + ", ".join(ungated))
    if missing:
        incomplete.insert(0, f"phases not run yet for {PRODUCTION_PROFILE}: {', '.join(missing)}")
    if no_go:
        decision, reasons = "NO-GO", no_go + incomplete
    elif incomplete:
        decision, reasons = "incomplete", incomplete
    else:
        decision = "GO"
        reasons = [
            f"every required phase of {PRODUCTION_PROFILE} passed, measured on "
            f"{PRODUCTION['model']} ({PRODUCTION['backend']}, "
            + ", ".join(f"{s} flags {f}" for s, f in servers)
            + f") with the prompt harness run sends (sha256 {str(want_sha)[:12]})"
        ]
    evidence = [f"{e.file}: {e.result}, {e.provenance}" for e in chosen.values()]
    # The projection: a finished, passing scale run of the chosen set's identity.
    idents = {e.server_identity for e in chosen.values() if e.server_identity}
    source = [
        e
        for e in projection_sources(
            list(chosen.values()), model=PRODUCTION["model"], backend=PRODUCTION["backend"]
        )
        if e.server_identity in idents or e.server_identity is None
    ]
    note = "" if decision == "GO" else f" (from a set whose verdict is {decision})"
    failed = failed_runs(
        list(chosen.values()), model=PRODUCTION["model"], backend=PRODUCTION["backend"]
    )
    projection = _projection(source, note, failed=failed)
    return Verdict(decision, reasons, _settings(config), projection, not_measured, evidence)


def _evidence(entries: Sequence[ReportEntry]) -> Evidence:
    """The newest concurrency, performance and context-limits reports among `entries`: what a
    next step quotes."""

    def newest(base: str) -> Mapping[str, Any] | None:
        mine = [e for e in entries if e.base == base]
        return _newest(mine).data if mine else None

    return Evidence(
        concurrency=newest("concurrency_results.json"),
        performance=newest("performance_comparison.json"),
        context=newest("context_limit_results.json"),
        rows=ROWS,
    )


def failed_with_next_steps(e: ReportEntry, evidence: Evidence) -> list[str]:
    """One line per failed criterion of `e`: the criterion, then what to try
    (`harness.nextsteps`), grounded in what the reports measured."""
    criteria = [
        c
        for c in e.data.get("criteria") or []
        if isinstance(c, Mapping) and c.get("passed") is False
    ]
    if not criteria:
        return [f"{e.file} FAIL: {'; '.join(e.failed) or 'its criteria'}"]
    return [
        f"{e.file} FAIL: {said}; next: {next_step(c, e.data, evidence)}"
        for said, c in zip(e.failed, criteria, strict=True)
    ]


def _stand_in(
    entries: Sequence[ReportEntry], config_path: Path, not_measured: list[str]
) -> Verdict:
    """No production report: what a stand-in predicts, said as a prediction."""
    stand_ins = sorted({f"{e.profile} ({e.model} on {e.backend})" for e in entries})
    reasons = [
        f"no report of the production profile ({PRODUCTION_PROFILE}: Ollama, Gemma 3 12B, GPU)",
        "this folder holds a stand-in's reports: "
        + (", ".join(stand_ins) or "none")
        + ". They predict the pipeline's behaviour (caching, trims, memory per token), "
        "not production's throughput or scores",
    ]
    ev = _evidence(list(entries))
    reasons += [
        f"stand-in FAIL: {line}"
        for e in entries
        if e.result == "FAIL"
        for line in failed_with_next_steps(e, ev)
    ]
    config = _load_config(config_path, "embedded")
    cfg = config if isinstance(config, ProfileConfig) else None
    for e in entries:
        not_measured += [f"{e.file}: stale: {why}" for why in stale_reasons(e, cfg)]
    evidence = [f"{e.file}: {e.result}, {e.provenance}" for e in entries]
    return Verdict(
        "not measured for production",
        reasons,
        _settings(config),
        _projection(
            projection_sources(entries),
            " (a stand-in: a prediction, not production)",
            failed=failed_runs(entries),
        ),
        not_measured,
        evidence,
    )


def check_folder(report_dir: Path) -> None:
    """Raise ConfigError when `report_dir` cannot be read as a reports folder."""
    if not report_dir.exists():
        raise ConfigError(f"{report_dir}: no such folder (give the folder pytest wrote to)")
    if not report_dir.is_dir():
        raise ConfigError(f"{report_dir}: not a folder")
    try:
        next(iter(report_dir.iterdir()), None)
    except OSError as exc:
        raise ConfigError(f"{report_dir}: cannot be read ({exc.strerror})") from None
