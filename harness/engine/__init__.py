"""The batch engine: strategies, trim policy, runner, results store, progress, jobs."""

from harness.engine.job import JobResult, JobSpec, run_job
from harness.engine.runner import RetryPolicy, Runner, RunnerConfig
from harness.engine.store import ResultsStore, read_results
from harness.engine.strategies import (
    ConversationStrategy,
    StatelessStrategy,
    Strategy,
    TrimPolicy,
    make_strategy,
)
from harness.engine.tokens import TokenCounter

__all__ = [
    "ConversationStrategy",
    "JobResult",
    "JobSpec",
    "ResultsStore",
    "RetryPolicy",
    "Runner",
    "RunnerConfig",
    "StatelessStrategy",
    "Strategy",
    "TokenCounter",
    "TrimPolicy",
    "make_strategy",
    "read_results",
    "run_job",
]
