"""`harness plan`: how many servers the next job needs, from the scale reports measured.

    harness plan --rows 1700000 --deadline 24h [--model gemma3:12b] [--backend ollama]
                 [--strategy stateless] [--price-per-kwh 0.30] [--report-dir reports]

Reads the scale reports (`performance_benchmarks_<N>.*.json`) of the asked model, backend and
strategy, takes the largest finished one that passed its criteria and was measured (no test
double, no replay: the verdict's rule, `projection_sources`), and prints the servers of that
kind the job needs to finish by the deadline, its time on them, its energy and cost (from the
GPU energy the run measured, when it did), each figure with the report it came from. A report of
a pool holds its servers' aggregate: the plan divides it by the servers it ran over, and uses
the scaling efficiency a pool run measured (N servers' throughput ÷ N × one server's) instead
of assuming servers add up, saying which it did. A report measured on the CPU stand-in plans
for that stand-in, not for a GPU, and says so. With no report of that model, backend and
strategy it refuses (exit 2) and lists what it has, and why the others cannot be used.

Below the plan it prints the verdict on the same folder (`harness.verdict.verdict`, the same
function, prompt and harness.yaml as `harness verdict`): when it is not GO, every reason it gives,
word for word, so a plan is never read as the green light the verdict refuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError
from harness.scoring import mode_of_report
from harness.verdict import (
    ReportEntry,
    Verdict,
    is_double,
    largest,
    projection_sources,
    read_reports,
    servers_of,
    verdict,
)

__all__ = ["Plan", "parse_duration", "plan"]


def parse_duration(text: str) -> float:
    """`24h`, `90m`, `2d`, `3600` (seconds) → seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", text)
    if m is None:
        raise ConfigError(f"--deadline {text!r}: write e.g. 24h, 90m, 2d or seconds")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


@dataclass(frozen=True, slots=True)
class Plan:
    rows: int
    deadline_s: float
    servers: int
    hours: float
    rps_per_server: float
    """Completed req/s of one server: the report's throughput ÷ the servers it ran over."""
    error_rate: float
    energy_kwh: float | None
    cost: float | None
    source: ReportEntry
    scaling_efficiency: float | None = None
    """N servers' throughput ÷ (N × one server's), measured by a pool run; None: not measured."""
    scaling_source: ReportEntry | None = None
    verdict: Verdict | None = None
    """The verdict on the same folder (`harness verdict`'s), printed below the plan."""

    def lines(self, price_per_kwh: float) -> list[str]:
        src = f"{self.source.file} ({self.source.model} on {self.source.backend}, "
        src += f"{self.source.data.get('requests')} requests, {self.source.generated_at})"
        ran_on = servers_of(self.source)
        each = (
            f"{self.rps_per_server:.3f} completed req/s each: {ran_on} servers together ran "
            f"{self.rps_per_server * ran_on:.3f}"
            if ran_on > 1
            else f"{self.rps_per_server:.3f} completed req/s each"
        )
        out = [
            f"plan: {self.rows:,} rows by {self.deadline_s / 3600:.1f} h",
            f"servers: {self.servers} of this kind ({each}, measured in {src}, "
            f"{mode_of_report(self.source.data)})",
        ]
        if self.servers == 1:
            out.append(f"time: {self.hours:.1f} h on one server")
        elif self.scaling_efficiency is not None and self.scaling_source is not None:
            out.append(
                f"time: {self.hours:.1f} h on {self.servers} servers at a scaling efficiency of "
                f"{self.scaling_efficiency:.2f} (measured in {self.scaling_source.file}: "
                f"{servers_of(self.scaling_source)} servers' throughput ÷ that many times one "
                "server's)"
            )
        else:
            out.append(
                f"time: {self.hours:.1f} h on {self.servers} servers, assuming they add up "
                "(scaling not measured: each warms its own prefix cache; run a scale phase with "
                "servers: N or endpoints: to measure it)"
            )
        out += [
            f"server time: {self.servers * self.hours:.1f} server-hours (the rows ÷ the measured "
            "req/s: the cost on servers rented by the hour)",
            f"errors: {self.error_rate:.2%} of requests failed in that run: "
            f"~{math.ceil(self.rows * self.error_rate):,} rows to retry (--retry-failed)",
        ]
        if self.energy_kwh is not None and self.cost is not None:
            out.append(
                f"energy: {self.energy_kwh:.1f} kWh, cost ${self.cost:.2f} at ${price_per_kwh}/kWh "
                f"({self.source.data.get('energy_source')}, {self.source.file})"
            )
        else:
            out.append(f"energy and cost: not measured ({self.source.file} has no GPU energy)")
        if self.source.backend == "embedded":
            out.append(
                "note: measured on the embedded CPU stand-in: this plans for that stand-in, "
                "not for a GPU server"
            )
        if self.verdict is not None:
            v = self.verdict
            out.append(f"verdict on these reports (harness verdict): {v.decision}")
            if v.decision != "GO":
                out += [f"  {r}" for r in v.reasons]
        return out


def _why_not(e: ReportEntry) -> str:
    """Why a scale report cannot be planned from."""
    if not e.finished:
        return "stopped part-way"
    if is_double(e):
        return "a test double or replay"
    if e.result != "PASS":
        return "failed its criteria" if e.result == "FAIL" else "ungated"
    return "no throughput"


def plan(
    report_dir: Path,
    *,
    rows: int,
    deadline_s: float,
    model: str | None,
    backend: str | None,
    strategy: str | None,
    price_per_kwh: float,
    config_path: Path | None = None,
    prompt: Path | None = None,
) -> Plan:
    """The plan from the largest finished, passing, measured scale report that matches (the
    verdict's rule, `harness.verdict.projection_sources`), with the verdict on the folder when
    `config_path` is given (its harness.yaml; `prompt`: the one harness run sends); see the
    module doc."""
    if rows < 1 or deadline_s <= 0:
        raise ConfigError("--rows must be at least 1 and --deadline positive")
    entries = read_reports(report_dir)
    match = projection_sources(entries, model=model, backend=backend, strategy=strategy)
    if not match:
        scale = [e for e in entries if e.phase == "scale"]
        usable = projection_sources(scale)
        have = sorted({f"{e.model} on {e.backend}, {e.strategy} ({e.file})" for e in usable})
        refused = sorted(f"{e.file} ({_why_not(e)})" for e in scale if e not in usable)
        raise ConfigError(
            f"no finished, passing scale report in {report_dir} of model {model or 'any'}, "
            f"backend {backend or 'any'}, strategy {strategy or 'any'}; it has: "
            + ("; ".join(have) if have else "none (run pytest -m scale_100 first)")
            + (f"; not usable: {', '.join(refused)}" if refused else "")
        )
    best = largest(match)
    rps = float(best.data["throughput_rps"]) / servers_of(best)
    pools = [e for e in match if servers_of(e) > 1 and _efficiency(e) is not None]
    scaling = largest(pools) if pools else None
    eff = _efficiency(scaling) if scaling is not None else None
    servers = max(1, math.ceil(rows / (rps * deadline_s)))
    if servers > 1 and eff is not None:
        servers = max(1, math.ceil(rows / (rps * eff * deadline_s)))
    together = rps * servers * (eff if servers > 1 and eff is not None else 1.0)
    energy_wh, done = best.data.get("energy_wh"), best.data.get("completed")
    kwh = float(energy_wh) / float(done) * rows / 1000.0 if energy_wh and done else None
    return Plan(
        rows=rows,
        deadline_s=deadline_s,
        servers=servers,
        hours=rows / together / 3600.0,
        rps_per_server=rps,
        error_rate=float(best.data.get("error_rate") or 0.0),
        energy_kwh=kwh,
        cost=kwh * price_per_kwh if kwh is not None else None,
        source=best,
        scaling_efficiency=eff,
        scaling_source=scaling,
        verdict=verdict(report_dir, config_path, prompt=prompt) if config_path else None,
    )


def _efficiency(e: ReportEntry) -> float | None:
    scaling = e.data.get("scaling")
    value = scaling.get("efficiency") if isinstance(scaling, Mapping) else None
    return float(value) if isinstance(value, int | float) and value > 0 else None
