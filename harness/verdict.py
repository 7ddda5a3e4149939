"""The answer a user came for: go or no-go for the production run, read from every report.

`read_reports(report_dir)` lists every phase report in the folder (not only this session's),
each with its model, backend, profile, time and result: `PASS` (criteria checked and met),
`FAIL`, or `ungated` (no criteria: never a pass). `verdict(...)` then says:

- **GO** only from the production profile's own reports (`gpu-gemma3-12b`): every phase the
  roadmap asks for present and passed;
- **NO-GO** when a production report failed (which, and why);
- **incomplete** when production reports exist but phases are missing (which);
- **not measured for production** when only a stand-in ran (the embedded CPU profile): what it
  predicts, and that it is a prediction;

with the settings to run with (harness.yaml's values and their provenance), the projected 170K
time and cost with the report each comes from, and what was not measured (missing phases,
ungated reports, cached tokens not reported by the server).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import load_profile
from harness.scoring import mode_of_report

__all__ = [
    "PRODUCTION_PROFILE",
    "REQUIRED_PHASES",
    "ReportEntry",
    "Verdict",
    "read_reports",
    "verdict",
]

PRODUCTION_PROFILE = "gpu-gemma3-12b"
REQUIRED_PHASES: tuple[tuple[str, str], ...] = (
    ("context limits", "context_limit_results.json"),
    ("prefix reuse", "prefix_reuse_results.json"),
    ("scale 100", "performance_benchmarks_100.json"),
    ("scale 1K", "performance_benchmarks_1000.json"),
    ("scale 10K", "performance_benchmarks_10000.json"),
    ("quality", "quality_results.json"),
    ("reliability", "reliability_results.json"),
)
"""The roadmap's phases a production run needs, by report file."""
ROWS = 170_000


@dataclass(frozen=True, slots=True)
class ReportEntry:
    """One phase report found in the folder."""

    file: str
    phase: str
    profile: str
    model: str
    backend: str
    generated_at: str
    result: str
    """`PASS`, `FAIL` or `ungated`."""
    failed: tuple[str, ...]
    data: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def strategy(self) -> str | None:
        st = self.data.get("strategy")
        return st.get("name") if isinstance(st, Mapping) else None


def _result(data: Mapping[str, Any]) -> str:
    passed = data.get("passed")
    if passed is True and data.get("criteria"):
        return "PASS"
    if passed is False:
        return "FAIL"
    return "ungated"


def read_reports(report_dir: Path) -> list[ReportEntry]:
    """Every phase report (a JSON file with `phase` and `criteria`) in the folder, by name."""
    out: list[ReportEntry] = []
    for path in sorted(report_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "phase" not in data or "criteria" not in data:
            continue
        raw_backend = data.get("backend")
        backend: dict[str, Any] = raw_backend if isinstance(raw_backend, dict) else {}
        failed = tuple(
            f"{c.get('metric')} = {c.get('value')!r}, needs {c.get('op')} {c.get('threshold')}"
            for c in data.get("criteria") or []
            if isinstance(c, dict) and c.get("passed") is False
        )
        out.append(
            ReportEntry(
                file=path.name,
                phase=str(data.get("phase")),
                profile=str(data.get("profile")),
                model=str(backend.get("model") or data.get("model") or "?"),
                backend=str(backend.get("name") or "?"),
                generated_at=str(data.get("generated_at", "")),
                result=_result(data),
                failed=failed,
                data=data,
            )
        )
    return out


@dataclass(slots=True)
class Verdict:
    decision: str
    """`GO`, `NO-GO`, `incomplete` or `not measured for production`."""
    reasons: list[str]
    settings: list[str]
    projection: list[str]
    not_measured: list[str]

    def lines(self) -> list[str]:
        out = [f"verdict: {self.decision}"]
        out += [f"  {r}" for r in self.reasons]
        if self.settings:
            out.append("settings to run with (harness.yaml):")
            out += [f"  {s}" for s in self.settings]
        if self.projection:
            out.append("projection:")
            out += [f"  {p}" for p in self.projection]
        if self.not_measured:
            out.append("not measured:")
            out += [f"  {n}" for n in self.not_measured]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reasons": self.reasons,
            "settings": self.settings,
            "projection": self.projection,
            "not_measured": self.not_measured,
        }


def _settings(config_path: Path, profile: str) -> list[str]:
    try:
        cfg = load_profile(config_path, profile)
    except Exception as exc:  # a broken harness.yaml is reported, not fatal here
        return [f"{config_path}: {exc}"]
    out = []
    for key, value in cfg.values.items():
        prov = cfg.provenance.get(key)
        src = (
            f"{prov.get('report')} ({prov.get('backend')}, {prov.get('date')})"
            if isinstance(prov, Mapping)
            else "set by hand"
        )
        out.append(f"{key}: {value} — {src}")
    return out


def _is_double(e: ReportEntry) -> bool:
    backend = e.data.get("backend")
    server = str(backend.get("server", "")) if isinstance(backend, Mapping) else ""
    return "test double" in server or e.data.get("cached_tokens_source") == "double"


def _projection(entries: Sequence[ReportEntry]) -> list[str]:
    scale = [
        e
        for e in entries
        if e.phase == "scale" and e.data.get("throughput_rps") and not _is_double(e)
    ]
    if not scale:
        return []
    best = max(
        scale, key=lambda e: int(e.data.get("requests_planned") or e.data.get("requests") or 0)
    )
    rps = float(best.data["throughput_rps"])
    out = [
        f"{ROWS:,} rows at {rps:.2f} req/s (measured in {best.file}, {best.model} on "
        f"{best.backend}, {mode_of_report(best.data)}): {ROWS / rps / 3600:.1f} h"
    ]
    energy, done = best.data.get("energy_wh"), best.data.get("completed")
    price = best.data.get("price_per_kwh")
    if energy and done:
        kwh = float(energy) / float(done) * ROWS / 1000
        cost = f", ${kwh * float(price):.2f} at ${price}/kWh" if price is not None else ""
        out.append(
            f"energy: {kwh:.1f} kWh for {ROWS:,} rows{cost} ({best.data.get('energy_source')}, "
            f"{best.file})"
        )
    else:
        out.append(f"cost: not measured ({best.file} has no GPU energy reading)")
    return out


def verdict(report_dir: Path, config_path: Path) -> Verdict:
    """The verdict over every report in `report_dir` (see the module docstring)."""
    entries = read_reports(report_dir)
    # Production's own measurements only: its profile, on Ollama, not a test double, one model.
    prod = [
        e
        for e in entries
        if e.profile == PRODUCTION_PROFILE and e.backend == "ollama" and not _is_double(e)
    ]
    models = sorted({e.model for e in prod})
    if len(models) > 1:
        newest = max(prod, key=lambda e: e.generated_at).model
        prod = [e for e in prod if e.model == newest]
    files = {e.file: e for e in prod}
    missing = [name for name, file in REQUIRED_PHASES if file not in files]
    not_measured = [f"{e.file}: ungated (no criteria were checked)" for e in entries
                    if e.result == "ungated"]  # fmt: skip
    for e in entries:
        source = e.data.get("cached_tokens_source")
        if _is_double(e):
            not_measured.append(f"{e.file}: a test double's figures, not measurements")
        elif e.phase == "scale" and source not in (None, "server", "llama.cpp timings"):
            not_measured.append(f"{e.file}: cached tokens {source}, not reported by the server")
    if not prod:
        stand_ins = sorted({f"{e.profile} ({e.model} on {e.backend})" for e in entries})
        reasons = [
            "no report of the production profile (gpu-gemma3-12b: Ollama, Gemma 3 12B, GPU)",
            "this folder holds a stand-in's reports: "
            + (", ".join(stand_ins) or "none")
            + ". They predict the pipeline's behaviour (caching, trims, memory per token), "
            "not production's throughput or scores",
        ]
        failing = [e for e in entries if e.result == "FAIL"]
        reasons += [f"stand-in FAIL: {e.file}: {'; '.join(e.failed)}" for e in failing]
        return Verdict(
            "not measured for production",
            reasons,
            _settings(config_path, "embedded"),
            _projection(entries),
            not_measured,
        )
    failed = [e for e in prod if e.result == "FAIL"]
    if failed:
        decision = "NO-GO"
        reasons = [f"{e.file} FAIL: {'; '.join(e.failed)}" for e in failed]
    elif missing:
        decision = "incomplete"
        reasons = [f"phases not run yet for {PRODUCTION_PROFILE}: {', '.join(missing)}"]
    elif any(e.result == "ungated" for e in prod):
        decision = "incomplete"
        ungated = [e.file for e in prod if e.result == "ungated"]
        reasons = ["ungated production reports: " + ", ".join(ungated)]
    else:
        decision = "GO"
        reasons = [f"every required phase of {PRODUCTION_PROFILE} passed"]
    if missing and decision != "incomplete":
        reasons.append(f"phases not run yet: {', '.join(missing)}")
    if len(models) > 1:
        reasons.append(
            f"reports of several models ({', '.join(models)}): the verdict reads {prod[0].model}'s"
        )
    return Verdict(
        decision, reasons, _settings(config_path, PRODUCTION_PROFILE), _projection(prod),
        not_measured,
    )  # fmt: skip
