"""The suites build their jobs through `harness.run.preflight.spec_for` (capped to the server
there) and `harness.phases.common.phase_job` (what the phase sets itself): for the same
settings these are the jobs the scale, quality and flags suites built themselves before, field
by field, so their figures do not move."""

from __future__ import annotations

from typing import Any

from harness.config import ProfileConfig
from harness.engine import JobSpec, RunnerConfig
from harness.phases.common import phase_job
from harness.run.preflight import fitted, spec_for
from harness.run.resolve import resolve_run_config
from harness.run.settings import RunConfig
from harness.testing.doubles import InProcessDouble

TERMINAL: Any = object()  # stands for harness.terminal: compared by identity


def config(**cli: Any) -> RunConfig:
    cli = {"backend": "embedded", "max_context_tokens": 100_000, **cli}
    return resolve_run_config(profile="embedded", config=ProfileConfig("embedded"), cli=cli)


def test_the_scale_suites_job_over_a_pool() -> None:
    cfg = config(servers=2, concurrency=3, parallel=3, strategy="conversation")
    server = InProcessDouble(n_ctx_per_slot=4096)
    server.info.extra["endpoints"] = ["a", "b"]  # a pool of the run's two servers
    new = phase_job(spec_for(cfg, server, results=None, desc="scale 100"), progress_stream=TERMINAL)
    capped = fitted(cfg, server)
    before = JobSpec(
        strategy=capped.strategy.value,
        policy=capped.policy,
        runner=RunnerConfig(
            concurrency=capped.total_concurrency, score_mode=capped.score_mode.value
        ),
        desc="scale 100",
        progress_stream=TERMINAL,
    )
    assert new == before
    assert new.runner.concurrency == 6 and new.policy.max_context_tokens == 4096


def test_the_quality_suites_job() -> None:
    cfg = config(score_mode="logprobs", concurrency=2, parallel=2)
    server = InProcessDouble(n_ctx_per_slot=4096)
    runner = RunnerConfig(concurrency=1, score_mode="decode", top_logprobs=5)
    new = phase_job(
        spec_for(cfg, server, results=None, desc="quality: drift"),
        strategy="conversation",
        runner=runner,
        keep_records=True,
        progress_stream=TERMINAL,
    )
    before = JobSpec(
        strategy="conversation",
        policy=fitted(cfg, server).policy,
        runner=runner,
        keep_records=True,
        desc="quality: drift",
        progress_stream=TERMINAL,
    )
    assert new == before


def test_the_flags_suites_job() -> None:
    """The run's concurrency and score mode are not the variant's: the runner stays default."""
    cfg = config(strategy="stateless", concurrency=4, parallel=4, score_mode="logprobs")
    server = InProcessDouble(n_ctx_per_slot=2048)
    new = phase_job(
        spec_for(cfg, server, results=None, desc="stateless/ollama", progress=False),
        strategy="stateless",
        runner=RunnerConfig(),
    )
    before = JobSpec(strategy="stateless", policy=fitted(cfg, server).policy, progress=False)
    assert {**vars_of(new), "desc": None} == {**vars_of(before), "desc": None}


def vars_of(spec: JobSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in JobSpec.__dataclass_fields__}
