"""One typed model per report, so what a report holds is written down, checked when it is
written, and exported as JSON Schema (`reports/schema/*.json`, compared in a test: a change of
shape is a visible diff).

Every phase report has the envelope (`harness_version`, `schema_version`, `phase`, `scenario`,
`profile`, `generated_at`, `machine_info`, `commit_info`, `backend`, `criteria`, `passed`,
`result`) and its phase's figures at top level, as the roadmap's files had them. Top-level keys
are fixed (`extra="forbid"`): a figure a phase adds must be added here. Nested structures
(measurements, rounds, cases) are typed as mappings; their keys are the phases' own.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.reportfiles import base_name

__all__ = [
    "SCHEMA_VERSION",
    "ConcurrencyReport",
    "ContextLimitsReport",
    "CustomReport",
    "FlagsReport",
    "PerformanceReport",
    "PhaseReport",
    "PrefixReuseReport",
    "QualityReport",
    "ReliabilityReport",
    "ScaleReport",
    "SummaryReport",
    "export_schemas",
    "model_for_file",
    "phase_model_for",
]

SCHEMA_VERSION = 2
"""Bumped when a report's shape changes in a way readers must know (2: typed reports)."""

Num = float | int | None
Obj = dict[str, Any]


class PhaseReport(BaseModel):
    """The envelope every phase report has."""

    model_config = ConfigDict(extra="forbid")

    harness_version: str
    schema_version: int = SCHEMA_VERSION
    phase: str
    scenario: str
    profile: str
    generated_at: str
    machine_info: Obj
    commit_info: Obj | None
    backend: Obj
    criteria: list[Obj]
    passed: bool | None
    """True: criteria checked and met; False: one failed; None: ungated (never a pass)."""
    result: str
    """`PASS`, `FAIL` or `ungated`."""
    prompt: Obj | None = None
    """The prompt the phase sent: its file and `sha256` (system, template and schema), so the
    verdict can tell whether every phase measured the prompt `harness run` will send."""
    job: Obj | None = None
    """The rows the phase sent: the user's input (`input`, `id_column`, `input_rows`, how they
    were drawn) or `rows: generated rows, not your input`, and which job settings the user gave
    (`given`: `--harness-input`, `--harness-prompt`, `--harness-id-column`)."""
    criteria_notes: Obj | None = None
    """Per metric, how its figure was counted (e.g. cached tokens a server left out, counted
    as 0): added to a failed criterion's message."""
    criteria_vetoes: Obj | None = None
    """Per metric, why its figure cannot pass whatever its value (e.g. a reuse alarm fired
    during the run): its criterion fails with this in the message."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ContextLimitsReport(PhaseReport):
    """`context_limit_results.json`: phase 1."""

    model: str
    model_geometry: Obj
    measurements: list[Obj]
    sweep_skipped_predicted_over_budget: list[int]
    search_measurements: list[Obj]
    search_steps: int
    search_skipped_predicted_over_budget: list[int]
    base_model_memory_bytes: float
    kv_bytes_per_token: float
    kv_bytes_per_token_source: str | None
    kv_bytes_per_token_theory: Num
    kv_bytes_per_token_theory_no_window: Num
    kv_theory_note: str
    kv_theory_ratio: Num
    r_squared: float
    memory_budget_bytes: int
    memory_budget_source: str
    budget_crossing_tokens: Num
    max_context_tokens: int
    limited_by: str
    max_measured_bytes: int
    within_budget: bool
    safe_context_tokens: int
    workload_tokens: Obj
    recommended: Obj
    server_flags: str | None = None
    trim_interval_that_fits: int | None = None
    longest_prompt_tokens: int | None = None
    longest_prompt_fits: bool | None = None
    longest_prompt_rows: str | None = None
    config: Obj | None = None
    kv_other_layout: Obj | None = None


class PrefixReuseReport(PhaseReport):
    """`prefix_reuse_results.json`: rubric reuse by candidate length."""

    model: str
    rubric_prompt: str
    production_path: str
    rows: list[Obj]
    workload_candidate_tokens: Num
    prefix_reuse_at_workload: Num
    prefix_reuse_min: Num
    reuse_falls_at_tokens: Obj
    llama_server_args: list[str] | None
    config: Obj


class ScaleReport(PhaseReport):
    """`performance_benchmarks_<N>.json`: phases 2-4, 6, 7."""

    requests_planned: int
    requests: int
    completed: int
    finished: bool
    stopped_by: str | None
    errors: int
    error_rate: float
    errors_by_type: Obj
    elapsed_s: float
    throughput_rps: float
    """Completed requests per second."""
    tokens_per_s: float
    tokens: Obj
    token_savings: Num
    token_savings_theoretical_max: Num
    savings_efficiency: Num
    cached_tokens_source: str
    cached_sources: Obj
    cached_coverage: Num
    uncached_tokens_per_request: Num
    context_shifts: int
    unknown_reasons: Obj
    token_counts_source: str
    latency_ms: Obj
    context_trims: int
    trims_by_reason: Obj
    retries: int
    memory: Obj
    leak: Obj
    degradation: Obj
    projected_170k_s: Num
    projection: Obj | None
    projection_error: Num
    eta: Obj
    eta_error_max: Num
    overflow_errors: int
    energy_wh: Num
    cost: Num
    price_per_kwh: float
    projected_170k_cost: Num
    model_note: str
    expected_vs_measured: Obj | None = None
    strategy: Obj | None = None
    config: Obj | None = None
    score_mode: Obj | None = None
    """The score mode the run was asked for and the one it scored in, with why (free-text
    replies decode): the plan and the verdict's projection say which their throughput is."""
    energy_source: str | None = None
    endpoints: list[Obj] | None = None
    """Over several servers: each one's figures and history; None for one server."""
    cached_omitted: int | None = None
    """Completed requests whose server left its cached count out, counted as 0."""
    reuse_alarms: list[Obj] | None = None
    """Windows of requests whose server computed more than twice what the strategy expects."""
    reuse_windows: int | None = None
    scaling: Obj | None = None
    """A pool run: its throughput against its servers × the largest single-server run's."""
    scaling_efficiency: Num = None


class QualityReport(PhaseReport):
    """`quality_results.json`."""

    model: str
    model_scored: str
    requests: int
    consistency_rate: float
    consistency_scores: list[int | None]
    reproducible_rate: float
    score_files_identical: bool
    accuracy: Num
    accuracy_rule: str
    control_scores: Obj
    drift_spread: int | None
    conversation_trims: int
    conversation_agreement: Num
    bias_gaps: Obj
    bias_max_gap: Num
    bias_fields: list[str] | None = None
    """The fields the bias pairs varied: what the prompt declares must never move a score."""
    bias_fields_source: str | None = None
    bias_unpaired: dict[str, str] | None = None
    """A field no bias pair could vary, and why (not a column of the input, not shown by the
    prompt, the same in every row): its gap is then null for that reason."""
    parse_rate: float
    parse_failures: list[str | None]
    score_distribution: Obj
    distinct_scores: int
    score_stdev: float
    structured_output: str
    trim_policy: Obj
    score_mode: str = "decode"
    """The mode the checks ran in (`decode`, `logprobs`)."""
    near_tie_margin: Num = None
    flips: list[Obj] | None = None
    """Candidates whose score differed between the two runs: both scores, their
    probabilities, and whether it was a near-tie."""
    flips_near_tie: int | None = None
    flips_not_near_tie: int | None = None
    """Flips not shown to be near-ties (real changes, and those no distribution tells)."""
    flips_unclassified: int | None = None
    flips_told_by: str | None = None
    """Whose distributions classified the flips (none when the modes disagree)."""
    expected_spread_repeats: Num = None
    expected_reproducible_max_diff: Num = None
    expected_drift: Num = None
    """The largest change of a control's expected score across its positions (logprobs)."""
    mode_agreement: Num = None
    """Share of candidates scored the same in both modes."""
    mode_agreement_rows: int | None = None
    stand_in: Obj | None = None
    """On a stand-in model: what its report can and cannot show."""


class ReliabilityReport(PhaseReport):
    """`reliability_results.json`: the cases that ran, each with its own verdict."""

    lost: int | None
    duplicated: int | None
    completed: int | None
    cases_run: int
    cases_failed: int
    cases_skipped: Obj | None = None
    """Cases that did not run, each with why (not counted in `cases_run`)."""
    keys_leaked: int | None
    replies_differ: int | None
    restart_failed: int | None
    faults_injected: int | None = None
    retried_successes: int | None = None
    recorded_errors: int | None = None
    accounting_gap: int | None = None
    cases: Obj


class PerformanceReport(PhaseReport):
    """`performance_comparison.json`."""

    calibration: Obj
    workload_chunk_tokens: int
    rounds: Obj
    ratios: Obj
    tokens_over_chat: float
    engine_over_direct: float
    conversation_over_stateless: float
    stateless_efficiency: float
    cached_over_naive: float
    replies: Obj
    """The same items on the token path and on the text path (gated) and the chat path
    (reported): shares of equal prompt tokens, replies and scores."""
    replies_same_reply: Num
    replies_same_score: Num
    tokens_over_chat_ceiling: Num = None
    """The chat path's mean request time ÷ its server compute (prefill + decode): what the
    token path would reach were all of the chat path's other time removed (from the breakdown:
    client wall time and llama.cpp timings)."""
    tokens_over_chat_of_ceiling: Num = None
    """`tokens_over_chat` ÷ `tokens_over_chat_ceiling`: the share of what this machine allows
    that the token path reached (gated)."""
    tokens_over_chat_goal: Num = None
    """The gain asked of the token path (1.25): reported beside what was measured."""
    breakdown_ms: Obj
    plots: list[str]
    overlap: list[Obj]
    """Each cell (slots × request path × client concurrency): its median req/s over
    `sweep_rounds` interleaved rounds, its spread and every round's value."""
    sweep_rounds: int
    trim_intervals: list[Obj]
    batched_calibration: Obj
    """The batched bound's rates: medians of one calibration a round."""
    stateless_efficiency_batched: Num
    """The token path against the best bound each round's calibrations found (per rate, the
    faster of single-stream and batched across slots)."""
    batched_speedup: Num
    """The single-stream bound's time ÷ the batched bound's for the workload (< 1: batching
    across slots is slower on this machine)."""
    max_slots_within_budget: int | None
    uncached_tokens_per_request: Obj
    recommended: Obj
    logprobs_over_decode: Num = None
    """Rows per second scoring in `logprobs` mode ÷ decoding the reply, the same kind of rows
    on the token path, round by round (median)."""
    logprobs_efficiency: Num = None
    """Logprobs mode against its own bound: prefill of the uncached tokens plus one forward
    step per probe token (median over rounds)."""
    decode_efficiency: Num = None
    """Decoded scoring against its bound: prefill plus one step per decoded token."""
    logprobs_efficiency_batched: Num = None
    """Logprobs mode against the best of the single-stream and the batched bound."""
    score_agreement: Num = None
    """Share of the same rows whose logprobs score equals the decoded score."""
    score_agreement_rows: int | None = None
    score_modes: Obj | None = None
    """The same rows in both modes: agreement (greedy and most probable), the rows that
    differ with their probabilities."""
    score_mode_reason: str | None = None
    """Why SCORE_MODE is what `recommended` says."""


class ConcurrencyReport(PhaseReport):
    """`concurrency_results.json`: requests in flight against a server the harness does not
    start (Ollama: its slots are OLLAMA_NUM_PARALLEL), the performance suite's part there."""

    server_concurrency: list[Obj]
    """Each client concurrency: its median req/s over `sweep_rounds` interleaved rounds, its
    spread, every round's value and the errors."""
    errors: int
    slots: str
    recommended: Obj


class FlagsReport(PhaseReport):
    """`flags_comparison.json`: Ollama's flags vs swa_full, for both strategies."""

    model: str
    request_path: str | None = None
    variants: list[Obj]
    recommended_strategy: str | None = None
    recommended_server_flags: str | None = None
    recommendation: str | None
    recommendation_made: int | None = None
    """1 when a strategy was recommended (ahead beyond the rounds' spread), else 0 (gated)."""
    uncached_ratio_conversation_over_stateless_ollama: Num = None
    comparisons: list[Obj] | None = None
    """Each pair of variants that differs in one thing: which is ahead on req/s and on
    uncached tokens, and whether by more than the rounds' spread."""
    rounds: int | None = None
    requests_per_round: int | None = None
    errors: int
    kv_bytes_per_token: Obj | None
    unknown_reasons: Obj | None = None


class CustomReport(PhaseReport):
    """A report of a phase the harness does not ship (a user's own suite): envelope checked,
    figures free."""

    model_config = ConfigDict(extra="allow")


class SummaryReport(BaseModel):
    """`summary.json`: every report in the folder, the verdict first."""

    model_config = ConfigDict(extra="forbid")

    harness_version: str
    schema_version: int = SCHEMA_VERSION
    generated_at: str
    profile: str
    machine_info: Obj
    commit_info: Obj | None
    verdict: Obj
    reports: list[Obj]
    this_session: list[Obj]
    skipped: list[Obj]
    config_written: list[str]


_FILES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("context_limit_results.json", ContextLimitsReport),
    ("prefix_reuse_results.json", PrefixReuseReport),
    ("performance_benchmarks_*.json", ScaleReport),
    ("quality_results.json", QualityReport),
    ("reliability_results.json", ReliabilityReport),
    ("performance_comparison.json", PerformanceReport),
    ("concurrency_results.json", ConcurrencyReport),
    ("flags_comparison.json", FlagsReport),
    ("summary.json", SummaryReport),
)


def model_for_file(name: str) -> type[BaseModel] | None:
    """The model of a report file, by its name in either layout (`<base>.json` or
    `<base>.<profile>.<model>.json`); None for files that are not known reports."""
    base = base_name(name)
    for pattern, model in _FILES:
        if fnmatch.fnmatch(base, pattern):
            return model
    return None


def phase_model_for(name: str) -> type[PhaseReport]:
    """The phase report model of a file name (`CustomReport` for a phase not shipped)."""
    model = model_for_file(name)
    return model if model is not None and issubclass(model, PhaseReport) else CustomReport


def export_schemas(folder: Path) -> list[Path]:
    """Write the JSON Schema of every report model to `folder` (one file each)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for _, model in _FILES:
        path = folder / f"{model.__name__}.schema.json"
        text = json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out
