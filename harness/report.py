"""JSON reports with a fixed shape, like pytest-benchmark's (the models: harness.reportmodels).

Every phase report has the same top-level keys first — `harness_version`, `phase`, `scenario`,
`profile`, `generated_at`, `machine_info`, `commit_info`, `backend`, `criteria`, `passed`,
`result` (`PASS`, `FAIL`, or `ungated` when no criteria were checked: never a pass) —
followed by the phase's own figures (also at top level, as the roadmap's files had them). The
envelope is a pydantic model, so a report that lacks them cannot be written. Files are written
atomically.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from harness import __version__
from harness.fileio import atomic_write_json
from harness.reportmodels import phase_model_for

__all__ = ["commit_info", "machine_info", "write_report"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict[str, Any]] | None:
    """Name and memory of each NVIDIA GPU via NVML; None when there is none."""
    from harness.memory import NvmlUnavailable, load_nvml

    try:
        nvml = load_nvml()
    except NvmlUnavailable:
        return None
    out = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        out.append(
            {
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_total_bytes": int(mem.total),
            }
        )
    return out


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS, Python, and GPUs (NVML) of this machine."""
    return {
        "node": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": int(psutil.virtual_memory().total),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpus": gpu_info(),
    }


def commit_info(cwd: str | Path | None = None) -> dict[str, Any] | None:
    """The git commit of the working tree (None outside a repository)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"id": commit, "dirty": dirty, "branch": branch}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_report(
    path: str | Path,
    *,
    phase: str,
    scenario: str,
    profile: str,
    backend: Mapping[str, Any],
    figures: Mapping[str, Any],
    criteria: list[dict[str, Any]],
    machine: Mapping[str, Any] | None = None,
    commit: Mapping[str, Any] | None = None,
    prompt: Mapping[str, Any] | None = None,
    job: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate the envelope, write the report atomically, and return it as a dict."""
    model = phase_model_for(Path(path).name)
    report = model(
        harness_version=__version__,
        phase=phase,
        scenario=scenario,
        profile=profile,
        generated_at=now_iso(),
        machine_info=dict(machine) if machine is not None else machine_info(),
        commit_info=dict(commit) if commit is not None else commit_info(),
        backend=dict(backend),
        criteria=criteria,
        prompt=dict(prompt) if prompt is not None else None,
        job=dict(job) if job is not None else None,
        passed=all(c.get("passed") for c in criteria) if criteria else None,
        result=("PASS" if all(c.get("passed") for c in criteria) else "FAIL")
        if criteria
        else "ungated",
        **dict(figures),
    ).to_dict()
    atomic_write_json(path, report)
    return report
