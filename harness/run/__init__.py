"""The job every entry point runs (`harness run`, `harness api`, `harness doctor`, the suites).

A floor between the engine and phases below and the entry points above:

- `given`: what a caller gave: the options of `harness run`, `harness api`, `harness doctor`,
  `harness convert` and the `--harness-*` ones, declared once as data (`OPTIONS`);
- `settings`: `RunConfig` and `Value`, a run's resolved settings, each with its source;
- `resolve`: the one configuration path (harness.yaml read once; an entry point's own rules
  declared as data, `RUN_RULES`);
- `factory`: `open_backend(cfg)`, the only place a run builds a backend;
- `preflight`: `spec_for(cfg, backend, ...)`, the engine's job capped to the server, once.
"""

from harness.run.factory import open_backend
from harness.run.resolve import resolve, resolve_run_config
from harness.run.settings import RunConfig, Value

__all__ = ["RunConfig", "Value", "open_backend", "resolve", "resolve_run_config"]
