"""The performance phase on real servers: the variants round by round on one server with the
roofline and the batched bound calibrated beside them (`measure`), client concurrency × slots ×
request path and the trim interval (`sweeps`), and the settings the figures pick (`conclude`).
The figures' arithmetic (ratios, bounds, calibrations, picks) is `harness.phases.performance`.

The suite hands in what it has of the session: the servers as a small protocol (`Servers`:
start one for some settings, the run's job on it from `harness.run.preflight.spec_for`, the
session's event loop, release), so tests/test_performance_rounds.py runs all of it on the
in-process double.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from harness.backends.base import Backend
from harness.baselines import DirectResult, direct_loop
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.job import open_token_counter
from harness.engine.tokens import TokenCounter
from harness.metrics import RunMetrics
from harness.phases.common import phase_job
from harness.phases.performance import (
    Curve,
    against_best_bound,
    batched_rates,
    bound_s,
    breakdown,
    calibrate_curve,
    cell_medians,
    compare_replies,
    interleave,
    median_curve,
    median_rates,
    overhead_ceiling,
    pick_settings,
    prefill_rate_at,
    ratio_spreads,
    score_agreement,
    score_mode_pick,
    spread,
)
from harness.plots import BreakdownRow, plot_breakdown, plot_throughput_over_run
from harness.records import RequestRecord
from harness.workload import PromptSpec, WorkItem, tight_grammar

__all__ = [
    "RATIOS",
    "ROUND_ORDER",
    "TOKENS_OVER_CHAT_GOAL",
    "VARIANTS",
    "Bench",
    "Servers",
    "conclude",
    "concurrency_cells",
    "direct_client",
    "measure",
    "on_path",
    "pick_concurrency",
    "scored",
    "sweeps",
]

VARIANTS = ("tokens", "chat", "text", "direct", "conversation", "decode", "logprobs")
RATIOS = {
    "tokens_over_chat": ("tokens", "chat", "throughput_rps"),
    "logprobs_over_decode": ("logprobs", "decode", "throughput_rps"),
    "logprobs_efficiency": ("logprobs", "logprobs", "efficiency"),
    "engine_over_direct": ("chat", "direct", "throughput_rps"),
    "conversation_over_stateless": ("conversation", "tokens", "throughput_rps"),
    "stateless_efficiency": ("tokens", "tokens", "efficiency"),
}
# The order of a round: each headline ratio's two sides next to each other (direct | chat |
# tokens | roofline, conversation one further on), run forwards in even rounds and backwards in
# odd ones (interleave's `alternate`). In a fixed order the engine's chat requests always
# ran two variants before the direct client's: engine ÷ direct came out 1.026, 0.953 and 0.971
# in three runs back to back, beyond the ±5% the other ratios held.
ROUND_ORDER = ("direct", "chat", "tokens", "roofline", "decode", "logprobs", "conversation", "text")
assert sorted(ROUND_ORDER) == sorted((*VARIANTS, "roofline")), "every variant, once a round"

TOKENS_OVER_CHAT_GOAL = 1.25
"""What the token path was asked to gain over the chat path: reported, not gated (the gate is the
share of this machine's measured ceiling, `tokens_over_chat_of_ceiling`)."""

T = TypeVar("T")
Direct = Callable[[Backend, Sequence[WorkItem], bool], Awaitable[DirectResult]]
"""The minimal direct client on a server (`harness.baselines.direct_loop` on its URL): the
items, and whether the server's prompt cache is on."""


async def direct_client(
    backend: Backend, items: Sequence[WorkItem], cache_prompt: bool = True
) -> DirectResult:
    return await direct_loop(backend.info.base_url, items, cache_prompt=cache_prompt)


class _OnAPath(Protocol):
    request_path: str


def on_path(backend: Backend, path: str) -> None:
    """Send a llama.cpp client's next requests on `path` (chat, text or tokens: its
    `request_path`, as `OpenAIBackend` and the embedded server's client have it)."""
    cast(_OnAPath, backend).request_path = path


class Servers(Protocol):
    """What the performance phase needs of the session that runs it: a started server for some
    settings (`parallel`, `concurrency`, `request_path`), the run's job on it
    (`harness.run.preflight.spec_for`, capped to that server), the session's event loop (the
    servers live on it) and a server stopped before the next (2 cores: an idle server still
    takes CPU)."""

    def start(self, *, parallel: int, concurrency: int, request_path: str) -> Backend: ...

    def job(self, backend: Backend) -> JobSpec: ...

    def run(self, coro: Coroutine[Any, Any, T]) -> T: ...

    def release(self, backend: Backend) -> None: ...


class Bench:
    """One server, one token counter, a pool of fresh items per (variant, round)."""

    def __init__(
        self,
        backend: Backend,
        counter: TokenCounter,
        pool: list[WorkItem],
        n: int,
        policy: TrimPolicy,
        prompt: PromptSpec,
        *,
        job: JobSpec,
        batched: Backend | None = None,
        direct: Direct = direct_client,
    ) -> None:
        self.backend, self.counter = backend, counter
        self.prompt = prompt
        self.rubric = prompt.system
        self.pool, self.n, self.policy = pool, n, policy
        self.job = job
        """The run's job on this server (spec_for); each variant sets what it measures."""
        self.direct = direct
        self.records: dict[str, list[RequestRecord]] = {v: [] for v in VARIANTS}
        self.curves: list[Curve] = []
        """The roofline's rates, calibrated once a round (with the round's variants)."""
        self.batched = batched
        """A server with several slots, for the batched bound (calibrated once a round too)."""
        self.batched_rates: list[dict[str, float]] = []
        self.chunk = 128
        """New tokens per request of the workload (from the warm-up), the batched bound's chunk."""
        self.next = 0

    def take(self, n: int | None = None) -> list[WorkItem]:
        n = self.n if n is None else n
        chunk = self.pool[self.next : self.next + n]
        self.next += n
        return chunk

    def spec(self, strategy: str = "stateless", runner: RunnerConfig | None = None) -> JobSpec:
        """A variant's job: its strategy, the bench's policy, records kept, no progress bar."""
        return phase_job(
            self.job,
            strategy=strategy,
            policy=self.policy,
            runner=runner or RunnerConfig(),
            keep_records=True,
            progress=False,
        )

    async def bounds(self, variant: str, r: int) -> dict[str, Any]:
        """A round's calibration: the single-stream roofline, or the batched bound."""
        if variant == "roofline":
            curve = await calibrate_curve(
                self.backend, self.counter, self.rubric, samples=1, label=f"round {r} calibration"
            )
            self.curves.append(curve)
            return curve.to_dict()
        assert self.batched is not None
        rates = await batched_rates(
            self.batched,
            self.counter,
            self.rubric,
            slots=self.batched.info.n_slots or 2,
            chunk=self.chunk,
            label=f"round {r} batched",
        )
        self.batched_rates.append(rates)
        return rates

    async def run(self, variant: str, r: int) -> dict[str, Any]:
        if variant in ("roofline", "batched"):
            return await self.bounds(variant, r)
        items = self.take()
        if variant in ("decode", "logprobs"):
            # The rubric's scored items as production sends them, in one score mode each.
            return await self.score(variant, scored(items, self.prompt), r)
        if variant == "direct":
            d = await self.direct(self.backend, items, True)
            return {"throughput_rps": d.throughput_rps, "elapsed_s": d.elapsed_s}
        on_path(self.backend, "tokens" if variant == "conversation" else variant)
        spec = self.spec("conversation" if variant == "conversation" else "stateless")
        res = await run_job(self.backend, items, spec, counter=self.counter)
        if r >= 0:  # the warm-up (round -1) pays the fresh server's cold rubric: not a sample
            self.records[variant] += res.records
        else:
            self.chunk = int(
                statistics.median(x.prompt_tokens - (x.cached_tokens or 0) for x in res.records[1:])
            )
        return {**_figures(res.metrics), "token_savings": res.metrics.token_savings}

    async def score(self, mode: str, items: list[WorkItem], r: int) -> dict[str, Any]:
        on_path(self.backend, "tokens")
        spec = self.spec(runner=RunnerConfig(score_mode=mode))
        res = await run_job(self.backend, items, spec, counter=self.counter)
        self.records[mode] += res.records
        m = res.metrics
        ok = [x for x in res.records if x.ok]
        return {
            **_figures(m),
            # The forward steps after the prefill: each decoded token, or each probe token.
            "steps": sum(x.probe_tokens for x in ok)
            if mode == "logprobs"
            else m.tokens["completion"],
            "read_in_logprobs": sum(1 for x in ok if (x.scoring or {}).get("mode") == "logprobs"),
        }


async def measure(
    backend: Backend,
    batched: Backend | None,
    pool: list[WorkItem],
    prompt: PromptSpec,
    rounds: int,
    n: int,
    opts: Mapping[str, Any],
    *,
    job: JobSpec,
    plots_dir: Path,
    direct: Direct = direct_client,
) -> dict[str, Any]:
    """The variants round by round on `backend` (one slot), each round's roofline (and batched
    bound on `batched`) beside them, then the replies on every path, a naive client (prompt
    cache off) and both score modes on the same rows: the performance report's figures (the
    plots' paths as written under `plots_dir`)."""
    async with open_token_counter(backend) as counter:
        per_slot = backend.info.n_ctx_per_slot or 8192
        policy = TrimPolicy(per_slot, trim_interval=50)
        bench = Bench(
            backend, counter, pool, n, policy, prompt, job=job, batched=batched, direct=direct
        )
        await bench.run("tokens", -1)  # warm-up, not counted
        # The roofline is calibrated in every round, beside the variants it bounds: a machine
        # that slows for a while slows both, and each round's efficiency uses its own rates.
        # So is the batched bound (one calibration a run moved it 18% between runs).
        order = (*ROUND_ORDER, "batched") if batched is not None else ROUND_ORDER
        by_round = await interleave(order, rounds, bench.run, alternate=True)
        checked = scored(bench.take(int(opts.get("reply_items", 8)) + 1), prompt)
        replies = await replies_on_both_paths(bench, checked)
        naive = await direct(backend, bench.take()[:3], False)
        agreement = await modes_on_the_same_rows(
            bench, scored(bench.take(int(opts.get("agreement_items", 100)) + 1), prompt)
        )
    chunk = int(
        statistics.median(r.prompt_tokens - (r.cached_tokens or 0) for r in bench.records["tokens"])
    )
    curve = median_curve(bench.curves)
    with_bounds(by_round, bench.curves, chunk)
    same = compare_replies(replies["tokens"], replies["text"])
    return {
        "replies": {
            "tokens_vs_text": same,
            "tokens_vs_chat": compare_replies(replies["tokens"], replies["chat"]),
        },
        "replies_same_reply": same["same_reply"],
        "replies_same_score": same["same_score"],
        "calibration": curve.to_dict(),
        "batched_calibration": median_rates(bench.batched_rates),
        **round_figures(bench, by_round, chunk),
        "score_agreement": agreement["agreement"],
        "score_agreement_rows": agreement["rows"],
        "score_modes": agreement,
        "workload_chunk_tokens": chunk,
        "rounds": {v: list(rows) for v, rows in by_round.items()},
        "cached_over_naive": statistics.median(r["throughput_rps"] for r in by_round["tokens"])
        / naive.throughput_rps,
        # The most the token path could gain over the chat path on this machine (the chat
        # path's overhead all gone): the 1.25x the issue asked for needs overhead >= 20% of
        # a request, measured 55 of 216 ms once and 48 of 616 ms on a slower day.
        "tokens_over_chat_ceiling": overhead_ceiling(breakdown("chat", bench.records["chat"])),
        "breakdown_ms": {
            v: vars_of(breakdown(v, bench.records[v])) for v in VARIANTS if v != "direct"
        },
        "plots": draw(bench, prefill_rate_at(curve.prefill_tps, chunk), curve, plots_dir),
    }


def _figures(m: RunMetrics) -> dict[str, Any]:
    """A round's figures that every variant reports: rate, time, requests and tokens."""
    return {
        "throughput_rps": m.throughput_rps,
        "elapsed_s": m.elapsed_s,
        "requests": m.completed,
        "uncached": m.tokens["uncached"],
        "completion": m.tokens["completion"],
    }


def with_bounds(
    by_round: Mapping[str, Sequence[Mapping[str, Any]]], curves: Sequence[Curve], chunk: float
) -> None:
    """Each measured round (`uncached` in it) gets its own round's roofline bound (`bound_s`)
    and its efficiency against it (bound ÷ elapsed)."""
    for rows in by_round.values():
        for r, row in enumerate(rows):
            if "uncached" in row:
                own = curves[r]
                tps = prefill_rate_at(own.prefill_tps, chunk)
                steps = row.get("steps", row["completion"])
                b = bound_s(tps, own.decode_tps, row["uncached"], steps)
                assert isinstance(row, dict)
                row["bound_s"], row["efficiency"] = b, b / row["elapsed_s"]


def round_figures(
    bench: Bench, by_round: Mapping[str, Sequence[Mapping[str, Any]]], chunk: float
) -> dict[str, Any]:
    """The ratios per round (median and spread), the efficiencies, and the token path and
    logprobs mode against the best bound of each round (single-stream or batched)."""
    spreads = ratio_spreads(by_round, RATIOS)
    best = against_best_bound(by_round["tokens"], bench.curves, bench.batched_rates, chunk)
    spreads["stateless_efficiency"] = spread([r["efficiency"] for r in by_round["tokens"]])
    spreads["logprobs_efficiency"] = spread([r["efficiency"] for r in by_round["logprobs"]])
    spreads["decode_efficiency"] = spread([r["efficiency"] for r in by_round["decode"]])
    best_lp = against_best_bound(by_round["logprobs"], bench.curves, bench.batched_rates, chunk)
    return {
        # The token path against the best bound of each round (single-stream or batched).
        "stateless_efficiency_batched": best["efficiency"],
        # Logprobs mode against its own bound (prefill + one step per probe token), single-stream
        # and against the best of single-stream and batched.
        "logprobs_efficiency_batched": best_lp["efficiency"],
        "batched_speedup": best["batched_speedup"],
        "ratios": {k: s.to_dict() for k, s in spreads.items()},
        **{k: s.median for k, s in spreads.items()},
    }


async def modes_on_the_same_rows(bench: Bench, items: list[WorkItem]) -> dict[str, Any]:
    """`items` decoded, then in logprobs mode, on the token path (the first of each a primer,
    not compared): the share with the same score, and the rows that differ."""
    on_path(bench.backend, "tokens")
    out: dict[str, list[RequestRecord]] = {}
    for mode in ("decode", "logprobs"):
        spec = bench.spec(runner=RunnerConfig(score_mode=mode))
        res = await run_job(bench.backend, items, spec, counter=bench.counter)
        out[mode] = sorted(res.records, key=lambda r: r.started)[1:]
    return score_agreement(out["decode"], out["logprobs"])


def scored(items: list[WorkItem], prompt: PromptSpec) -> list[WorkItem]:
    """The items as production sends them: the rubric's output schema under a tight grammar
    (and room for `{"score": 10}`, which the workload's 8 tokens do not always leave)."""
    schema = prompt.output_schema
    return [
        replace(
            it,
            output_schema=schema,
            grammar=tight_grammar(schema),
            constrain=True,
            max_tokens=max(16, it.max_tokens or 0),
        )
        for it in items
    ]


async def replies_on_both_paths(
    bench: Bench, items: list[WorkItem]
) -> dict[str, list[RequestRecord]]:
    """`items` on each request path, one at a time. The first item is a primer whose reply is
    not compared: each compared request follows the same prompt on every path, so it finds the
    same tokens cached and its prefill runs the same batches."""
    out: dict[str, list[RequestRecord]] = {}
    for path in ("tokens", "text", "chat"):
        on_path(bench.backend, path)
        res = await run_job(bench.backend, items, bench.spec(), counter=bench.counter)
        out[path] = sorted(res.records, key=lambda r: r.started)[1:]
    return out


def vars_of(row: BreakdownRow) -> dict[str, float]:
    return {
        "overhead_ms": row.overhead_ms,
        "prefill_ms": row.prefill_ms,
        "decode_ms": row.decode_ms,
    }


def draw(bench: Bench, prefill_tps: float, curve: Curve, plots_dir: Path) -> list[Path]:
    """The token path's throughput and latency over the run (against the roofline's rate), and
    where each variant's requests spent their time."""
    recs = sorted(bench.records["tokens"], key=lambda r: r.finished)
    t0 = min(r.started for r in recs)
    per_req = bound_s(
        prefill_tps,
        curve.decode_tps,
        int(statistics.fmean(r.prompt_tokens - (r.cached_tokens or 0) for r in recs)),
        int(statistics.fmean(r.completion_tokens for r in recs)),
    )
    return [
        plot_throughput_over_run(
            [r.finished - t0 for r in recs],
            [r.latency_ms for r in recs],
            plots_dir / "throughput_latency_tokens.png",
            window_requests=5,
            roofline_rps=1 / per_req if per_req else None,
            title="Token path: throughput (5-request windows) and latency",
        ),
        plot_breakdown(
            [breakdown(v, bench.records[v]) for v in VARIANTS if v != "direct"],
            plots_dir / "request_breakdown.png",
        ),
    ]


def sweeps(servers: Servers, items: list[WorkItem], opts: Mapping[str, Any]) -> dict[str, Any]:
    """Client concurrency × slots × request path, round by round, then the trim interval.

    Every server of the sweep is up at once, and each round runs every cell (a server and a
    client concurrency) once, in an order that rotates from round to round: one cell a run
    flipped the pick between runs (CONCURRENCY 4, 2, 4 in three runs). A cell's figure is its
    median over the rounds. The items are new to a server in every cell (the host prompt cache
    would serve a repeat), and the same in the same (round, concurrency) on every server."""
    rounds = int(opts.get("sweep_rounds", 3))
    overlap = overlap_sweep(servers, items, opts)
    return {
        "overlap": overlap,
        "trim_intervals": trim_interval_sweep(servers, items, opts),
        "sweep_rounds": rounds,
    }


def overlap_sweep(
    servers: Servers, items: list[WorkItem], opts: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Each cell (slots, request path, client concurrency): its median req/s over the rounds."""
    per = int(opts.get("sweep_requests", 8))
    rounds = int(opts.get("sweep_rounds", 3))
    slot_counts = [int(s) for s in opts.get("slots", [1, 2])]
    wanted = [int(c) for c in opts.get("concurrency", [1, 2, 4])]
    concs = sorted({*slot_counts, *wanted})
    up: dict[tuple[int, str], Backend] = {}
    for slots in slot_counts:
        for path in ("chat", "tokens"):
            up[(slots, path)] = backend = servers.start(
                parallel=slots, concurrency=slots, request_path=path
            )
            # Every slot prefills the rubric once before any cell is timed (else the first cell
            # pays a cold ~4,000-token prefill and always loses).
            servers.run(run_job(backend, items[:slots], _sweep_job(servers, backend, slots)))
    cells = {
        f"{slots}/{path}/{conc}": (slots, path, conc)
        for (slots, path) in up
        for conc in sorted({slots, *wanted})
    }
    base = max(slot_counts)

    async def cell(name: str, r: int) -> dict[str, Any]:
        slots, path, conc = cells[name]
        backend = up[(slots, path)]
        k = base + (r * len(concs) + concs.index(conc)) * per
        spec = _sweep_job(servers, backend, conc)
        m = (await run_job(backend, items[k : k + per], spec)).metrics
        return {"throughput_rps": m.throughput_rps, "errors": m.errors}

    medians = cell_medians(servers.run(interleave(list(cells), rounds, cell, rotate=True)))
    overlap = [
        {
            "slots": slots,
            "request_path": path,
            "concurrency": conc,
            # What the server can hold at once from this client (slots + 1 on llama.cpp):
            # concurrency beyond it waits in the client's pool.
            "connections": up[(slots, path)].info.extra.get("connections"),
            **medians[name],
        }
        for name, (slots, path, conc) in cells.items()
    ]
    for backend in up.values():
        servers.release(backend)
    return overlap


async def concurrency_cells(
    backend: Backend, items: Sequence[WorkItem], job: JobSpec, opts: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Requests in flight on a server the harness does not start (Ollama: its slots are
    OLLAMA_NUM_PARALLEL, set where Ollama starts, and no API shows them), the one setting a
    client has: each of `concurrency` runs once a round on items new to the server (a repeat
    would be served from its cache), in an order that rotates from round to round; a cell's
    figure is its median req/s over the rounds. One request first fills the prefix cache with
    the rubric (else the first cell pays a cold prefill and always loses). Needs
    `1 + sweep_rounds × len(concurrency) × sweep_requests` items."""
    per, rounds = int(opts.get("sweep_requests", 8)), int(opts.get("sweep_rounds", 3))
    concs = sorted({int(c) for c in opts.get("concurrency", [1, 2, 4])})
    need = 1 + rounds * len(concs) * per
    if len(items) < need:
        raise ValueError(f"the concurrency sweep needs {need} items, got {len(items)}")

    def spec(conc: int) -> JobSpec:
        return phase_job(
            job,
            strategy="stateless",
            runner=RunnerConfig(concurrency=conc),
            keep_records=False,
            progress=False,
        )

    await run_job(backend, items[:1], spec(1))

    async def cell(name: str, r: int) -> dict[str, Any]:
        conc = int(name)
        k = 1 + (r * len(concs) + concs.index(conc)) * per
        m = (await run_job(backend, items[k : k + per], spec(conc))).metrics
        return {"throughput_rps": m.throughput_rps, "errors": m.errors}

    medians = cell_medians(await interleave([str(c) for c in concs], rounds, cell, rotate=True))
    return [{"concurrency": c, **medians[str(c)]} for c in concs]


def pick_concurrency(cells: Sequence[Mapping[str, Any]], tolerance: float = 0.03) -> int:
    """The concurrency the cells pick, as `pick_settings` picks a sweep's: the most requests per
    second without errors, and of the cells within `tolerance` of it the lowest (cells that tie
    within the noise must not flip the pick from run to run)."""
    clean = [c for c in cells if not c.get("errors")] or list(cells)
    top = max(float(c.get("throughput_rps") or 0.0) for c in clean)
    near = [c for c in clean if float(c.get("throughput_rps") or 0.0) >= top * (1 - tolerance)]
    return min(int(c["concurrency"]) for c in near)


def _sweep_job(servers: Servers, backend: Backend, concurrency: int) -> JobSpec:
    """A sweep cell's job: `concurrency` requests in flight, the server's whole context."""
    return phase_job(
        servers.job(backend),
        strategy="stateless",
        runner=RunnerConfig(concurrency=concurrency),
        policy=TrimPolicy(backend.info.n_ctx_per_slot or 8192),
        keep_records=False,
        progress=False,
    )


def trim_interval_sweep(
    servers: Servers, items: list[WorkItem], opts: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The conversation strategy at each trim interval on one slot (2 intervals of items)."""
    intervals = []
    backend = servers.start(parallel=1, concurrency=1, request_path="tokens")
    for interval in [int(i) for i in opts.get("trim_intervals", [10, 25, 50])]:
        spec = phase_job(
            servers.job(backend),
            strategy="conversation",
            runner=RunnerConfig(),
            policy=TrimPolicy(backend.info.n_ctx_per_slot or 8192, trim_interval=interval),
            keep_records=False,
            progress=False,
        )
        m = servers.run(run_job(backend, items[: 2 * interval], spec)).metrics
        intervals.append(
            {
                "interval": interval,
                "throughput_rps": m.throughput_rps,
                "token_savings": m.token_savings,
                "uncached_tokens_per_request": m.uncached_tokens_per_request,
            }
        )
    servers.release(backend)
    return intervals


def conclude(figures: dict[str, Any], *, max_slots: int | None) -> tuple[str, str]:
    """What the measurements pick, added to `figures`: the settings (the request path from the
    interleaved rounds, slots and concurrency from the sweep, the trim interval, the strategy
    that computes fewer prompt tokens, the score mode), the token path's share of its measured
    ceiling and the goal. Returns the score mode and why."""
    figures["max_slots_within_budget"] = max_slots
    # The request path from the interleaved rounds (both paths on one server, every round), not
    # from the sweep's cells (3 rounds of 8 requests); the sweep picks slots and concurrency.
    path = "tokens" if figures["tokens_over_chat"] >= 1.0 else "chat"
    figures["recommended"] = pick_settings(
        figures["overlap"], figures["trim_intervals"], max_slots=max_slots, request_path=path
    )
    # The strategy that makes the server compute fewer prompt tokens (not the noisier req/s).
    unc = {
        v: statistics.median(r["uncached"] / r["requests"] for r in figures["rounds"][v])
        for v in ("tokens", "conversation")
    }
    figures["uncached_tokens_per_request"] = {
        "stateless": unc["tokens"],
        "conversation": unc["conversation"],
    }
    figures["recommended"]["STRATEGY"] = (
        "conversation" if unc["conversation"] < unc["tokens"] else "stateless"
    )
    # The gate: the share of the measured ceiling the token path reached (1.25x, the goal, is
    # out of reach where the chat path's overhead is small: 1.086 here); the goal is reported.
    ceiling = figures["tokens_over_chat_ceiling"]
    figures["tokens_over_chat_of_ceiling"] = (
        figures["tokens_over_chat"] / ceiling if ceiling else None
    )
    figures["tokens_over_chat_goal"] = TOKENS_OVER_CHAT_GOAL
    mode, why = score_mode_pick(figures["score_agreement"], figures["logprobs_over_decode"])
    figures["recommended"]["SCORE_MODE"] = mode
    figures["score_mode_reason"] = why
    return mode, why
