"""Test seams of `harness api`: deterministic points at which a test holds a batch.

The service reads no test hook from its environment. A test hands these to the service it
builds (`create_app(..., seams=ApiSeams(hold_at=3))`) or starts one through a launcher that does
(tests/api_seamed.py), and the batch worker calls them at fixed points:

- `hold_at`: a batch of more than N requests is held once exactly N are done (nothing in flight
  then) until the file `release` appears in its directory (`<data dir>/batches/<id>/release`),
  it is cancelled, or it expires: a test sees a known count, not a timing window;
- `finalize_delay_s`: a pause between writing a batch's output files and committing them (a
  test kills the service inside it).

The batch worker (`harness.api.runner.BatchWorker`) takes any object with these three methods;
the service's own do nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RELEASE_NAME", "ApiSeams"]

log = logging.getLogger("harness.api")

RELEASE_NAME = "release"
"""The file (in a batch's directory) that releases a batch held at `hold_at`."""


@dataclass(frozen=True, slots=True)
class ApiSeams:
    """See the module docstring."""

    hold: int | None = None
    """Hold each batch of more than this many requests once this many are done."""
    finalize_delay_s: float = 0.0
    """Seconds of pause between writing a batch's output files and committing them."""

    def hold_at(self) -> int | None:
        return self.hold if self.hold is not None and self.hold > 0 else None

    async def held(self, batch_dir: Path) -> None:
        """Wait until `batch_dir / RELEASE_NAME` exists."""
        release = batch_dir / RELEASE_NAME
        log.info("batch %s: held until %s exists", batch_dir.name, release)
        while not release.exists():
            await asyncio.sleep(0.05)

    async def before_commit(self, batch_id: str, status: str) -> None:
        if self.finalize_delay_s > 0:
            log.info(
                "batch %s: pausing %.1f s before committing (%s)",
                batch_id,
                self.finalize_delay_s,
                status,
            )
            await asyncio.sleep(self.finalize_delay_s)
