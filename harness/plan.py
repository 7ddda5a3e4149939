"""`harness plan`: how many servers the next job needs, from the scale reports measured.

    harness plan --rows 1700000 --deadline 24h [--model gemma3:12b] [--backend ollama]
                 [--strategy stateless] [--price-per-kwh 0.30] [--report-dir reports]

Reads the scale reports (`performance_benchmarks_<N>.json`) of the asked model, backend and
strategy, takes the largest finished one (the longest, steadiest measurement), and prints the
servers of that kind the job needs to finish by the deadline, its time on them, its energy and
cost (from the GPU energy the run measured, when it did), each figure with the report it came
from. A report measured on the CPU stand-in plans for that stand-in, not for a GPU, and says so.
With no report of that model, backend and strategy it refuses (exit 2) and lists what it has.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError
from harness.scoring import mode_of_report
from harness.verdict import ReportEntry, read_reports

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
    error_rate: float
    energy_kwh: float | None
    cost: float | None
    source: ReportEntry

    def lines(self, price_per_kwh: float) -> list[str]:
        src = f"{self.source.file} ({self.source.model} on {self.source.backend}, "
        src += f"{self.source.data.get('requests')} requests, {self.source.generated_at})"
        out = [
            f"plan: {self.rows:,} rows by {self.deadline_s / 3600:.1f} h",
            f"servers: {self.servers} of this kind ({self.rps_per_server:.3f} completed req/s "
            f"each, measured in {src}, {mode_of_report(self.source.data)})",
            f"time: {self.hours:.1f} h on {self.servers} server(s), assuming they add up (each "
            "warms its own prefix cache; measure the scaling before relying on it)",
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
        return out


def plan(
    report_dir: Path,
    *,
    rows: int,
    deadline_s: float,
    model: str | None,
    backend: str | None,
    strategy: str | None,
    price_per_kwh: float,
) -> Plan:
    """The plan from the largest finished scale report that matches (see the module doc)."""
    if rows < 1 or deadline_s <= 0:
        raise ConfigError("--rows must be at least 1 and --deadline positive")
    scale = [e for e in read_reports(report_dir) if e.phase == "scale"]
    usable = [
        e
        for e in scale
        if e.data.get("finished") is not False and float(e.data.get("throughput_rps") or 0) > 0
    ]
    match = [
        e
        for e in usable
        if (model is None or e.model == model)
        and (backend is None or e.backend == backend)
        and (strategy is None or e.strategy == strategy)
    ]
    if not match:
        have = sorted({f"{e.model} on {e.backend}, {e.strategy} ({e.file})" for e in usable})
        raise ConfigError(
            f"no finished scale report in {report_dir} of model {model or 'any'}, backend "
            f"{backend or 'any'}, strategy {strategy or 'any'}; it has: "
            + ("; ".join(have) if have else "none (run pytest -m scale_100 first)")
        )
    best = max(match, key=lambda e: int(e.data.get("requests") or 0))
    rps = float(best.data["throughput_rps"])
    servers = max(1, math.ceil(rows / (rps * deadline_s)))
    energy_wh, done = best.data.get("energy_wh"), best.data.get("completed")
    kwh = float(energy_wh) / float(done) * rows / 1000.0 if energy_wh and done else None
    return Plan(
        rows=rows,
        deadline_s=deadline_s,
        servers=servers,
        hours=rows / (rps * servers) / 3600.0,
        rps_per_server=rps,
        error_rate=float(best.data.get("error_rate") or 0.0),
        energy_kwh=kwh,
        cost=kwh * price_per_kwh if kwh is not None else None,
        source=best,
    )
