"""Scenario files (`scenarios/*.yaml`): one per phase, validated on load.

A scenario names its phase, describes the workload and the strategy, and holds per-profile
settings: which backend and model, overrides, `expected` figures (informational, from the
roadmap) and `criteria` (what gates CI). A criterion is `"metric op threshold"`, e.g.
`"token_savings >= 0.97"`; metrics are dotted paths into the phase's report
(`latency_ms.p95`, `memory.peak_bytes`). Unknown keys, metrics or operators are errors naming
the file, the key and its line.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.errors import ConfigError

__all__ = [
    "JOB_FIELDS",
    "PHASE_METRICS",
    "Criterion",
    "CriterionResult",
    "ProfileSpec",
    "Scenario",
    "StrategySpec",
    "WorkloadSpec",
    "evaluate",
    "load_scenario",
]

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}

_SCALE_METRICS = (
    "requests", "completed", "errors", "error_rate", "elapsed_s", "throughput_rps",
    "tokens.prompt", "tokens.cached", "tokens.completion", "token_savings",
    "token_savings_theoretical_max", "savings_efficiency", "latency_ms.p50", "latency_ms.p95",
    "latency_ms.p99", "context_trims", "memory.peak_bytes", "memory.peak_gb",
    "leak.server_bytes_per_hour", "leak.runner_bytes_per_hour", "leak.gpu_bytes_per_hour",
    "degradation.ratio",
    "projected_170k_s", "energy_wh", "cost", "projection_error",
    "uncached_tokens_per_request", "cached_coverage", "cached_tokens_source", "context_shifts",
    "memory.spilled", "finished", "memory.within_budget", "eta_error_max", "overflow_errors",
    "projected_170k_cost", "cached_omitted", "memory.failed_readings_rate",
    "memory.predicted_ratio_error", "scaling_efficiency",
)  # fmt: skip
PHASE_METRICS: dict[str, tuple[str, ...]] = {
    "context_limits": (
        "base_model_memory_bytes",
        "kv_bytes_per_token",
        "kv_bytes_per_token_theory",
        "kv_theory_ratio",
        "r_squared",
        "memory_budget_bytes",
        "max_context_tokens",
        "safe_context_tokens",
        "trim_interval_that_fits",
        "longest_prompt_tokens",
        "longest_prompt_fits",
        "search_steps",
        "max_measured_bytes",
        "within_budget",
        "prefix_reuse_at_workload",
        "prefix_reuse_min",
    ),
    "scale": _SCALE_METRICS,
    "quality": (
        "consistency_rate",
        "reproducible_rate",
        "score_files_identical",
        "accuracy",
        "bias_max_gap",
        "drift_spread",
        "parse_rate",
        "conversation_agreement",
        "distinct_scores",
        "score_stdev",
        "flips_not_near_tie",
        "mode_agreement",
        "expected_drift",
    ),
    "reliability": (
        "lost",
        "duplicated",
        "faults_injected",
        "retried_successes",
        "recorded_errors",
        "accounting_gap",
        "completed",
        "cases_run",
        "cases_failed",
        "keys_leaked",
        "replies_differ",
        "restart_failed",
    ),
    "performance": (
        "errors",
        "uncached_ratio_conversation_over_stateless_ollama",
        "recommendation_made",
        "tokens_over_chat",
        "tokens_over_chat_of_ceiling",
        "replies_same_reply",
        "replies_same_score",
        "conversation_over_stateless",
        "stateless_efficiency",
        "engine_over_direct",
        "cached_over_naive",
        "prefill_tps",
        "decode_tps",
        "logprobs_over_decode",
        "logprobs_efficiency",
        "score_agreement",
    ),
}

_CRITERION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkloadSpec(_Strict):
    """What is sent."""

    requests: int | None = Field(None, ge=1)
    prompt: str | None = None
    """Prompt file (relative to the scenario's folder), default the recruiter rubric."""
    candidates: str = "generated"
    """`generated` (seeded synthetic candidates) or a CSV path."""
    id_column: str = "id"
    """The CSV's column holding each row's unique id."""
    seed: int = 0
    max_tokens: int | None = Field(16, ge=1)
    """Reply tokens; None: what the prompt's output schema needs, as `harness run` sends
    (`harness.workload.tokens_for_schema`)."""
    structured: Literal["grammar", "schema", "none"] = "grammar"
    temperature: float = 0.0


class StrategySpec(_Strict):
    """How it is sent."""

    name: Literal["stateless", "conversation"] = "stateless"
    max_context_tokens: int | None = Field(None, ge=16)
    trim_threshold: int | None = Field(None, ge=1)
    trim_interval: int | None = Field(None, ge=1)
    keep_last: int = Field(0, ge=0)
    concurrency: int = Field(1, ge=1)


class ProfileSpec(_Strict):
    """Settings of one profile (e.g. `embedded`, `gpu-gemma3-12b`)."""

    backend: Literal["embedded", "openai", "ollama"] = "embedded"
    model: str | None = None
    n_ctx: int | None = Field(None, ge=16)
    parallel: int = Field(1, ge=1)
    swa_full: bool = False
    """llama.cpp: full-size KV for sliding-window layers (keeps the rubric reusable after a
    conversation's trim, for more KV memory per token). Not one of Ollama's flags."""
    server_flags: Literal["ollama", "harness"] | None = None
    """How the embedded server is started: `ollama` (the llama-server flags Ollama ≥ 0.30
    uses: what production runs) or `harness` (its own tuning). Default: ollama."""
    request_path: Literal["chat", "text", "tokens"] | None = None
    """How requests reach a llama.cpp server: `chat` (/v1/chat/completions), `text` (the
    prompt rendered as text to /completion, as Ollama sends it) or `tokens` (token ids)."""
    endpoints: list[str] | None = None
    """openai/ollama: the servers of one run (several URLs: a pool, `harness.backends.pool`);
    the command line's --harness-base-url (a comma list) replaces them."""
    servers: int = Field(1, ge=1)
    """embedded: servers to start (more than one: a pool over them; the cores shared)."""
    workload: dict[str, Any] = Field(default_factory=dict)
    strategy: dict[str, Any] = Field(default_factory=dict)
    sweep: list[int] | None = None
    """Context sizes to measure (context_limits)."""
    memory_budget: str | None = None
    expected: dict[str, Any] = Field(default_factory=dict)
    criteria: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    """Phase-specific settings (e.g. quality repeats)."""


class Scenario(_Strict):
    """One phase's scenario file."""

    name: str
    phase: Literal["context_limits", "scale", "quality", "reliability", "performance"]
    description: str = ""
    workload: WorkloadSpec = WorkloadSpec()
    strategy: StrategySpec = StrategySpec()
    profiles: dict[str, ProfileSpec]
    path: str = ""
    job: dict[str, str] | None = None
    """The user's job laid over this scenario (`with_job`): the workload settings it gave
    (`candidates`: the input file, `prompt`, `id_column`), which every profile then sends; None:
    the scenario's own workload (generated rows unless it names a CSV)."""
    as_run: dict[str, str] | None = None
    """With a job: the scenario's own settings `with_job` replaced by `harness run`'s
    (`RUN_SHAPE`), each `setting: "<the scenario's> -> <harness run's>"`."""

    @field_validator("profiles")
    @classmethod
    def _some_profile(cls, value: dict[str, ProfileSpec]) -> dict[str, ProfileSpec]:
        if not value:
            raise ValueError("a scenario needs at least one profile")
        return value

    def profile(self, name: str) -> ProfileSpec:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(
                f"{self.path}: no profile {name!r}; it has: {', '.join(sorted(self.profiles))}"
            ) from None

    def with_job(self, job: Mapping[str, str]) -> Scenario:
        """This scenario sending the user's job: `job`'s workload settings (`candidates`,
        `prompt`, `id_column`; paths absolute) replace the scenario's and every profile's own
        (a profile's probe prompt included), so each phase draws the user's rows and sends
        the user's prompt. What the phase adds (its size, samples, criteria) stays."""
        unknown = set(job) - JOB_FIELDS
        if unknown:
            raise ValueError(f"not a job setting: {', '.join(sorted(unknown))}")
        given = {k: str(v) for k, v in job.items() if v}
        if not given:
            return self
        # The job is sent as `harness run` sends it: its reply shape and its strategy
        # (`RUN_SHAPE`) replace the scenario's and every profile's, and the report says which.
        replaced: dict[str, str] = {}
        for name in (None, *self.profiles):
            wl = self.workload_for(name) if name else self.workload
            st = self.strategy_for(name) if name else self.strategy
            was = {"structured": wl.structured, "max_tokens": wl.max_tokens, "strategy": st.name}
            for key, (value, shown) in RUN_SHAPE.items():
                if was[key] != value:
                    where = f"profiles.{name}" if name else "the scenario"
                    replaced.setdefault(key, f"{was[key]} ({where}) -> {shown}")
        drop = set(given) | {"structured", "max_tokens"}
        profiles = {
            name: spec.model_copy(
                update={
                    "workload": {k: v for k, v in spec.workload.items() if k not in drop},
                    "strategy": {k: v for k, v in spec.strategy.items() if k != "name"},
                }
            )
            for name, spec in self.profiles.items()
        }
        shape = {"structured": "grammar", "max_tokens": None}
        return self.model_copy(
            update={
                "workload": self.workload.model_copy(update={**given, **shape}),
                "strategy": self.strategy.model_copy(update={"name": "stateless"}),
                "profiles": profiles,
                "job": given,
                "as_run": replaced,
            }
        )

    def workload_for(self, profile: str) -> WorkloadSpec:
        """The workload with the profile's overrides applied (validated)."""
        merged = {**self.workload.model_dump(), **self.profile(profile).workload}
        return _validate(WorkloadSpec, merged, self.path, f"profiles.{profile}.workload")

    def strategy_for(self, profile: str) -> StrategySpec:
        merged = {**self.strategy.model_dump(), **self.profile(profile).strategy}
        return _validate(StrategySpec, merged, self.path, f"profiles.{profile}.strategy")

    def criteria_for(self, profile: str) -> list[Criterion]:
        return [
            Criterion.parse(text, self.path, f"profiles.{profile}.criteria[{i}]", self.phase)
            for i, text in enumerate(self.profile(profile).criteria)
        ]


JOB_FIELDS = frozenset({"candidates", "prompt", "id_column"})
RUN_SHAPE: dict[str, tuple[Any, str]] = {
    "structured": ("grammar", "grammar (harness run's --structured default)"),
    "max_tokens": (None, "what the prompt's output schema needs (harness run's --max-tokens "
                   "default)"),
    "strategy": ("stateless", "harness.yaml's STRATEGY, else stateless (harness run's)"),
}  # fmt: skip
"""What a job's phases send as `harness run` does (`Scenario.with_job`): each setting, its
value in the scenario, and how `harness run` resolves it. The strategy is laid over as the
default, so harness.yaml's STRATEGY (read before a scenario's) still wins, as in the run."""
"""The workload settings that are the user's job, not a phase's (`Scenario.with_job`)."""

M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Mapping[str, Any], path: str, where: str) -> M:
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path, where)) from None


@dataclass(frozen=True, slots=True)
class Criterion:
    """`metric op threshold`, checked against a report."""

    metric: str
    op: str
    threshold: float | str
    """A number, or a word for `==` / `!=` (e.g. `cached_tokens_source == server`)."""
    source: str
    """`<file>, profile <name>` for messages."""

    @classmethod
    def parse(cls, text: str, path: str, key: str, phase: str) -> Criterion:
        m = _CRITERION.match(str(text))
        if m is None:
            raise ConfigError(
                f"{path}: {key}: {text!r} is not a criterion; write 'metric op threshold' with "
                f"op one of {', '.join(OPS)}"
            )
        metric, op, raw = m.groups()
        known = PHASE_METRICS.get(phase, ())
        if metric not in known:
            raise ConfigError(
                f"{path}: {key}: unknown metric {metric!r} for phase {phase}; known: "
                + ", ".join(known)
            )
        threshold: float | str
        try:
            threshold = float(raw)
        except ValueError:
            if op not in ("==", "!=") or not re.fullmatch(r"[A-Za-z][\w.\-]*", raw):
                raise ConfigError(
                    f"{path}: {key}: threshold {raw!r} is not a number (a word only goes with "
                    "== or !=)"
                ) from None
            threshold = raw
        profile = key.split(".")[1] if key.startswith("profiles.") else "?"
        return cls(metric, op, threshold, f"{path}, profile {profile}")

    def check(self, report: Mapping[str, Any]) -> CriterionResult:
        value = lookup(report, self.metric)
        if isinstance(self.threshold, str):
            passed = value is not None and OPS[self.op](str(value), self.threshold)
        else:
            passed = (
                value is not None
                and not isinstance(value, str)
                and OPS[self.op](value, self.threshold)
            )
        reason = None
        if value is None:
            reasons = report.get("unknown_reasons")
            if isinstance(reasons, Mapping):
                reason = reasons.get(self.metric) or reasons.get(self.metric.split(".")[0])
        # A report may veto a metric (the figure is not to be trusted: a reuse alarm during
        # the run) and annotate one (how it was counted); both go into the message.
        vetoes = report.get("criteria_vetoes")
        veto = vetoes.get(self.metric) if isinstance(vetoes, Mapping) else None
        notes = report.get("criteria_notes")
        note = notes.get(self.metric) if isinstance(notes, Mapping) else None
        if veto:
            passed = False
        return CriterionResult(self, value, bool(passed), reason, veto or note)


@dataclass(frozen=True, slots=True)
class CriterionResult:
    criterion: Criterion
    value: Any
    passed: bool
    reason: str | None = None
    """Why the value is unknown, when the report says (e.g. not reported by this server)."""
    note: str | None = None
    """What the report says of the figure (`criteria_notes`), or why it vetoed it
    (`criteria_vetoes`): put in the message."""

    def message(self) -> str:
        c = self.criterion
        if self.value is None:
            shown = f"unknown ({self.reason})" if self.reason else "missing"
        else:
            shown = _fmt(self.value)
        threshold = c.threshold if isinstance(c.threshold, str) else f"{c.threshold:g}"
        note = f"; {self.note}" if self.note else ""
        return f"{c.metric} = {shown}, needs {c.op} {threshold} ({c.source}){note}"

    def to_dict(self) -> dict[str, Any]:
        c = self.criterion
        out = {
            "metric": c.metric,
            "op": c.op,
            "threshold": c.threshold,
            "value": self.value,
            "passed": self.passed,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.note:
            out["note"] = self.note
        return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def lookup(report: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of a report (None when absent)."""
    cur: Any = report
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def evaluate(criteria: list[Criterion], report: Mapping[str, Any]) -> list[CriterionResult]:
    return [c.check(report) for c in criteria]


# -- loading ----------------------------------------------------------------------------------


def _format_errors(exc: ValidationError, path: str, where: str = "", lines: Any = None) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        key = ".".join(([where] if where else []) + loc)
        line = _line_of(lines, err["loc"]) if lines is not None else None
        at = f"{path}:{line}" if line else path
        msg = f"unknown key {loc[-1]!r}" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{at}: {key}: {msg}")
    return "; ".join(parts)


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of a key path in a ruamel round-trip document, when it can be found."""
    line: int | None = None
    cur = node
    for part in loc:
        lc = getattr(cur, "lc", None)
        try:
            if lc is not None and isinstance(part, str) and part in cur:
                line = lc.key(part)[0] + 1
            elif lc is not None and isinstance(part, int):
                line = lc.item(part)[0] + 1
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            break
    return line


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file; every problem is a ConfigError naming file and key."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: scenario file not found") from None
    yaml = YAML(typ="rt")
    try:
        doc = yaml.load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{p}: a scenario must be a mapping with name, phase and profiles")
    data = _plain(doc)
    data["path"] = str(p)
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(p), lines=doc)) from None
    for name in scenario.profiles:
        scenario.workload_for(name)
        scenario.strategy_for(name)
        for i, text in enumerate(scenario.profile(name).criteria):
            try:
                Criterion.parse(text, str(p), f"profiles.{name}.criteria[{i}]", scenario.phase)
            except ConfigError as exc:
                line = _line_of(doc, ("profiles", name, "criteria", i))
                raise ConfigError(
                    str(exc).replace(f"{p}:", f"{p}:{line}:", 1) if line else str(exc)
                ) from None
    return scenario


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
