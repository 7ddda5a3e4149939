"""Quality: consistent, reproducible, right scores with no drift and no bias.

    pytest suites/quality                          # SmolLM2-135M-Instruct on the CPU (~8 min)
    pytest suites/quality --harness-score-mode logprobs   # the same, scores read in one step
    pytest suites/quality --harness-backend ollama # Gemma 3 12B

The checks run in the run's score mode (`--harness-score-mode`, harness.yaml's SCORE_MODE, else
decode); then the candidates once more in the other mode: the agreement of the two, and (in
decode mode) the distributions that tell whether a score that changed between the two runs was
a near-tie (`harness.phases.quality.NEAR_TIE_MARGIN`) or a real change.

One test runs every check on the same server (one cold start) under the run's trim policy and
writes `reports/quality_results.json`, naming the prompt (file and hash) and the model that
scored. The checks' logic is `harness.phases.quality` (unit-tested on the in-process double).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from harness.engine import RunnerConfig, TrimPolicy, run_job
from harness.fileio import atomic_write_text
from harness.phases import items_for, prompt_for, table_for
from harness.phases import quality as q
from harness.phases.common import phase_job
from harness.pytest import HarnessSession
from harness.records import RequestRecord
from harness.run.preflight import fitted, spec_for
from harness.scoring import TOP_N
from harness.workload import CandidateTable, WorkItem

SCENARIO = "quality.yaml"
pytestmark = [pytest.mark.quality, pytest.mark.integration, pytest.mark.timeout(3600)]


def variant_maker(
    harness: HarnessSession, table: CandidateTable
) -> Callable[[WorkItem, str], WorkItem | None]:
    """A candidate's copy with one field taken from another candidate (bias pairs)."""
    scenario = harness.scenario(SCENARIO)
    rows = {row[table.id_column]: row for row in table.rows}
    donors = list(table.rows)

    def variant(item: WorkItem, field: str) -> WorkItem | None:
        row = rows.get(item.custom_id)
        if row is None or field not in row:
            return None
        other = next((d[field] for d in donors if d[field] != row[field]), None)
        if other is None:
            return None
        changed = {**row, field: other}
        one = CandidateTable(table.path, table.columns, table.id_column, (changed,), (0,))
        (new,) = items_for(scenario, harness.profile, table=one)
        return replace(new, custom_id=f"{item.custom_id}#bias-{field}-b")

    return variant


def test_quality(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    opts: dict[str, Any] = scenario.profile(harness.profile).options
    cfg = harness.run_config(scenario)
    backend = harness.backend(cfg)
    policy = fitted(cfg, backend).policy
    n, controls = int(opts.get("candidates", 50)), int(opts.get("controls", 3))
    table = table_for(scenario, harness.profile, n + controls + 1)
    fields, fields_source = q.bias_fields(prompt_for(scenario, harness.profile))
    plan = q.plan_quality(
        items_for(scenario, harness.profile, table=table),
        repeats=int(opts.get("repeats", 5)),
        candidates=n,
        conversation_length=int(opts.get("conversation_length", 20)),
        controls=controls,
        variant=variant_maker(harness, table),
        bias_pairs=int(opts.get("bias_pairs", 10)),
        fields=fields,
        columns=table.columns,
    )

    mode = cfg.score_mode.value
    other = "decode" if mode == "logprobs" else "logprobs"

    def run(
        items: list[WorkItem], strategy: str, desc: str, score_mode: str = mode
    ) -> list[RequestRecord]:
        spec = phase_job(
            spec_for(cfg, backend, results=None, desc=f"quality: {desc}"),  # policy capped
            strategy=strategy,
            # Decoded replies keep each token's top log-probabilities: a score that changes
            # between runs is then told a near-tie or not in its own context.
            runner=RunnerConfig(concurrency=1, score_mode=score_mode, top_logprobs=TOP_N),
            keep_records=True,
            progress_stream=harness.terminal,
        )
        return harness.run(run_job(backend, items, spec)).records

    runs = q.QualityRuns(
        repeats=run(plan.repeats, "stateless", "consistency"),
        run_a=run(plan.candidates, "stateless", "run a"),
        run_b=run(plan.candidates, "stateless", "run b"),
        conversation=run(plan.conversation, "conversation", "drift"),
        bias=run([it for ps in plan.bias.values() for p in ps for it in p], "stateless", "bias"),
        other_mode=run(plan.candidates, "stateless", f"{other} pass", other),
        mode=mode,
    )
    figures = describe(harness, plan, runs, table, policy)
    figures.update(model=cfg.model.value, model_scored=backend.info.model)
    figures.update(bias_fields=list(fields), bias_fields_source=fields_source)
    figures["stand_in"] = q.stand_in(cfg.model.value, figures)
    report = harness.report("quality_results.json", scenario, figures, backend=backend)
    shown = ("score_mode", "consistency_rate", "reproducible_rate", "flips_near_tie",
             "flips_not_near_tie", "mode_agreement", "expected_drift", "accuracy",
             "drift_spread", "bias_max_gap", "parse_rate", "score_distribution")  # fmt: skip
    harness.say(f"quality ({cfg.model.value}): " + ", ".join(f"{k} {figures[k]}" for k in shown))
    harness.gate(report)


def describe(
    harness: HarnessSession,
    plan: q.QualityPlan,
    runs: q.QualityRuns,
    table: CandidateTable,
    policy: TrimPolicy,
) -> dict[str, Any]:
    """The checks' figures, the prompt that scored and the score files of both runs."""
    scenario = harness.scenario(SCENARIO)
    prompt = prompt_for(scenario, harness.profile)
    probe = prompt.name.startswith("quality-probe")
    expected = q.probe_expected({r[table.id_column]: r for r in table.rows}) if probe else None
    figures = q.quality_figures(plan, runs, expected)
    for label, records in (("a", runs.run_a), ("b", runs.run_b)):
        text = q.score_file(plan.candidates, q.scores_of(plan.candidates, records))
        atomic_write_text(harness.report_dir / f"quality_scores_run_{label}.csv", text)
    figures.update(
        accuracy_rule="score = data_infra_years within 1..10 (the probe prompt's rule)"
        if probe
        else "no known right answer for this prompt",
        structured_output=scenario.workload_for(harness.profile).structured,
        trim_policy={
            "max_context_tokens": policy.max_context_tokens,
            "trim_threshold": policy.threshold,
            "trim_interval": policy.trim_interval,
        },
    )
    return figures
