"""Before any request, on a started server: the engine's job for a run's settings, capped to
the server's context once (`spec_for`; `fitted` is the one call of `RunConfig.capped`), the
prompts' check that `harness run` and `harness api` share (`check_prompts`: their lengths
against the context, the reuse warning), and `harness run`'s preflight (`preflight`: the
banner, every setting with its source; that check; the job's fingerprint written).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.backends.base import Backend
from harness.engine import JobSpec, RunnerConfig, TokenCounter
from harness.engine.lengths import PromptLengths, check_fits, measure_lengths
from harness.engine.reusewatch import ReuseWatchConfig
from harness.errors import ConfigError
from harness.models.registry import resolve_model
from harness.reportfiles import find_report
from harness.run.job import Job, write_job
from harness.run.rows import write_rows
from harness.run.settings import RunConfig
from harness.scoremode import choose_score_mode
from harness.workload import WorkItem

__all__ = [
    "REUSE_REPORT",
    "PromptCheck",
    "banner",
    "check_prompts",
    "fitted",
    "job_spec",
    "preflight",
    "reuse_warning",
    "spec_for",
]


def job_spec(
    cfg: RunConfig,
    *,
    results: Path | None,
    desc: str,
    progress: bool = True,
    retry_failed: bool = False,
    endpoints: int = 1,
    stop_on_cache_miss: bool = False,
) -> JobSpec:
    """The engine's job for a resolved configuration (already capped to the server's
    context): `harness run` and `harness api` run the same. Over several servers (a pool)
    the concurrency is per server: `endpoints` × it requests in flight. Both watch prefix
    reuse; `stop_on_cache_miss` stops at the first alarm."""
    return JobSpec(
        strategy=cfg.strategy.value,
        policy=cfg.policy,
        runner=RunnerConfig(
            concurrency=cfg.concurrency.value * endpoints, score_mode=cfg.score_mode.value
        ),
        results_path=results,
        retry_failed=retry_failed,
        progress=progress,
        desc=desc,
        reuse=ReuseWatchConfig(stop=stop_on_cache_miss),
    )


def fitted(cfg: RunConfig, server: Backend) -> RunConfig:
    """`cfg` with its trim policy within the started server's context of one request (the
    one call of `RunConfig.capped`): what the run's job and its checks use."""
    return cfg.capped(server.info.n_ctx_per_slot)


def spec_for(
    cfg: RunConfig,
    server: Backend,
    *,
    results: Path | None,
    desc: str,
    progress: bool = True,
    retry_failed: bool = False,
    stop_on_cache_miss: bool = False,
    score_mode: str | None = None,
) -> JobSpec:
    """The engine's job for a run's settings on a started server: capped to its context
    (`fitted`), its concurrency per server over a pool (`RunConfig.concurrency` × the
    servers), `score_mode` the one the run chose (`choose_score_mode`; None: the setting's).
    `harness run` (both executors), `harness api` and the suites' production-shaped runs build
    their job here."""
    spec = job_spec(
        fitted(cfg, server),
        results=results,
        desc=desc,
        progress=progress,
        retry_failed=retry_failed,
        endpoints=len(server.info.extra.get("endpoints") or [None]),
        stop_on_cache_miss=stop_on_cache_miss,
    )
    if score_mode is not None:
        spec.runner = replace(spec.runner, score_mode=score_mode)
    return spec


REUSE_REPORT = Path("reports") / "prefix_reuse_results.json"
"""Phase 1's candidate-length sweep, read (when present) to warn about long candidates."""


def banner(job: Job, server: Backend, lengths: PromptLengths | None = None) -> list[str]:
    """What `harness run` is about to use, each value with where it came from."""
    info, cfg, data = server.info, job.config, job.data
    note = ""
    if info.backend == "embedded":
        with contextlib.suppress(ConfigError):
            note = resolve_model(cfg.model.value).note
    lines = [
        f"backend: {info.backend} ({cfg.backend.source}) at {info.base_url}, {info.server}",
        f"model: {info.model} ({cfg.model.source})" + (f" — {note}" if note else ""),
        f"prompt: {data.prompt}, sha256 {data.prompt_sha256[:12]}",
        f"input: {data.path} ({data.rows} {'rows' if data.kind == 'csv' else 'lines'}), "
        f"sha256 {data.input_sha256[:12]}",
        *([job.validation.line] if job.validation is not None else []),
        f"context: {info.n_ctx_per_slot or cfg.n_ctx.value} tokens per request ("
        + str(info.extra.get("context_source") or f"n_ctx {cfg.n_ctx.source}")
        + ")",
        f"strategy: {cfg.strategy.value} ({cfg.strategy.source}); trim at "
        f"{cfg.trim_threshold.value} tokens ({cfg.trim_threshold.source}), every "
        f"{cfg.trim_interval.value or 'unlimited'} requests ({cfg.trim_interval.source})",
        f"concurrency: {cfg.concurrency.value} ({cfg.concurrency.source})"
        + (" per server" if job.options.endpoints > 1 else "")
        + f"; server slots: {info.n_slots or cfg.parallel.value} ({cfg.parallel.source}"
        + (", all servers together)" if job.options.endpoints > 1 else ")"),
        f"request path: {info.extra.get('request_path', 'native')} ({cfg.request_path.source})",
        "max tokens per reply: "
        + (
            f"{job.options.max_tokens} (command line)"
            if job.options.max_tokens
            else f"{data.items[0].max_tokens if data.items else '-'} "
            "(computed from the output schema)"
            if data.kind == "csv"
            else "each batch line's own"
        ),
    ]
    if info.backend == "embedded":
        lines.append(
            f"server flags: {cfg.server_flags.value} ({cfg.server_flags.source}): "
            + " ".join(info.extra.get("llama_server_args", []))
        )
    found = job.options.config.exists()
    lines.append(
        f"config: {job.options.config} profile {job.options.config_profile} "
        + ("(read)" if found else "(not found: measured values not used)")
    )
    lines += [f"not applied: {why}" for why in cfg.ignored]
    lines += job.notes
    options = job.options
    if options.endpoints > 1:
        names = info.extra.get("endpoints") or options.base_urls
        how = "--servers" if options.backend == "embedded" else "--base-url"
        lines.append(
            f"servers: {options.endpoints} ({how}, command line): {', '.join(map(str, names))}; "
            "each row goes to the next free worker, each worker stays on one server"
        )
    if options.backend == "embedded":
        threads, source = options.pool_threads()
        lines.append(f"threads per server: {threads or 'every core'} ({source})")
    if lengths is not None:
        lines.append(lengths.describe())
    return lines


def reuse_warning(lengths: PromptLengths, info: Any, report: Path) -> str | None:
    """A warning when the job's p99 candidate is as long as those at which phase 1's sweep saw
    the server stop reusing the rubric (None when no sweep report of this backend and model
    exists, or reuse held)."""
    found = find_report(report.parent, report.name, model=info.model)
    if found is None:
        return None
    report, data = found
    raw = data.get("backend")
    measured: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if (measured.get("name"), measured.get("model")) != (info.backend, info.model):
        return None  # another server's sweep says nothing about this one
    path = data.get("production_path")
    falls = (data.get("reuse_falls_at_tokens") or {}).get(path)
    if not isinstance(falls, int | float) or lengths.p99 < falls:
        return None
    return (
        f"the p99 candidate ({lengths.p99} tokens after the rubric) is as long as those at "
        f"which {report} saw the server stop reusing the whole rubric (from ~{falls} tokens, "
        f"{path} path): expect less prefix-cache saving on long rows; a larger num_batch "
        "(Ollama's batch size, llama-server's -ub) keeps more sliding-window cells"
    )


@dataclass(frozen=True)
class PromptCheck:
    """What a job's prompts say before it runs (`check_prompts`)."""

    lengths: PromptLengths
    """The prompts' tokens: the rubric, the candidates' p50 and p99, the longest."""
    refused: ConfigError | None
    """Why the job cannot run: its typical prompt and reply do not fit one request's context
    (most rows would fail); None when they do."""
    warnings: tuple[str, ...]
    """Rows past the context (recorded as errors, never sent); candidates as long as those at
    which phase 1 saw the server stop reusing the rubric."""


def context_source(cfg: RunConfig, server: Backend) -> str:
    """Where one request's context comes from: the server's own word, else the setting's."""
    return str(
        server.info.extra.get("context_source")
        or f"MAX_CONTEXT_TOKENS, {cfg.max_context_tokens.source}"
    )


async def check_prompts(
    cfg: RunConfig,
    server: Backend,
    counter: TokenCounter,
    items: Sequence[WorkItem],
    *,
    reuse_report: Path = REUSE_REPORT,
) -> PromptCheck:
    """The prompts' check `harness run` (`preflight`) and `harness api` (before each batch)
    share, on a started server: the lengths measured (`measure_lengths`), checked against the
    context of `cfg` capped to the server (`check_fits`), and the reuse warning
    (`reuse_warning`, from `reuse_report`). A job that cannot fit is returned `refused`, not
    raised: each caller says it its own way (`harness run` after its banner, the API as the
    batch's error)."""
    cfg = fitted(cfg, server)
    lengths = await measure_lengths(counter, items)
    refused: ConfigError | None = None
    too_long: str | None = None
    try:
        too_long = check_fits(
            lengths, cfg.max_context_tokens.value, context_source=context_source(cfg, server)
        )
    except ConfigError as exc:
        refused = exc
    reuse = reuse_warning(lengths, server.info, reuse_report)
    return PromptCheck(lengths, refused, tuple(w for w in (too_long, reuse) if w))


async def preflight(job: Job, server: Backend, counter: TokenCounter) -> JobSpec:
    """On a started server, before any request: print the banner (every setting and its
    source, the prompt's lengths), warn about rows too long for the context, write the job's
    fingerprint; returns the engine's job. Both executors run it."""
    options, data = job.options, job.data
    info = server.info
    job.server = f"{info.backend} {info.model} at {info.base_url} ({info.server})"
    cfg = fitted(job.config, server)
    checked = await check_prompts(job.config, server, counter, data.items)
    mode, mode_line = await choose_score_mode(
        cfg,
        server,
        counter,
        data.items[0].output_schema if data.items else None,
        job.config.measured,
    )
    for line in [*banner(job, server, checked.lengths), mode_line]:
        print(f"harness run: {line}", file=sys.stderr, flush=True)
    if checked.refused is not None:
        raise checked.refused
    for warning in checked.warnings:
        print(f"harness run: warning: {warning}", file=sys.stderr, flush=True)
    spec = spec_for(
        job.config,
        server,
        results=job.results,
        desc=f"run {data.path.name}",
        progress=options.progress,
        retry_failed=options.retry_failed,
        stop_on_cache_miss=options.stop_on_cache_miss,
        score_mode=mode,
    )
    write_job(job.results, job.job)
    if job.rows is not None:
        write_rows(job.results, job.rows.rows)
    job.backend = server
    job.started_unix = time.time()
    job.started = time.perf_counter()
    return spec
