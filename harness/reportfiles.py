"""Whose a report file is: the profile and model in its name, and finding one by them.

A phase report is written as `<base>.<profile>.<model>.json` — `performance_benchmarks_100.
gpu-gemma3-12b.gemma3-12b.json`, `context_limit_results.embedded.gemma3-270m.json` — so a run of
one profile or model never overwrites another's (`make run` after a night of production phases
in the same `reports/` used to replace `performance_benchmarks_100.json`). The base keeps the
roadmap's names; everything up to the first dot is the base, so `base_name` finds it in both
layouts. Reports written before the profile went into the name (`<base>.json`) still load: the
readers below take both, and tell them apart by what the report itself says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "base_name",
    "find_report",
    "not_a_measurement",
    "not_a_reference",
    "report_filename",
    "reports_named",
    "slug",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9_+-]+")


def slug(text: str) -> str:
    """A profile or model as a file-name part: `gemma3:12b` → `gemma3-12b`; a model path →
    its file's stem (`/m/SmolLM2.Q4.gguf` → `SmolLM2-Q4`)."""
    name = text.strip()
    if "/" in name or name.endswith(".gguf"):
        name = Path(name).name.removesuffix(".gguf")
    return _UNSAFE.sub("-", name).strip("-") or "unknown"


def report_filename(base: str, profile: str, model: str) -> str:
    """`performance_benchmarks_100.json`, `gpu-gemma3-12b`, `gemma3:12b` →
    `performance_benchmarks_100.gpu-gemma3-12b.gemma3-12b.json`."""
    stem = base.removesuffix(".json")
    return f"{stem}.{slug(profile)}.{slug(model)}.json"


def base_name(filename: str) -> str:
    """The roadmap's name of a report file, in either layout: `…_100.embedded.x.json` and
    `…_100.json` both give `performance_benchmarks_100.json`."""
    return filename.split(".", 1)[0] + ".json"


def reports_named(report_dir: Path, base: str) -> Iterator[Path]:
    """Every file in `report_dir` whose base is `base` (both layouts), by name."""
    stem = base.removesuffix(".json")
    seen = sorted({*report_dir.glob(f"{stem}.*.json"), report_dir / f"{stem}.json"})
    for path in seen:
        if path.is_file() and base_name(path.name) == f"{stem}.json":
            yield path


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_report(
    report_dir: Path, base: str, *, profile: str | None = None, model: str | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest report named `base` of this profile and model (either when None), read; None
    when there is none. Old-layout files count when what they say matches."""
    best: tuple[str, Path, dict[str, Any]] | None = None
    for path in reports_named(report_dir, base):
        data = _load(path)
        if data is None:
            continue
        backend = data.get("backend") if isinstance(data.get("backend"), Mapping) else {}
        if profile is not None and data.get("profile") != profile:
            continue
        if model is not None and (backend or {}).get("model", data.get("model")) != model:
            continue
        when = str(data.get("generated_at", ""))
        if best is None or when > best[0]:
            best = (when, path, data)
    return (best[1], best[2]) if best is not None else None


def not_a_measurement(data: Mapping[str, Any]) -> str | None:
    """Why a report's figures are not a measurement (a test double, a replayed server), or
    None. A replay says so in its `/api/version` answer or its own header; the backend records
    it (`backend.replay`) in every report it feeds."""
    b = data.get("backend")
    b = b if isinstance(b, Mapping) else {}
    if b.get("replay"):
        return f"a replayed server ({b['replay']}), not a measurement"
    server = str(b.get("server") or "")
    if "test double" in server or data.get("cached_tokens_source") == "double":
        return "a test double's figures, not measurements"
    if "replay" in server.lower():
        return f"a replayed server ({server}), not a measurement"
    return None


def not_a_reference(data: Mapping[str, Any]) -> str | None:
    """Why a scale report may not be a reference for another run (a projection's, a pool's
    scaling), or None: it must be finished, passed and measured, with a throughput (the
    verdict's `projection_sources` rule)."""
    if data.get("finished") is False:
        return "stopped part-way"
    if data.get("result") != "PASS":
        return f"result {data.get('result') or 'none'}, not PASS"
    why = not_a_measurement(data)
    if why:
        return why
    if not data.get("throughput_rps"):
        return "no throughput"
    return None
