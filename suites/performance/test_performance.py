"""Performance: the request paths side by side, the real limit, and the settings they pick.

    pytest suites/performance -k test_performance   # gemma3-270m on the CPU, ~11 min on 2 cores

On one server, round by round (harness.phases.performance): the engine on the token path, the
chat path and the text path (Ollama's form), a minimal direct client (chat bodies), the
conversation strategy, and a naive client with the prefix cache off. Every ratio is computed per
round and reported as median and spread. Then the same items, scored as production scores them
(the rubric's output schema under a grammar), on the token, text and chat paths: on the token
path the replies must be those of the text path (Ollama's form, the same `/completion`), the same
text and scores; the chat path's are reported beside them (llama-server runs another chat parser
there, `peg-native`, and near-ties can fall the other way). The limit: prefill by chunk size
after the rubric and decode (llama-bench's pp/tg at depth), calibrated in every round beside the
variants, single-stream and batched across slots; efficiency against the single-stream bound
and against the best of the two (per rate, whichever is faster on this machine). Then client
concurrency × slots × path, and the trim interval, measured; the best go to harness.yaml with
`--harness-write-config` (after the gate).

The score modes: in every round the rubric's scored items on the token path, decoded (the reply
written under the tight grammar) and in `logprobs` mode (the reply's JSON sent written up to the
score, the score read from the top log-probabilities: `harness.scoring`), side by side; each
against its own bound (prefill of the uncached tokens plus the forward steps the mode needs: the
decoded tokens, or one per probe token, 1 for 1..10 on Gemma). Then the same rows in both modes:
SCORE_MODE goes to harness.yaml as `logprobs` only where its scores equal the decoded ones on at
least 98% of them and it is faster.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import pytest

from harness.backends.base import Backend
from harness.baselines import direct_loop
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.job import open_token_counter
from harness.engine.tokens import TokenCounter
from harness.phases import items_for, prompt_for
from harness.phases import performance as perf
from harness.phases.common import phase1_budget
from harness.plots import BreakdownRow, plot_breakdown, plot_throughput_over_run
from harness.pytest import HarnessSession
from harness.records import RequestRecord
from harness.workload import PromptSpec, WorkItem, tight_grammar

SCENARIO = "performance.yaml"
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
# odd ones (perf.interleave's `alternate`). In a fixed order the engine's chat requests always
# ran two variants before the direct client's: engine ÷ direct came out 1.026, 0.953 and 0.971
# in three runs back to back, beyond the ±5% the other ratios held.
ROUND_ORDER = ("direct", "chat", "tokens", "roofline", "decode", "logprobs", "conversation", "text")
assert sorted(ROUND_ORDER) == sorted((*VARIANTS, "roofline")), "every variant, once a round"
pytestmark = [pytest.mark.performance, pytest.mark.integration, pytest.mark.timeout(7200)]


class Bench:
    """One server, one token counter, a pool of fresh items per (variant, round)."""

    def __init__(
        self,
        harness: HarnessSession,
        backend: Backend,
        counter: TokenCounter,
        pool: list[WorkItem],
        n: int,
        policy: TrimPolicy,
        prompt: PromptSpec,
        batched: Backend | None = None,
    ) -> None:
        self.harness, self.backend, self.counter = harness, backend, counter
        self.prompt = prompt
        self.rubric = prompt.system
        self.pool, self.n, self.policy = pool, n, policy
        self.records: dict[str, list[RequestRecord]] = {v: [] for v in VARIANTS}
        self.curves: list[perf.Curve] = []
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

    async def run(self, variant: str, r: int) -> dict[str, Any]:
        if variant == "roofline":
            curve = await perf.calibrate_curve(
                self.backend, self.counter, self.rubric, samples=1, label=f"round {r} calibration"
            )
            self.curves.append(curve)
            return curve.to_dict()
        if variant == "batched":
            assert self.batched is not None
            rates = await perf.batched_rates(
                self.batched,
                self.counter,
                self.rubric,
                slots=self.batched.info.n_slots or 2,
                chunk=self.chunk,
                label=f"round {r} batched",
            )
            self.batched_rates.append(rates)
            return rates
        items = self.take()
        if variant in ("decode", "logprobs"):
            # The rubric's scored items as production sends them, in one score mode each.
            return await self.score(variant, scored(items, self.prompt), r)
        if variant == "direct":
            d = await direct_loop(self.backend.info.base_url, items)
            return {"throughput_rps": d.throughput_rps, "elapsed_s": d.elapsed_s}
        self.backend.request_path = "tokens" if variant == "conversation" else variant
        spec = JobSpec(
            strategy="conversation" if variant == "conversation" else "stateless",
            policy=self.policy,
            keep_records=True,
            progress=False,
        )
        res = await run_job(self.backend, items, spec, counter=self.counter)
        if r >= 0:  # the warm-up (round -1) pays the fresh server's cold rubric: not a sample
            self.records[variant] += res.records
        else:
            self.chunk = int(
                statistics.median(x.prompt_tokens - (x.cached_tokens or 0) for x in res.records[1:])
            )
        m = res.metrics
        return {
            "throughput_rps": m.throughput_rps,
            "elapsed_s": m.elapsed_s,
            "requests": m.completed,
            "uncached": m.tokens["uncached"],
            "completion": m.tokens["completion"],
            "token_savings": m.token_savings,
        }

    async def score(self, mode: str, items: list[WorkItem], r: int) -> dict[str, Any]:
        self.backend.request_path = "tokens"
        spec = JobSpec(
            policy=self.policy,
            runner=RunnerConfig(score_mode=mode),
            keep_records=True,
            progress=False,
        )
        res = await run_job(self.backend, items, spec, counter=self.counter)
        self.records[mode] += res.records
        m = res.metrics
        ok = [x for x in res.records if x.ok]
        return {
            "throughput_rps": m.throughput_rps,
            "elapsed_s": m.elapsed_s,
            "requests": m.completed,
            "uncached": m.tokens["uncached"],
            "completion": m.tokens["completion"],
            # The forward steps after the prefill: each decoded token, or each probe token.
            "steps": sum(x.probe_tokens for x in ok)
            if mode == "logprobs"
            else m.tokens["completion"],
            "read_in_logprobs": sum(1 for x in ok if (x.scoring or {}).get("mode") == "logprobs"),
        }


def test_performance(harness: HarnessSession) -> None:
    scenario = harness.scenario(SCENARIO)
    opts: dict[str, Any] = scenario.profile(harness.profile).options
    cfg = harness.run_config(scenario, parallel=1, concurrency=1, request_path="tokens")
    if cfg.backend.value != "embedded":
        pytest.skip(
            "the performance suite compares llama.cpp request paths and slots on a server it "
            "starts; against Ollama, set OLLAMA_NUM_PARALLEL=N (restart Ollama) and run the "
            "scale phases with --harness-... concurrency N to compare"
        )
    backend = harness.backend(cfg)
    # The batched bound's server (the sweep's most slots, token path), calibrated in every round
    # beside the single-stream roofline; the sweep reuses it.
    top = max(int(s) for s in opts.get("slots", [1, 2]))
    batched = (
        harness.backend(
            harness.run_config(scenario, parallel=top, concurrency=top, request_path="tokens")
        )
        if top > 1
        else None
    )
    rounds, n = int(opts.get("rounds", 5)), int(opts.get("requests", 10))
    agree_n = int(opts.get("agreement_items", 100))
    pool = items_for(scenario, harness.profile, n * rounds * len(VARIANTS) + 300 + agree_n)
    prompt = prompt_for(scenario, harness.profile)
    figures = harness.run(measure(harness, backend, batched, pool, prompt, rounds, n, opts))
    harness.release(backend)
    figures.update(sweeps(harness, scenario, pool[-250:], opts))
    figures["max_slots_within_budget"] = max_slots(harness, scenario)
    # The request path from the interleaved rounds (both paths on one server, every round), not
    # from the sweep's cells (3 rounds of 8 requests); the sweep picks slots and concurrency.
    path = "tokens" if figures["tokens_over_chat"] >= 1.0 else "chat"
    figures["recommended"] = perf.pick_settings(
        figures["overlap"],
        figures["trim_intervals"],
        max_slots=figures["max_slots_within_budget"],
        request_path=path,
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
    mode, why = perf.score_mode_pick(figures["score_agreement"], figures["logprobs_over_decode"])
    figures["recommended"]["SCORE_MODE"] = mode
    figures["score_mode_reason"] = why
    report = harness.report("performance_comparison.json", scenario, figures, backend=backend)
    harness.say(
        "performance: "
        + ", ".join(f"{k} {figures[k]:.3f}" for k in RATIOS)
        + "; tokens over chat with all the chat path's overhead gone, its compute unchanged: "
        + f"{figures['tokens_over_chat_ceiling'] or 0:.3f}"
        + f"; score modes: logprobs ÷ decode {figures['logprobs_over_decode']:.3f}, the same "
        + f"score on {figures['score_agreement'] or 0:.1%} of {figures['score_agreement_rows']} "
        + f"rows: SCORE_MODE {mode} ({why})"
    )
    harness.gate(report)
    harness.recommend(figures["recommended"], report, backend)


async def measure(
    harness: HarnessSession,
    backend: Backend,
    batched: Backend | None,
    pool: list[WorkItem],
    prompt: PromptSpec,
    rounds: int,
    n: int,
    opts: dict[str, Any],
) -> dict[str, Any]:
    async with open_token_counter(backend) as counter:
        per_slot = backend.info.n_ctx_per_slot or 8192
        policy = TrimPolicy(per_slot, trim_interval=50)
        bench = Bench(harness, backend, counter, pool, n, policy, prompt, batched)
        await bench.run("tokens", -1)  # warm-up, not counted
        # The roofline is calibrated in every round, beside the variants it bounds: a machine
        # that slows for a while slows both, and each round's efficiency uses its own rates.
        # So is the batched bound (one calibration a run moved it 18% between runs).
        order = (*ROUND_ORDER, "batched") if batched is not None else ROUND_ORDER
        by_round = await perf.interleave(order, rounds, bench.run, alternate=True)
        checked = scored(bench.take(int(opts.get("reply_items", 8)) + 1), prompt)
        replies = await replies_on_both_paths(backend, counter, checked, policy)
        naive = await direct_loop(backend.info.base_url, bench.take()[:3], cache_prompt=False)
        agreement = await modes_on_the_same_rows(
            backend, counter, scored(bench.take(int(opts.get("agreement_items", 100)) + 1), prompt),
            policy,
        )  # fmt: skip
    chunk = int(
        statistics.median(r.prompt_tokens - (r.cached_tokens or 0) for r in bench.records["tokens"])
    )
    curve = perf.median_curve(bench.curves)
    workload_tps = perf.prefill_rate_at(curve.prefill_tps, chunk)
    for rows in by_round.values():
        for r, row in enumerate(rows):
            if "uncached" in row:
                own = bench.curves[r]
                tps = perf.prefill_rate_at(own.prefill_tps, chunk)
                steps = row.get("steps", row["completion"])
                b = perf.bound_s(tps, own.decode_tps, row["uncached"], steps)
                row["bound_s"], row["efficiency"] = b, b / row["elapsed_s"]
    spreads = perf.ratio_spreads(by_round, RATIOS)
    best = perf.against_best_bound(by_round["tokens"], bench.curves, bench.batched_rates, chunk)
    spreads["stateless_efficiency"] = perf.spread([r["efficiency"] for r in by_round["tokens"]])
    spreads["logprobs_efficiency"] = perf.spread([r["efficiency"] for r in by_round["logprobs"]])
    spreads["decode_efficiency"] = perf.spread([r["efficiency"] for r in by_round["decode"]])
    best_lp = perf.against_best_bound(
        by_round["logprobs"], bench.curves, bench.batched_rates, chunk
    )
    plots = draw(harness, bench, workload_tps, curve)
    same = perf.compare_replies(replies["tokens"], replies["text"])
    return {
        "replies": {
            "tokens_vs_text": same,
            "tokens_vs_chat": perf.compare_replies(replies["tokens"], replies["chat"]),
        },
        "replies_same_reply": same["same_reply"],
        "replies_same_score": same["same_score"],
        "calibration": curve.to_dict(),
        "batched_calibration": perf.median_rates(bench.batched_rates),
        # The token path against the best bound of each round (single-stream or batched).
        "stateless_efficiency_batched": best["efficiency"],
        # Logprobs mode against its own bound (prefill + one step per probe token), single-stream
        # and against the best of single-stream and batched.
        "logprobs_efficiency_batched": best_lp["efficiency"],
        "score_agreement": agreement["agreement"],
        "score_agreement_rows": agreement["rows"],
        "score_modes": agreement,
        "batched_speedup": best["batched_speedup"],
        "workload_chunk_tokens": chunk,
        "rounds": {v: list(rows) for v, rows in by_round.items()},
        "ratios": {k: s.to_dict() for k, s in spreads.items()},
        **{k: s.median for k, s in spreads.items()},
        "cached_over_naive": statistics.median(r["throughput_rps"] for r in by_round["tokens"])
        / naive.throughput_rps,
        # The most the token path could gain over the chat path on this machine (the chat
        # path's overhead all gone): the 1.25x the issue asked for needs overhead >= 20% of
        # a request, measured 55 of 216 ms once and 48 of 616 ms on a slower day.
        "tokens_over_chat_ceiling": perf.overhead_ceiling(
            perf.breakdown("chat", bench.records["chat"])
        ),
        "breakdown_ms": {
            v: vars_of(perf.breakdown(v, bench.records[v])) for v in VARIANTS if v != "direct"
        },
        "plots": plots,
    }


TOKENS_OVER_CHAT_GOAL = 1.25
"""What the token path was asked to gain over the chat path: reported, not gated (the gate is the
share of this machine's measured ceiling, `tokens_over_chat_of_ceiling`)."""


async def modes_on_the_same_rows(
    backend: Backend, counter: TokenCounter, items: list[WorkItem], policy: TrimPolicy
) -> dict[str, Any]:
    """`items` decoded, then in logprobs mode, on the token path (the first of each a primer,
    not compared): the share with the same score, and the rows that differ."""
    backend.request_path = "tokens"
    out: dict[str, list[RequestRecord]] = {}
    for mode in ("decode", "logprobs"):
        spec = JobSpec(
            policy=policy, runner=RunnerConfig(score_mode=mode), keep_records=True, progress=False
        )
        res = await run_job(backend, items, spec, counter=counter)
        out[mode] = sorted(res.records, key=lambda r: r.started)[1:]
    return perf.score_agreement(out["decode"], out["logprobs"])


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
    backend: Backend, counter: TokenCounter, items: list[WorkItem], policy: TrimPolicy
) -> dict[str, list[RequestRecord]]:
    """`items` on each request path, one at a time. The first item is a primer whose reply is
    not compared: each compared request follows the same prompt on every path, so it finds the
    same tokens cached and its prefill runs the same batches."""
    out: dict[str, list[RequestRecord]] = {}
    for path in ("tokens", "text", "chat"):
        backend.request_path = path
        spec = JobSpec(policy=policy, keep_records=True, progress=False)
        res = await run_job(backend, items, spec, counter=counter)
        out[path] = sorted(res.records, key=lambda r: r.started)[1:]
    return out


def vars_of(row: BreakdownRow) -> dict[str, float]:
    return {
        "overhead_ms": row.overhead_ms,
        "prefill_ms": row.prefill_ms,
        "decode_ms": row.decode_ms,
    }


def draw(harness: HarnessSession, bench: Bench, prefill_tps: float, curve: perf.Curve) -> list[str]:
    plots_dir = harness.report_dir / "plots"
    recs = sorted(bench.records["tokens"], key=lambda r: r.finished)
    t0 = min(r.started for r in recs)
    per_req = perf.bound_s(
        prefill_tps,
        curve.decode_tps,
        int(statistics.fmean(r.prompt_tokens - (r.cached_tokens or 0) for r in recs)),
        int(statistics.fmean(r.completion_tokens for r in recs)),
    )
    paths = [
        plot_throughput_over_run(
            [r.finished - t0 for r in recs],
            [r.latency_ms for r in recs],
            plots_dir / "throughput_latency_tokens.png",
            window_requests=5,
            roofline_rps=1 / per_req if per_req else None,
            title="Token path: throughput (5-request windows) and latency",
        ),
        plot_breakdown(
            [perf.breakdown(v, bench.records[v]) for v in VARIANTS if v != "direct"],
            plots_dir / "request_breakdown.png",
        ),
    ]
    return [harness.relpath(p) for p in paths]


def sweeps(
    harness: HarnessSession, scenario: Any, items: list[WorkItem], opts: dict[str, Any]
) -> dict[str, Any]:
    """Client concurrency × slots × request path, round by round, then the trim interval.

    Every server of the sweep is up at once, and each round runs every cell (a server and a
    client concurrency) once, in an order that rotates from round to round: one cell a run
    flipped the pick between runs (CONCURRENCY 4, 2, 4 in three runs). A cell's figure is its
    median over the rounds. The items are new to a server in every cell (the host prompt cache
    would serve a repeat), and the same in the same (round, concurrency) on every server."""
    per = int(opts.get("sweep_requests", 8))
    rounds = int(opts.get("sweep_rounds", 3))
    slot_counts = [int(s) for s in opts.get("slots", [1, 2])]
    concs = sorted({*slot_counts, *[int(c) for c in opts.get("concurrency", [1, 2, 4])]})
    servers: dict[tuple[int, str], Backend] = {}
    for slots in slot_counts:
        for path in ("chat", "tokens"):
            cfg = harness.run_config(scenario, parallel=slots, concurrency=slots, request_path=path)
            servers[(slots, path)] = backend = harness.backend(cfg)
            # Every slot prefills the rubric once before any cell is timed (else the first cell
            # pays a cold ~4,000-token prefill and always loses).
            warm = JobSpec(
                runner=RunnerConfig(concurrency=slots),
                progress=False,
                policy=TrimPolicy(backend.info.n_ctx_per_slot or 8192),
            )
            harness.run(run_job(backend, items[:slots], warm))
    cells = {
        f"{slots}/{path}/{conc}": (slots, path, conc)
        for (slots, path) in servers
        for conc in sorted({slots, *[int(c) for c in opts.get("concurrency", [1, 2, 4])]})
    }
    base = max(slot_counts)

    async def cell(name: str, r: int) -> dict[str, Any]:
        slots, path, conc = cells[name]
        backend = servers[(slots, path)]
        k = base + (r * len(concs) + concs.index(conc)) * per
        spec = JobSpec(
            runner=RunnerConfig(concurrency=conc),
            progress=False,
            policy=TrimPolicy(backend.info.n_ctx_per_slot or 8192),
        )
        m = (await run_job(backend, items[k : k + per], spec)).metrics
        return {"throughput_rps": m.throughput_rps, "errors": m.errors}

    samples = harness.run(perf.interleave(list(cells), rounds, cell, rotate=True))
    medians = perf.cell_medians(samples)
    overlap = [
        {
            "slots": slots,
            "request_path": path,
            "concurrency": conc,
            # What the server can hold at once from this client (slots + 1 on llama.cpp):
            # concurrency beyond it waits in the client's pool.
            "connections": servers[(slots, path)].info.extra.get("connections"),
            **medians[name],
        }
        for name, (slots, path, conc) in cells.items()
    ]
    for backend in servers.values():
        harness.release(backend)
    intervals = []
    cfg = harness.run_config(scenario, parallel=1, concurrency=1, request_path="tokens")
    backend = harness.backend(cfg)
    for interval in [int(i) for i in opts.get("trim_intervals", [10, 25, 50])]:
        spec = JobSpec(
            strategy="conversation",
            progress=False,
            policy=TrimPolicy(backend.info.n_ctx_per_slot or 8192, trim_interval=interval),
        )
        m = harness.run(run_job(backend, items[: 2 * interval], spec)).metrics
        intervals.append(
            {
                "interval": interval,
                "throughput_rps": m.throughput_rps,
                "token_savings": m.token_savings,
                "uncached_tokens_per_request": m.uncached_tokens_per_request,
            }
        )
    harness.release(backend)
    return {"overlap": overlap, "trim_intervals": intervals, "sweep_rounds": rounds}


def max_slots(harness: HarnessSession, scenario: Any) -> int | None:
    """The most slots whose predicted memory (phase 1's line: base + KV per token × n_ctx ×
    slots) fits phase 1's budget; None when phase 1 has not run for this profile."""
    budget = phase1_budget(harness.report_dir, harness.profile)
    cfg = harness.run_config(scenario)
    if budget is None or cfg.model_memory_gb is None or cfg.kv_mb_per_token is None:
        return None
    per_slot_gb = cfg.kv_mb_per_token * cfg.n_ctx.value / 1000.0
    room = budget[0] / 1e9 - cfg.model_memory_gb
    return max(1, int(room // per_slot_gb)) if per_slot_gb > 0 else None
