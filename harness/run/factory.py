"""The one place a run builds its backend (outside `harness.backends` itself).

`open_backend(cfg)` turns a resolved `RunConfig` into a backend, not started: each registered
class builds itself from what the run wants of one server (`Backend.from_spec`, given
`RunConfig.member_specs()`), and several servers (`--servers N`, several `--base-url`, a
profile's `servers:` / `endpoints:`) become one pool over them. The Ray executor's actors reach
servers another process started (`reach_backend`, from `Backend.reach()`), each with its own
server first (`fill_pool`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.backends import Backend
from harness.run.settings import RunConfig

__all__ = ["fill_pool", "open_backend", "reach_backend"]


def open_backend(cfg: RunConfig) -> Backend:
    """The backend `cfg` names (not started): one server, or a pool over several whose
    concurrency is per server. An unknown backend is a ConfigError naming the known ones."""
    klass = Backend.class_of(cfg.backend.value)
    members = [klass.from_spec(spec) for spec in cfg.member_specs()]
    if len(members) == 1:
        return members[0]
    return Backend.create("pool", members=members, per_endpoint=cfg.concurrency.value)


def reach_backend(reach: Mapping[str, Any]) -> Backend:
    """A client of a server another process started, from its `Backend.reach()`."""
    options = {k: v for k, v in reach.items() if k != "kind"}
    return Backend.create(str(reach["kind"]), **options)


def fill_pool(members: Sequence[Backend], per_endpoint: int) -> Backend:
    """The first member's server used alone while it answers, the others behind it as
    failover (a pool in `fill` layout); one member is itself."""
    if len(members) == 1:
        return members[0]
    return Backend.create("pool", members=list(members), layout="fill", per_endpoint=per_endpoint)
