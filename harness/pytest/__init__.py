"""The pytest side of the harness: `plugin` (options, markers, hooks, fixtures), `session` (a
run's state and backends) and `reporting` (reports, gates, write-back, summary)."""

from harness.pytest.session import HarnessSession

__all__ = ["HarnessSession"]
