"""Phase logic the suites call: each suite parametrizes, calls a phase function and gates.

- `common`: workloads from scenarios, the figures of a scale report, projections;
- `context_limits`: phase 1's figures, recommended configuration and the other KV layout;
- `quality`: the quality checks' work items and what the scores say;
- `performance`: the performance figures (ratios, the real limit, the picks); `performance_runs`:
  its rounds on servers, the sweep, and the settings they pick;
- `reliability`: the reliability report's figures and its table of cases.
"""

from harness.phases.common import (
    context_shape,
    items_for,
    projection_check,
    prompt_for,
    recommended_trim_interval,
    scale_figures,
    table_for,
)

__all__ = [
    "context_shape",
    "items_for",
    "projection_check",
    "prompt_for",
    "recommended_trim_interval",
    "scale_figures",
    "table_for",
]
