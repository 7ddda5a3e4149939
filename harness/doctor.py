"""`harness doctor`: check a setup before a long run, and say what to fix.

Each check prints one line, `ok` or `FAIL` (or `note`), with what was found and, on a failure,
what to do:

- the server answers at its URL (and what it is: llama.cpp build, Ollama version);
- it has the model;
- one request's context holds the rubric plus the longest candidate and the reply, with the
  trim policy's 20% margin (Ollama's default context, 4,096 tokens under 24 GiB of VRAM, barely
  holds a ~4,000-token rubric);
- the server reports cached prompt tokens (savings are measured, not guessed);
- an NVIDIA GPU is visible to this machine (NVML), when the server runs here;
- the results folder has room for the results file (~3 KB a row).

Exit 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.backends.base import Backend, ChatRequest
from harness.backends.ollama import CACHED_FIELD_EVIDENCE
from harness.batchfiles import load_input, output_paths
from harness.engine.job import open_token_counter
from harness.engine.lengths import measure_lengths
from harness.engine.strategies import SAFE_FRACTION
from harness.errors import HarnessError
from harness.memory import NvmlProbe, NvmlUnavailable, is_loopback_url
from harness.run.factory import open_backend
from harness.run.options import BatchOptions, batch_config
from harness.run.preflight import fitted
from harness.run.settings import RunConfig

__all__ = ["Check", "doctor"]

RESULT_BYTES_PER_ROW = 3000
"""A results line with its reply body and measurements, roughly (measured: 2-3 KB)."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str
    """`ok`, `FAIL` or `note`."""
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


async def _server_checks(options: BatchOptions, backend: Backend, config: RunConfig) -> list[Check]:
    out: list[Check] = []
    data = load_input(options)
    info = backend.info
    out.append(Check("server", "ok", f"{info.backend} at {info.base_url}: {info.server}"))
    out.append(Check("model", "ok", f"{info.model} is served"))
    cfg = fitted(config, backend)
    n_ctx = info.n_ctx_per_slot or cfg.n_ctx.value
    source = str(info.extra.get("context_source") or f"n_ctx, {cfg.n_ctx.source}")
    async with open_token_counter(backend) as counter:
        lengths = await measure_lengths(counter, data.items)
        probe = list(data.items[0].messages)
        ids = await counter.count(probe)
        # Twice: the second finds the prompt cached (a cold first one may report nothing,
        # and Ollama leaves a zero count out of its reply).
        for _ in range(2):
            reply = await backend.chat(
                ChatRequest(probe, max_tokens=1, temperature=0.0, prompt_ids=ids)
            )
    needed, margin = lengths.needed, int(n_ctx * SAFE_FRACTION)
    fix = (
        f"set num_ctx >= {int(needed / SAFE_FRACTION) + 1}: OLLAMA_CONTEXT_LENGTH (restart "
        "Ollama) or --ctx"
        if info.backend == "ollama"
        else f"give --ctx >= {int(needed / SAFE_FRACTION) + 1}"
    )
    shown = f"{lengths.describe()}; one request's context is {n_ctx} ({source})"
    if needed > n_ctx:
        out.append(Check("context", "FAIL", f"{shown}: it does not fit; {fix}"))
    elif needed > margin:
        out.append(
            Check(
                "context",
                "FAIL",
                f"{shown}: less than a {100 - int(SAFE_FRACTION * 100)}% margin is left; {fix}",
            )
        )
    else:
        out.append(Check("context", "ok", shown))
    cached = reply.usage.cached_source
    out.append(
        Check(
            "cached tokens",
            "ok" if cached in ("server", "llama.cpp timings") else "FAIL",
            f"the server reports them ({cached}"
            + (
                f", {info.server}: prompt_eval_cached_count in its reply)"
                if info.backend == "ollama"
                else ")"
            )
            if cached in ("server", "llama.cpp timings")
            else f"not reported ({cached}): savings cannot be measured on this server"
            + (f" ({info.server}). {CACHED_FIELD_EVIDENCE}" if info.backend == "ollama" else ""),
        )
    )
    return out


def _gpu_check(backend_name: str, base_url: str) -> Check:
    if backend_name == "embedded":
        return Check("gpu", "note", "the embedded server runs on the CPU (no GPU is used)")
    if not is_loopback_url(base_url):
        return Check("gpu", "note", f"the server at {base_url} is on another machine: its GPU is "
                     "not read from here (run the suites there for NVML figures)")  # fmt: skip
    try:
        probe = NvmlProbe(0)
    except NvmlUnavailable as exc:
        why = "the server runs on the CPU, or the driver is missing (GPU runs need it)"
        return Check("gpu", "note", f"no NVIDIA GPU visible here ({exc}): {why}")
    s = probe.sample()
    total = s.total_bytes or 0
    return Check("gpu", "ok", f"{probe.device_name()}: {s.used_bytes / 1e9:.1f} of "
                 f"{total / 1e9:.1f} GB used (NVML)")  # fmt: skip


def _disk_check(options: BatchOptions, rows: int) -> Check:
    _, results = output_paths(options.input, options.output)
    folder = results.parent if results.parent.exists() else Path(".")
    free = shutil.disk_usage(folder).free
    need = rows * RESULT_BYTES_PER_ROW
    status = "ok" if free > 2 * need else "FAIL"
    return Check("disk", status, f"{free / 1e9:.1f} GB free in {folder}; the results of {rows} "
                 f"rows take ~{need / 1e6:.0f} MB" + ("" if status == "ok" else
                 ": free some space or choose another --output"))  # fmt: skip


def doctor(options: BatchOptions) -> list[Check]:
    """Run every check (see the module docstring)."""
    checks: list[Check] = []
    data = load_input(options)
    config = batch_config(options)  # harness.yaml read once
    backend = open_backend(config)

    async def go() -> list[Check]:
        async with backend:
            return await _server_checks(options, backend, config)

    try:
        checks += asyncio.run(go())
    except HarnessError as exc:
        checks.append(Check("server", "FAIL", str(exc)))
    url = getattr(backend, "base_url", "") or ""
    checks.append(_gpu_check(options.backend, url))
    checks.append(_disk_check(options, len(data.items)))
    return checks
