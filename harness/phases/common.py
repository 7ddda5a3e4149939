"""What the phase suites share: workloads from scenarios, the shape of a workload's prompts,
and the figures of a scale report. Suites stay thin; the logic lives here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from harness.backends.ollama import CACHED_FIELD_EVIDENCE
from harness.engine.job import JobResult, JobSpec
from harness.engine.reusewatch import describe as describe_alarm
from harness.engine.runner import RunnerConfig
from harness.engine.strategies import TrimPolicy
from harness.engine.tokens import TokenCounter
from harness.metrics import RunMetrics
from harness.reportfiles import base_name, find_report, not_a_reference
from harness.scenarios import Scenario, lookup
from harness.workload import (
    CandidateTable,
    PromptSpec,
    WorkItem,
    generate_candidates,
    items_from_table,
    load_prompt,
    read_candidates_csv,
    sample_rows,
    tokens_for_schema,
)

__all__ = [
    "GENERATED_ROWS",
    "context_shape",
    "drawn",
    "items_for",
    "job_identity",
    "longest_rows",
    "phase1_budget",
    "phase_job",
    "projection_check",
    "prompt_for",
    "prompt_identity",
    "recommended_trim_interval",
    "reply_tokens",
    "run_identity",
    "scale_figures",
    "scaling_check",
    "table_for",
]

GB = 1e9
MB = 1e6


def phase_job(
    base: JobSpec,
    *,
    strategy: str | None = None,
    policy: TrimPolicy | None = None,
    runner: RunnerConfig | None = None,
    keep_records: bool | None = None,
    progress: bool | None = None,
    progress_stream: TextIO | None = None,
) -> JobSpec:
    """A phase's job: `base`, the run's job on its started server as
    `harness.run.preflight.spec_for` builds it (capped to the server's context there, the reuse
    watch, the description), with what the phase itself measures set here (a variant's strategy,
    a policy at the server's context, the runner, records kept); what is not given stays the
    run's. The suites build every run's job so (`harness.phases` sits below `harness.run` and
    does not import it: a phase is handed the run's job, or a function that makes it)."""
    changes: dict[str, Any] = {
        "strategy": strategy,
        "policy": policy,
        "runner": runner,
        "keep_records": keep_records,
        "progress": progress,
        "progress_stream": progress_stream,
    }
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def prompt_for(scenario: Scenario, profile: str) -> PromptSpec:
    """The scenario's prompt file (relative to the scenario), default the recruiter rubric."""
    wl = scenario.workload_for(profile)
    return load_prompt(Path(scenario.path).parent / wl.prompt if wl.prompt else None)


def prompt_identity(scenario: Scenario, profile: str, root: Path | None = None) -> dict[str, str]:
    """The prompt a phase sends, as its report names it: name, file (relative to `root` when
    under it) and sha256 (system, template and schema)."""
    prompt = prompt_for(scenario, profile)
    file = Path(prompt.path) if prompt.path else None
    if file is not None and root is not None:
        with contextlib.suppress(ValueError):
            file = file.resolve().relative_to(root.resolve())
    return {"name": prompt.name, "file": str(file or ""), "sha256": prompt.sha256}


GENERATED_ROWS = "generated rows, not your input"
"""What a report says of its rows when the run was given no input (`--harness-input`)."""

REPEAT_MARK = "[repeat {k}] "
"""Put before the first column the prompt shows of a row's k-th repeat (a phase larger than
the input): the row then differs from its first sending right after the shared rubric, so no
prefix cache (a slot's, or llama-server's host cache, `--cache-ram`) serves it as new."""


@functools.lru_cache(maxsize=2)
def _read_table(path: str, id_column: str, stamp: tuple[int, int]) -> CandidateTable:
    """The CSV read once per session and file version (`stamp`: size and mtime)."""
    return read_candidates_csv(path, id_column)


def _input_table(scenario: Scenario, profile: str) -> CandidateTable:
    wl = scenario.workload_for(profile)
    path = Path(scenario.path).parent / wl.candidates
    try:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)  # the reader names the problem
    return _read_table(str(path), wl.id_column, stamp)


def _shown_column(prompt: PromptSpec, table: CandidateTable) -> str | None:
    """The first column the prompt's template shows of a row (None: it shows none)."""
    for name in prompt.placeholders():
        if name == "columns":
            return next((c for c in table.columns if c != table.id_column), None)
        if name in table.columns and name != table.id_column:
            return name
    return None


def drawn(table: CandidateTable, n: int, seed: int, prompt: PromptSpec) -> CandidateTable:
    """`n` rows of the user's input: a seeded sample in input order (`sample_rows`, as `harness
    run --sample` draws), or, for more rows than it has, every row and then repeats of them in
    order, the k-th repeat's id `<id>#<k>` and its first shown column marked (`REPEAT_MARK`)."""
    if n <= len(table.rows):
        keep = sample_rows(range(len(table.rows)), n, seed)
        rows = tuple(table.rows[i] for i in keep)
        return replace(table, rows=rows, lines=tuple(table.lines[i] for i in keep))
    shown = _shown_column(prompt, table)
    rows_out, lines = [], []
    for j in range(n):
        k, i = divmod(j, len(table.rows))
        row = table.rows[i]
        if k:
            row = {**row, table.id_column: f"{row[table.id_column]}#{k}"}
            if shown is not None:
                row[shown] = REPEAT_MARK.format(k=k) + row[shown]
        rows_out.append(row)
        lines.append(table.lines[i])
    return replace(table, rows=tuple(rows_out), lines=tuple(lines))


def table_for(scenario: Scenario, profile: str, n: int | None = None) -> CandidateTable:
    """The rows a phase sends, `n` of them: generated, the user's input (`drawn` from it: the
    job laid over the scenario, `Scenario.with_job`), or a scenario's own CSV (its first `n`)."""
    wl = scenario.workload_for(profile)
    count = n or wl.requests or 100
    if wl.candidates == "generated":
        rows = tuple(generate_candidates(count, seed=wl.seed))
        return CandidateTable("generated", tuple(rows[0]), "id", rows, tuple(range(2, count + 2)))
    table = _input_table(scenario, profile)
    if scenario.job is not None and "candidates" in scenario.job:
        return drawn(table, count, wl.seed, prompt_for(scenario, profile))
    return replace(table, rows=table.rows[:count], lines=table.lines[:count])


def longest_rows(scenario: Scenario, profile: str, k: int = 20) -> CandidateTable:
    """The `k` rows of the job's whole input whose columns the prompt shows hold the most
    characters (the candidates for the longest prompts, their tokens counted by the caller);
    without a job, the `k` rows the phase draws."""
    if scenario.job is None or "candidates" not in scenario.job:
        return table_for(scenario, profile, k)
    table = _input_table(scenario, profile)
    prompt = prompt_for(scenario, profile)
    names = set(prompt.placeholders())
    shown = [c for c in table.columns if c != table.id_column and ("columns" in names
             or c in names)]  # fmt: skip

    def size(i: int) -> int:
        return sum(len(table.rows[i].get(c) or "") for c in shown)

    keep = sorted(sorted(range(len(table.rows)), key=size, reverse=True)[:k])
    return replace(
        table,
        rows=tuple(table.rows[i] for i in keep),
        lines=tuple(table.lines[i] for i in keep),
    )


def job_identity(scenario: Scenario, profile: str, root: Path | None = None) -> dict[str, Any]:
    """The rows a phase sent, as its report names them (the envelope's `job`): the input file
    (relative to `root` when under it) and its id column and row count, or that the rows were
    generated (`GENERATED_ROWS`); how they were drawn; the job settings the user gave."""
    wl = scenario.workload_for(profile)
    given = sorted(scenario.job or {})
    sent = {
        "structured": wl.structured,
        "max_tokens": wl.max_tokens or "what the prompt's output schema needs",
        "as_harness_run": dict(scenario.as_run or {}),
    }
    if wl.candidates == "generated":
        return {"input": None, "rows": GENERATED_ROWS, "given": given, **sent}
    table = _input_table(scenario, profile)
    file = Path(table.path)
    if root is not None:
        with contextlib.suppress(ValueError):
            file = file.resolve().relative_to(root.resolve())
    yours = scenario.job is not None and "candidates" in scenario.job
    return {
        "input": str(file),
        "id_column": table.id_column,
        "input_rows": len(table.rows),
        "rows": "your input" if yours else "the scenario's CSV",
        "draw": (
            f"a sample of each phase's size drawn with seed {wl.seed}, in input order; a phase "
            f"larger than the input sends every row, then repeats them, each repeat's id "
            f"<id>#<k> and its first shown column marked {REPEAT_MARK.format(k='k')!r} so no "
            "prefix cache serves it as new"
            if yours
            else "the first rows of the file"
        ),
        "given": given,
        **sent,
    }


def reply_tokens(scenario: Scenario, profile: str) -> int:
    """The reply tokens each request asks for: the workload's, else (a job: as `harness run`)
    what the prompt's output schema needs."""
    wl = scenario.workload_for(profile)
    if wl.max_tokens is not None:
        return wl.max_tokens
    schema = prompt_for(scenario, profile).output_schema if wl.structured != "none" else None
    return tokens_for_schema(schema)


def items_for(
    scenario: Scenario,
    profile: str,
    n: int | None = None,
    *,
    table: CandidateTable | None = None,
) -> list[WorkItem]:
    """The scenario's work items (its workload with the profile's overrides)."""
    wl = scenario.workload_for(profile)
    prompt = prompt_for(scenario, profile)
    if table is None:
        table = table_for(scenario, profile, n)
    return items_from_table(
        table,
        prompt,
        max_tokens=reply_tokens(scenario, profile),
        temperature=wl.temperature,
        seed=wl.seed,
        structured=wl.structured,
    )


async def context_shape(counter: TokenCounter, items: Sequence[WorkItem]) -> dict[str, float]:
    """Tokens of the shared prefix and of one exchange (candidate turn + reply room)."""
    await counter.prepare(it.messages for it in items)
    first = items[0]
    prefix = len(await counter.count(list(first.prefix), add_generation_prompt=False)) + 1
    per_turn = []
    for it in items:
        whole = len(await counter.count(list(it.messages), add_generation_prompt=True))
        # The turn's tokens, plus the reply and its closing tokens when it joins the history.
        per_turn.append(whole - prefix + (it.max_tokens or 0) + 2)
    return {
        "prefix_tokens": float(prefix),
        "tokens_per_exchange": sum(per_turn) / len(per_turn),
        "max_tokens_per_exchange": float(max(per_turn)),
        "max_tokens": float(first.max_tokens or 0),
    }


def recommended_trim_interval(safe_tokens: int, shape: Mapping[str, float]) -> int:
    """Exchanges that fit between the shared prefix and the safe threshold."""
    room = safe_tokens - shape["prefix_tokens"] - shape["max_tokens"]
    return max(1, math.floor(room / shape["tokens_per_exchange"]))


def phase1_budget(
    report_dir: Path, profile: str, model: str | None = None
) -> tuple[int, str] | None:
    """Phase 1's memory budget for this profile (and model, when given), from its newest
    report, when phase 1 ran."""
    found = find_report(report_dir, "context_limit_results.json", profile=profile, model=model)
    if found is None:
        return None
    path, data = found
    budget = data.get("memory_budget_bytes")
    if not isinstance(budget, int | float):
        return None
    return int(budget), f"phase 1 ({path.name}: {data.get('memory_budget_source')})"


def run_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two scale reports comparable: profile, model, backend and strategy."""
    backend = data.get("backend") if isinstance(data.get("backend"), Mapping) else {}
    strategy = data.get("strategy") if isinstance(data.get("strategy"), Mapping) else {}
    return {
        "profile": data.get("profile"),
        "model": (backend or {}).get("model"),
        "backend": (backend or {}).get("name"),
        "strategy": (strategy or {}).get("name"),
    }


def projection_check(
    report_dir: Path, size: int, elapsed_s: float, identity: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Compare this run's time with what the largest smaller run of the same profile, model,
    backend and strategy predicted, a finished, passing, measured one (`not_a_reference`);
    runs of anything else, and those that may not be a reference, are listed as not
    comparable, with why."""
    best: tuple[int, str, dict[str, Any]] | None = None
    others: list[str] = []
    for path in sorted(report_dir.glob("performance_benchmarks_*.json")):
        try:
            n = int(base_name(path.name).removesuffix(".json").rsplit("_", 1)[1])
            data = json.loads(path.read_text())
        except (ValueError, OSError, IndexError):
            continue
        if n >= size:
            continue  # larger: predicts nothing
        why = not_a_reference(data)
        if why:  # failed, stopped, a replay or a double: never a gate's baseline
            others.append(f"{path.name} ({why})")
            continue
        theirs = run_identity(data)
        if theirs != dict(identity):
            differ = [k for k in identity if theirs.get(k) != identity[k]]
            others.append(f"{path.name} ({', '.join(f'{k} {theirs.get(k)}' for k in differ)})")
            continue
        if best is None or n > best[0]:
            best = (n, path.name, data)
    if best is None:
        if not others:
            return None
        return {"from_report": None, "not_comparable": others, "error": None}
    n, name, data = best
    predicted = size / float(data["throughput_rps"])
    return {
        "from_requests": n,
        "from_report": name,
        "predicted_s": predicted,
        "actual_s": elapsed_s,
        "error": elapsed_s / predicted - 1.0,
        "not_comparable": others,
    }


def scale_figures(
    result: JobResult,
    *,
    size: int,
    planned: int | None = None,
    report_dir: Path,
    energy_wh: float | None = None,
    price_per_kwh: float = 0.30,
    model_note: str = "",
    server_name: str = "the server",
    identity: Mapping[str, Any] | None = None,
    expected: Mapping[str, Any] | None = None,
    memory_budget: tuple[int, str] | None = None,
    predicted_memory_gb: float | None = None,
    servers: int = 1,
) -> dict[str, Any]:
    """The figures of a scale report (performance_benchmarks_<N>.json). `predicted_memory_gb`:
    phase 1's line at this run's context (harness.yaml's MODEL_VRAM_GB and KV per token),
    compared with the peak measured; `servers`: how many servers the run went over (a pool's
    scaling efficiency is measured against the largest single-server run of its identity)."""
    m = result.metrics
    server = result.memory.get("server") or {}
    gpu = result.memory.get("gpu") or {}
    runner = result.memory.get("runner") or {}
    # Read from the device when the server is on this machine's GPU; else what the server
    # (its process RSS, Ollama's /api/ps) says.
    primary = gpu or server
    peak = primary.get("peak_bytes")
    projection = None
    if result.error is None and identity is not None:
        projection = projection_check(report_dir, size, m.elapsed_s, identity)
    figures: dict[str, Any] = {
        "requests_planned": planned if planned is not None else size,
        "requests": m.requests,
        "completed": m.completed,
        "finished": result.error is None,
        "stopped_by": result.error,
        "errors": m.errors,
        "error_rate": m.error_rate,
        "errors_by_type": m.errors_by_type,
        "elapsed_s": m.elapsed_s,
        "throughput_rps": m.throughput_rps,
        "tokens_per_s": m.tokens_per_s,
        "tokens": m.tokens,
        "token_savings": m.token_savings,
        "token_savings_theoretical_max": m.token_savings_theoretical_max,
        "savings_efficiency": m.savings_efficiency,
        "cached_tokens_source": m.cached_source,
        "cached_sources": m.cached_sources,
        "cached_coverage": m.cached_coverage,
        "uncached_tokens_per_request": m.uncached_tokens_per_request,
        "context_shifts": m.context_shifts,
        "unknown_reasons": _unknown_reasons(m, server_name),
        "token_counts_source": result.token_counter,
        "latency_ms": {
            "p50": m.latency_ms.p50,
            "p95": m.latency_ms.p95,
            "p99": m.latency_ms.p99,
            "mean": m.latency_ms.mean,
        },
        "context_trims": m.context_trims,
        "trims_by_reason": m.trims_by_reason,
        "retries": m.retries,
        "memory": {
            "peak_bytes": peak,
            "peak_gb": peak / GB if peak is not None else None,
            "source": primary.get("source"),
            "kind": primary.get("kind"),
            # None when no reading could tell (never "not spilled" without one).
            "spilled": server.get("spilled"),
            "samples": server.get("samples"),
            "failed_readings": server.get("failed_readings"),
            "failed_readings_rate": _failed_rate(server),
            "not_loaded_readings": server.get("not_loaded_readings"),
            "members_peak_bytes": server.get("members_peak_bytes"),
            "server_peak_bytes": server.get("peak_bytes"),
            "server_source": server.get("source"),
            "gpu_peak_bytes": gpu.get("peak_bytes"),
            "gpu_source": gpu.get("source"),
            "runner_peak_bytes": runner.get("peak_bytes"),
        },
        "leak": {
            "server_bytes_per_hour": (server.get("leak") or {}).get("bytes_per_hour"),
            "runner_bytes_per_hour": (runner.get("leak") or {}).get("bytes_per_hour"),
            "gpu_bytes_per_hour": (gpu.get("leak") or {}).get("bytes_per_hour"),
            "server_growth_bytes": (server.get("leak") or {}).get("growth_bytes"),
            "runner_growth_bytes": (runner.get("leak") or {}).get("growth_bytes"),
            # The runner's figures above are taken on RSS minus its bounded caches; RSS alone:
            "runner_rss_bytes_per_hour": (runner.get("leak_rss") or {}).get("bytes_per_hour"),
            "runner_cache_bytes": runner.get("held_bytes_last"),
            "runner_basis": runner.get("leak_basis"),
        },
        "degradation": m.degradation,
        "projected_170k_s": m.projected_170k_s,
        "projection": projection,
        "projection_error": projection["error"] if projection else None,
        "eta": result.eta,
        "eta_error_max": result.eta.get("max_abs_error"),
        "overflow_errors": sum(
            m.errors_by_type.get(k, 0) for k in ("ContextOverflow", "OutOfMemory", "LoadFailure")
        ),
        "energy_wh": energy_wh,
        "cost": energy_wh / 1000.0 * price_per_kwh if energy_wh is not None else None,
        "price_per_kwh": price_per_kwh,
        "projected_170k_cost": (
            energy_wh / m.completed * 170_000 / 1000.0 * price_per_kwh
            if energy_wh is not None and m.completed
            else None
        ),
        "model_note": model_note,
        # Over several servers (a pool): each one's rows, req/s, savings, errors, latency, and
        # when it left and why (harness.engine.job.endpoint_report). None for one server.
        "endpoints": result.endpoints or None,
        "cached_omitted": m.cached_omitted,
        "reuse_alarms": list(result.reuse_alarms),
        "reuse_windows": result.reuse_windows,
    }
    reasons = figures["unknown_reasons"]
    _memory_checks(figures, server, server_name, predicted_memory_gb)
    _savings_notes(figures, m, result)
    if servers > 1 and result.error is None and identity is not None:
        figures["scaling"] = scaling_check(report_dir, m.throughput_rps, servers, identity)
        figures["scaling_efficiency"] = figures["scaling"].get("efficiency")
        if figures["scaling_efficiency"] is None:
            reasons["scaling_efficiency"] = figures["scaling"]["why"]
    if projection is None or projection.get("error") is None:
        reasons["projection_error"] = (
            f"no finished smaller scale report of the same profile, model, backend and strategy "
            f"in {report_dir} (run the smaller phases first)"
        )
    if energy_wh is None:
        reasons["projected_170k_cost"] = reasons["cost"] = (
            "energy not measured (NVML reads it only when the server's GPU is on this machine)"
        )
    if not gpu:
        reasons["leak.gpu_bytes_per_hour"] = "no GPU memory reading (NVML) on this machine"
    if memory_budget is None:
        reasons["memory.within_budget"] = (
            f"no phase 1 report of this profile in {report_dir} (run suites/context_limits first)"
        )
    else:
        budget, source = memory_budget
        figures["memory"]["budget_bytes"] = budget
        figures["memory"]["budget_source"] = source
        figures["memory"]["within_budget"] = peak is not None and peak <= budget
    if expected:
        # A scenario's own expectations, beside what was measured (its criteria gate).
        figures["expected_vs_measured"] = {
            key: {
                "expected": want,
                "measured": (got := lookup(figures, key)),
                "ratio": got / want
                if isinstance(got, int | float) and isinstance(want, int | float) and want
                else None,
            }
            for key, want in expected.items()
        }
    return figures


def _failed_rate(summary: Mapping[str, Any]) -> float | None:
    samples, failed = summary.get("samples"), summary.get("failed_readings")
    if samples is None or failed is None or samples + failed == 0:
        return None
    return float(failed) / float(samples + failed)


def _memory_checks(
    figures: dict[str, Any],
    server: Mapping[str, Any],
    server_name: str,
    predicted_gb: float | None,
) -> None:
    """Spill known or why not; failed readings; measured against phase 1's prediction."""
    mem, reasons = figures["memory"], figures["unknown_reasons"]
    if mem["spilled"] is None:
        if not server:
            why = f"no memory probe for {server_name}"
        elif not server.get("samples"):
            why = (
                f"no memory reading of {server_name} succeeded ({server.get('failed_readings')} "
                "failed): spill unknown"
            )
        else:
            why = f"{server.get('source')} cannot tell a spill (only Ollama's /api/ps does)"
        reasons["memory.spilled"] = why
    if mem["failed_readings_rate"] is None:
        reasons["memory.failed_readings_rate"] = f"no memory probe for {server_name}"
    peak = mem["peak_bytes"]
    mem["predicted_gb"] = predicted_gb
    if predicted_gb and peak is not None:
        mem["predicted_ratio"] = peak / GB / predicted_gb
        mem["predicted_ratio_error"] = abs(mem["predicted_ratio"] - 1.0)
    else:
        mem["predicted_ratio"] = mem["predicted_ratio_error"] = None
        reasons["memory.predicted_ratio_error"] = (
            "no phase 1 prediction (harness.yaml's MODEL_VRAM_GB and KV_CACHE_PER_TOKEN_MB for "
            "this backend and model: pytest suites/context_limits --harness-write-config)"
            if not predicted_gb
            else "no memory reading"
        )


def _savings_notes(figures: dict[str, Any], m: RunMetrics, result: JobResult) -> None:
    """How the cached tokens were counted, in the savings criteria's messages; a reuse alarm
    vetoes them (the savings figure averages over the rows that lost the rubric)."""
    metrics = ("token_savings", "savings_efficiency", "uncached_tokens_per_request",
               "cached_coverage", "cached_tokens_source")  # fmt: skip
    if m.completed:
        known = sum(m.cached_sources.values())
        note = (
            f"cached tokens known for {known} of {m.completed} completed requests (coverage "
            f"{(m.cached_coverage or 0):.2f}): {known - m.cached_omitted} reported"
            + (
                f", {m.cached_omitted} left out by a server that sent the field before (counted "
                "as 0)"
                if m.cached_omitted
                else ""
            )
            + (f", {m.completed - known} not reported" if m.completed - known else "")
            + f"; sources {m.cached_sources or 'none'}"
        )
        figures["criteria_notes"] = dict.fromkeys(metrics, note)
    if result.reuse_alarms:
        first = result.reuse_alarms[0]
        veto = (
            f"{len(result.reuse_alarms)} reuse alarm(s) during the run, the first: "
            + describe_alarm(first)
        )
        figures["criteria_vetoes"] = dict.fromkeys(metrics[:3], veto)


def scaling_check(
    report_dir: Path, rps: float, servers: int, identity: Mapping[str, Any]
) -> dict[str, Any]:
    """A pool run's scaling efficiency: its throughput ÷ (servers × the throughput of the
    largest finished, passing, measured (no replay or double: `not_a_reference`) single-server
    scale report of the same profile, model, backend and strategy); `why` when there is none
    to compare with."""
    best: tuple[int, str, float] | None = None
    for path in sorted(report_dir.glob("performance_benchmarks_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        st = data.get("strategy") if isinstance(data.get("strategy"), Mapping) else {}
        one = int((st or {}).get("servers") or 1) == 1 and not data.get("endpoints")
        if not one or not_a_reference(data) or run_identity(data) != dict(identity):
            continue  # a pool, a run that may not be a reference, or another kind of run
        n = int(data.get("requests") or 0)
        if best is None or n > best[0]:
            best = (n, path.name, float(data["throughput_rps"]))
    if best is None:
        return {
            "efficiency": None,
            "servers": servers,
            "why": f"no finished, passing single-server scale report of the same profile, model, "
            f"backend and strategy in {report_dir} to compare with (run it first)",
        }
    _, name, one_rps = best
    return {
        "efficiency": rps / (servers * one_rps),
        "servers": servers,
        "throughput_rps": rps,
        "one_server_rps": one_rps,
        "one_server_report": name,
    }


def _unknown_reasons(m: RunMetrics, server: str) -> dict[str, str]:
    """Why figures are unknown, for the criteria's messages."""
    reasons: dict[str, str] = {}
    if not m.cached_coverage:
        why = f"cached prompt tokens not reported by {server}"
        if server.startswith("ollama"):
            why += f" ({CACHED_FIELD_EVIDENCE})"
        for key in ("token_savings", "savings_efficiency", "uncached_tokens_per_request"):
            reasons[key] = why
    return reasons
