"""Quality: consistent, reproducible scores with no drift with position in a conversation.

    pytest suites/quality                          # SmolLM2-135M-Instruct on the CPU (~6 min)
    pytest suites/quality --harness-backend ollama # Gemma 3 12B

One test runs every check on the same server (one cold start) and writes
`reports/quality_results.json`, saying which model scored and how its scores are spread.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import pytest

from harness.engine import JobSpec, RunnerConfig, run_job
from harness.fileio import atomic_write_text
from harness.phases import items_for
from harness.plugin import HarnessSession
from harness.records import RequestRecord
from harness.workload import WorkItem

SCENARIO = "quality.yaml"
pytestmark = [pytest.mark.quality, pytest.mark.integration, pytest.mark.timeout(3600)]


def score(rec: RequestRecord) -> int | None:
    value = (rec.parsed or {}).get("score") if rec.ok else None
    return value if isinstance(value, int) else None


def test_quality(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    profile = scenario.profile(harness.profile)
    opts: dict[str, Any] = profile.options
    cfg = harness.run_config(scenario)
    model = cfg.model.value
    backend = harness.backend(cfg)
    policy = cfg.capped(backend.info.n_ctx_per_slot).policy
    pool = items_for(scenario, harness.profile, int(opts.get("candidates", 50)) + 1)
    control, candidates = pool[0], pool[1:]
    all_records: list[RequestRecord] = []

    def run(items: list[WorkItem], strategy: str, desc: str) -> list[RequestRecord]:
        spec = JobSpec(
            strategy=strategy,
            policy=policy,
            runner=RunnerConfig(concurrency=1),
            keep_records=True,
            desc=f"quality: {desc}",
            progress_stream=harness.terminal,
        )
        result = harness.run(run_job(backend, items, spec))
        all_records.extend(result.records)
        order = {it.custom_id: i for i, it in enumerate(items)}
        return sorted(result.records, key=lambda r: order[r.custom_id])

    # 1. Consistency: the control candidate, repeated (each repeat a distinct id).
    repeats = int(opts.get("repeats", 5))
    repeated = [_renamed(control, f"{control.custom_id}-repeat{i}") for i in range(repeats)]
    rep_scores = [score(r) for r in run(repeated, "stateless", "consistency")]
    mode, mode_count = Counter(rep_scores).most_common(1)[0]
    consistency = mode_count / repeats if mode is not None else 0.0

    # 2. Reproducibility: the same candidates twice; the score files must be identical.
    files = []
    runs: list[list[int | None]] = []
    for label in ("a", "b"):
        recs = run(candidates, "stateless", f"reproducibility run {label}")
        runs.append([score(r) for r in recs])
        text = "custom_id,score\n" + "".join(f"{r.custom_id},{score(r)}\n" for r in recs)
        path = harness.report_dir / f"quality_scores_run_{label}.csv"
        atomic_write_text(path, text)
        files.append(text)
    same = sum(a == b for a, b in zip(runs[0], runs[1], strict=True))
    reproducible = same / len(candidates)

    # 3. Drift: the control candidate early, in the middle and late in one conversation.
    length = int(opts.get("conversation_length", 20))
    middle = length // 2
    convo: list[WorkItem] = []
    for i in range(length):
        if i in (0, middle, length - 1):
            convo.append(_renamed(control, f"{control.custom_id}-pos{i}"))
        else:
            convo.append(candidates[i % len(candidates)])
    conv_recs = run([_renamed(it, f"conv-{it.custom_id}") for it in convo], "conversation", "drift")
    positions = {0: conv_recs[0], middle: conv_recs[middle], length - 1: conv_recs[-1]}
    drift_scores = {pos: score(rec) for pos, rec in positions.items()}
    known = [s for s in drift_scores.values() if s is not None]
    drift_spread = (max(known) - min(known)) if len(known) == len(drift_scores) else None
    trims = sum(1 for r in conv_recs if r.trim)

    # Conversation against stateless: the same candidates, scored inside the conversation.
    stateless_by_id = {it.custom_id: s for it, s in zip(candidates, runs[0], strict=True)}
    pairs = [
        (score(rec), stateless_by_id.get(it.custom_id))
        for it, rec in zip(convo, conv_recs, strict=True)
        if it.custom_id in stateless_by_id
    ]
    agreement = sum(a == b for a, b in pairs) / len(pairs) if pairs else None

    parsed = [score(r) for r in all_records]
    distribution = Counter(s for s in runs[0] if s is not None)
    values = [s for s in runs[0] if s is not None]
    figures = {
        "model": model,
        "model_scored": backend.info.model,
        "requests": len(all_records),
        "consistency_rate": consistency,
        "consistency_scores": rep_scores,
        "reproducible_rate": reproducible,
        "score_files_identical": files[0] == files[1],
        "score_files": ["quality_scores_run_a.csv", "quality_scores_run_b.csv"],
        "drift_scores": {str(k): v for k, v in drift_scores.items()},
        "drift_spread": drift_spread,
        "conversation_trims": trims,
        "conversation_agreement": agreement,
        "parse_rate": sum(s is not None for s in parsed) / len(parsed),
        "parse_failures": [r.error for r in all_records if r.error_type == "ParseError"][:5],
        "score_distribution": {str(k): v for k, v in sorted(distribution.items())},
        "distinct_scores": len(distribution),
        "score_stdev": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "structured_output": scenario.workload_for(harness.profile).structured,
    }
    report = harness.report("quality_results.json", scenario, figures, backend=backend)
    harness.say(
        f"quality ({model}): consistent {consistency:.0%}, reproducible {reproducible:.0%}, "
        f"drift {drift_scores} (spread {drift_spread}), agreement {agreement}, parsed "
        f"{figures['parse_rate']:.1%}, scores {figures['score_distribution']}",
    )
    harness.gate(report)


def _renamed(item: WorkItem, custom_id: str) -> WorkItem:
    return WorkItem(
        custom_id,
        item.messages,
        item.max_tokens,
        item.temperature,
        item.seed,
        item.output_schema,
        item.grammar,
        item.extra,
    )
