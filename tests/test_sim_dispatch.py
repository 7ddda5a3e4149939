"""The dispatcher at scale, small: `scripts/sim_dispatch.py` (the engine over a pool of 64
simulated endpoints with random latencies, 1% transient failures, two endpoints dying and one
coming back) on 60,000 requests. The full 1,000,000 is the script's default run.

In-process doubles: the figures are the dispatcher's, never a server's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sim_dispatch.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sim_dispatch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_dispatch"] = module
    spec.loader.exec_module(module)
    return module


def test_60k_requests_over_64_endpoints_each_id_once_with_flat_rate_and_memory() -> None:
    sim = load()
    r = sim.simulate(60_000, 64, every=20_000, quiet=True)
    assert r.ids_once and r.completed == 60_000 and r.errors == 0
    assert r.injected_failures > 300 and r.retries >= r.injected_failures
    down = [ep for ep in r.endpoints if ep["down_at"] is not None]
    assert len(down) == 2 and sorted(ep["up"] for ep in down) == [False, True]
    assert sum(ep["rows"] for ep in r.endpoints) == 60_000
    first, last = r.checkpoints[0], r.checkpoints[-1]
    growth_mib = last["rss_mib"] - first["rss_mib"]
    print(
        f"\n{r.completed:,} requests in {r.elapsed_s:.1f} s; rate {first['rate_rps']:,.0f} → "
        f"{last['rate_rps']:,.0f} req/s; RSS {first['rss_mib']:.1f} → {last['rss_mib']:.1f} MiB "
        f"from request 20,000 to 60,000 (in-process doubles)"
    )
    # Flat: a record kept per request (~1 KB) would add ~40 MiB over these 40,000 requests.
    assert growth_mib < 12, f"RSS grew {growth_mib:.1f} MiB over 40,000 requests"
    assert last["rate_rps"] > 0.5 * first["rate_rps"], "the rate must not sink as the run grows"
