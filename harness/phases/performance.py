"""The performance phase's logic: variants run round by round, ratios with their spread, the
real limit (prefill by chunk size, decode, single-stream and batched), where each request's time
went, and the settings the measurements pick.

Ratios that repeat: on a shared 2-core machine one round of 20 requests per variant gave
conversation ÷ stateless 0.57 in one run and 0.89 in the next. So the variants run interleaved
(round 1 of every variant, then round 2, ...), every ratio is computed per round, and the report
gives each ratio's median and spread (min, max); criteria gate the median.

Replies that do not change with the request's form: the same items, each after the same primer
and in the same order, on the token path and the text path (`compare_replies`). Both reach
llama-server's `/completion` with the same prompt ids and find its cache in the same state, so
with the same seed and greedy decoding the replies must be the same text and the same scores.
The chat path is compared too, but not gated: `/v1/chat/completions` runs another chat format
(`peg-native`, with a generation prompt), and near-ties can fall the other way (15 of 200 rows
of `harness run` scored 6 on one and 10 on the other, the ids equal on all 200).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness.backends.base import Backend, ChatRequest, ChatResult
from harness.engine.tokens import TokenCounter
from harness.phases.quality import score as score_of
from harness.plots import BreakdownRow
from harness.records import RequestRecord
from harness.reuse import padded_candidate

__all__ = [
    "Curve",
    "Spread",
    "against_best_bound",
    "batched_rates",
    "beyond_spread",
    "breakdown",
    "calibrate_curve",
    "cell_medians",
    "compare_replies",
    "interleave",
    "median_curve",
    "median_rates",
    "overhead_ceiling",
    "pick_settings",
    "prefill_rate_at",
    "ratio_spreads",
    "score_agreement",
    "score_mode_pick",
]

AGREEMENT_TO_SWITCH = 0.98
"""SCORE_MODE is written as `logprobs` only when its scores equal the decoded ones on at least
this share of the same rows (and it is faster)."""


@dataclass(frozen=True, slots=True)
class Spread:
    """A ratio over rounds: its median (what criteria gate) and how far the rounds went."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        """(high − low) ÷ median: the ratio's relative spread over the rounds."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "spread": self.spread}


def spread(values: Sequence[float]) -> Spread:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Spread(0.0, 0.0, 0.0, 0)
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def ratio_spreads(
    rounds: Mapping[str, Sequence[Mapping[str, Any]]],
    ratios: Mapping[str, tuple[str, str, str]],
) -> dict[str, Spread]:
    """Each ratio `name: (numerator variant, denominator variant, figure)` per round."""
    out: dict[str, Spread] = {}
    for name, (num, den, key) in ratios.items():
        values = []
        for a, b in zip(rounds.get(num, []), rounds.get(den, []), strict=False):
            if a.get(key) and b.get(key):
                values.append(float(a[key]) / float(b[key]))
        out[name] = spread(values)
    return out


async def interleave(
    variants: Sequence[str],
    rounds: int,
    run: Callable[[str, int], Awaitable[Mapping[str, Any]]],
    *,
    rotate: bool = False,
    alternate: bool = False,
) -> dict[str, list[Mapping[str, Any]]]:
    """Round r of every variant, then round r + 1: a noisy machine hits every variant alike.
    With `rotate`, round r starts `r × len(variants) ÷ rounds` variants further on, so no variant
    always runs first (after a server switch, say) or last. With `alternate`, odd rounds run the
    order backwards (a b c, c b a, a b c, ...): of any two variants each runs first in half the
    rounds, so a machine slowing or speeding up over a round does not favour one side of a
    ratio in every round."""
    out: dict[str, list[Mapping[str, Any]]] = {v: [] for v in variants}
    step = max(1, len(variants) // max(1, rounds)) if rotate else 0
    for r in range(rounds):
        k = (r * step) % len(variants) if variants else 0
        order = [*variants[k:], *variants[:k]]
        for v in reversed(order) if alternate and r % 2 else order:
            out[v].append(await run(v, r))
    return out


def beyond_spread(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> bool:
    """Whether two variants' medians of `key` differ by more than either one's spread over
    its rounds (`<key>_range`: [min, max]): only such a difference is a ranking that repeats."""
    ra, rb = a.get(f"{key}_range"), b.get(f"{key}_range")
    if a.get(key) is None or b.get(key) is None or not ra or not rb:
        return False
    return bool(abs(float(a[key]) - float(b[key])) > max(ra[1] - ra[0], rb[1] - rb[0]))


def cell_medians(
    samples: Mapping[Any, Sequence[Mapping[str, Any]]], key: str = "throughput_rps"
) -> dict[Any, dict[str, Any]]:
    """Per cell: the median of `key` over its rounds (what is compared), its spread, every
    round's value, and the errors summed over the rounds."""
    out: dict[Any, dict[str, Any]] = {}
    for cell, rows in samples.items():
        values = [float(r.get(key) or 0.0) for r in rows]
        s = spread(values)
        out[cell] = {
            key: s.median,
            "spread": s.spread,
            "rounds": [round(v, 4) for v in values],
            "errors": sum(int(r.get("errors") or 0) for r in rows),
        }
    return out


def median_rates(rates: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Batched calibrations measured apart (one per round): each rate's median and spread."""
    if not rates:
        return {}
    out: dict[str, Any] = {}
    for key in ("prefill_tps", "decode_tps"):
        s = spread([r[key] for r in rates if r.get(key)])
        out[key], out[f"{key}_spread"] = s.median, s.spread
    out["slots"] = max(float(r.get("slots") or 0.0) for r in rates)
    out["calibrations"] = len(rates)
    out["source"] = f"llama.cpp timings, median of {len(rates)} batched calibrations"
    return out


def compare_replies(
    first: Sequence[RequestRecord], second: Sequence[RequestRecord], *, shown: int = 5
) -> dict[str, Any]:
    """The same items answered twice (by custom_id): shares with the same prompt tokens, the same
    reply text and the same parsed score (a failed or unparsed reply matches nothing), and the
    first `shown` items that differ."""
    other = {r.custom_id: r for r in second}
    pairs = [(a, other[a.custom_id]) for a in first if a.custom_id in other]
    n = len(pairs)

    def share(same: Callable[[RequestRecord, RequestRecord], bool]) -> float | None:
        return sum(1 for a, b in pairs if a.ok and b.ok and same(a, b)) / n if n else None

    differ = [
        {"custom_id": a.custom_id, "first": a.content, "second": b.content}
        for a, b in pairs
        if not (a.ok and b.ok and a.content == b.content)
    ]
    return {
        "items": n,
        "same_prompt_tokens": share(lambda a, b: a.prompt_tokens == b.prompt_tokens),
        "same_reply": share(lambda a, b: a.content == b.content),
        "same_score": share(lambda a, b: score_of(a) is not None and score_of(a) == score_of(b)),
        "parsed": share(lambda a, b: score_of(a) is not None),
        "differ": differ[:shown],
        "source": "server replies",
    }


def score_agreement(
    decoded: Sequence[RequestRecord], read: Sequence[RequestRecord], *, shown: int = 20
) -> dict[str, Any]:
    """The same rows scored in `decode` and in `logprobs` mode (by custom_id): the share whose
    logprobs `score` (greedy under the grammar, read from the probabilities) equals the decoded
    score, the share whose most probable value does, and the rows that differ with what the
    probabilities said (p of the two values, the margin between the two most probable). A row
    unparsed or failed in either mode counts as differing."""
    other = {r.custom_id: r for r in read}
    pairs = [(a, other[a.custom_id]) for a in decoded if a.custom_id in other]
    same = same_argmax = 0
    differ = []
    for a, b in pairs:
        sa, sb = score_of(a), score_of(b)
        scoring = b.scoring or {}
        if sa is not None and sa == sb:
            same += 1
        if sa is not None and scoring.get("argmax") == sa:
            same_argmax += 1
        if sa is None or sa != sb:
            dist = scoring.get("distribution") or {}
            ranked = sorted(dist.values(), reverse=True)
            differ.append(
                {
                    "custom_id": a.custom_id,
                    "decoded": sa,
                    "logprobs": sb,
                    "p_decoded": dist.get(str(sa)) if sa is not None else None,
                    "p_logprobs": scoring.get("p"),
                    "margin": ranked[0] - ranked[1] if len(ranked) > 1 else None,
                    "mode": scoring.get("mode"),
                }
            )
    n = len(pairs)
    return {
        "rows": n,
        "agreement": same / n if n else None,
        "agreement_argmax": same_argmax / n if n else None,
        "read_in_logprobs": sum(1 for _, b in pairs if (b.scoring or {}).get("mode") == "logprobs"),
        "differ": differ[:shown],
        "differ_count": len(differ),
        "source": "server replies (decode) and top log-probabilities (logprobs), same rows",
    }


def score_mode_pick(agreement: float | None, speedup: float | None) -> tuple[str, str]:
    """The SCORE_MODE the measurements pick, and why."""
    if agreement is None or speedup is None:
        return "decode", "not measured"
    if agreement < AGREEMENT_TO_SWITCH:
        return "decode", (
            f"logprobs scores equal the decoded ones on {agreement:.1%} of rows, below "
            f"{AGREEMENT_TO_SWITCH:.0%}: not the same answer"
        )
    if speedup <= 1.0:
        return "decode", f"logprobs mode is not faster here ({speedup:.2f}x)"
    return "logprobs", (
        f"the same score on {agreement:.1%} of rows, {speedup:.2f}x the rows per second"
    )


def breakdown(label: str, records: Sequence[RequestRecord]) -> BreakdownRow:
    """Mean time per request: what the server spent on prompt and decode, and the rest."""
    ok = [r for r in records if r.ok]
    if not ok:
        return BreakdownRow(label, 0.0, 0.0, 0.0)
    total = statistics.fmean(r.latency_ms for r in ok)
    prefill = statistics.fmean(r.prompt_ms or 0.0 for r in ok)
    decode = statistics.fmean(r.decode_ms or 0.0 for r in ok)
    return BreakdownRow(label, max(0.0, total - prefill - decode), prefill, decode)


def overhead_ceiling(row: BreakdownRow) -> float | None:
    """A request's mean time ÷ its server compute (prefill + decode): the most any change of
    the request's form can gain over this variant, were every millisecond outside the
    server's prompt and decode removed and the compute left as it is."""
    compute = row.prefill_ms + row.decode_ms
    return (compute + row.overhead_ms) / compute if compute > 0 else None


@dataclass(frozen=True, slots=True)
class Curve:
    """llama-bench-style rates at the rubric's depth: prefill by chunk size, and decode."""

    depth_tokens: int
    prefill_tps: dict[int, float]
    """Uncached prompt tokens per second by chunk size (tokens after the rubric)."""
    decode_tps: float
    source: str = "llama.cpp timings"

    def to_dict(self) -> dict[str, Any]:
        return {
            "depth_tokens": self.depth_tokens,
            "prefill_tps": {str(k): v for k, v in self.prefill_tps.items()},
            "decode_tps": self.decode_tps,
            "source": self.source,
        }


def _timed(result: ChatResult) -> tuple[int, float, int, float]:
    raw = result.raw.get("timings") or {}
    return (
        int(raw.get("prompt_n") or result.usage.uncached_tokens),
        float(result.timings.prompt_ms or 0.0),
        int(raw.get("predicted_n") or result.usage.completion_tokens),
        float(result.timings.decode_ms or 0.0),
    )


def median_curve(curves: Sequence[Curve]) -> Curve:
    """Each rate's median over curves measured apart (e.g. one per round)."""
    chunks = sorted({c for curve in curves for c in curve.prefill_tps})
    return Curve(
        max((c.depth_tokens for c in curves), default=0),
        {
            chunk: statistics.median(c.prefill_tps[chunk] for c in curves if chunk in c.prefill_tps)
            for chunk in chunks
        },
        statistics.median(c.decode_tps for c in curves) if curves else 0.0,
        f"llama.cpp timings, median of {len(curves)} calibrations",
    )


def prefill_rate_at(rates: Mapping[int, float], chunk: float) -> float:
    """The prefill rate at `chunk` new tokens: time per token interpolated linearly between the
    two calibrated chunk sizes around it (the nearest one's rate outside them)."""
    known = sorted((c, r) for c, r in rates.items() if r > 0)
    if not known:
        return 0.0
    if chunk <= known[0][0]:
        return known[0][1]
    for (c0, r0), (c1, r1) in itertools.pairwise(known):
        if chunk <= c1:
            w = (chunk - c0) / (c1 - c0)
            return 1.0 / ((1 - w) / r0 + w / r1)
    return known[-1][1]


async def calibrate_curve(
    backend: Backend,
    counter: TokenCounter,
    rubric: str,
    *,
    chunks: Sequence[int] = (32, 128, 512),
    samples: int = 3,
    decode_tokens: int = 16,
    label: str = "calibration",
) -> Curve:
    """Prefill rate at each chunk size after the cached rubric, and the decode rate there.
    Prompts are new to the server for each `label` (llama-server's host prompt cache would
    otherwise serve a repeat of an earlier calibration from memory)."""
    system = {"role": "system", "content": rubric}
    warm = [system, {"role": "user", "content": "warm-up"}]
    await backend.chat(ChatRequest(warm, max_tokens=1, prompt_ids=await counter.count(warm)))
    rates: dict[int, float] = {}
    depth = 0
    decode: list[float] = []
    k = 0
    for chunk in chunks:
        values = []
        for _ in range(samples):
            k += 1
            msgs = [
                system,
                {"role": "user", "content": padded_candidate(f"{label} {k}: ", chunk)},
            ]
            ids = await counter.count(msgs)
            res = await backend.chat(
                ChatRequest(msgs, max_tokens=1, temperature=0.0, prompt_ids=ids)
            )
            n, ms, _, _ = _timed(res)
            depth = res.usage.cached_tokens or depth
            if ms > 0:
                values.append(n / ms * 1000.0)
            gen = await backend.chat(
                ChatRequest(
                    msgs,
                    max_tokens=decode_tokens,
                    temperature=0.0,
                    prompt_ids=ids,
                    extra={"ignore_eos": True},
                )
            )
            _, _, m, dms = _timed(gen)
            if dms > 0 and m > 1:
                decode.append(m / dms * 1000.0)
        rates[chunk] = statistics.median(values) if values else 0.0
    return Curve(depth, rates, statistics.median(decode) if decode else 0.0)


async def batched_rates(
    backend: Backend,
    counter: TokenCounter,
    rubric: str,
    *,
    slots: int,
    chunk: int,
    decode_tokens: int = 16,
    label: str = "batched",
) -> dict[str, float]:
    """Aggregate prefill and decode rates with `slots` requests in flight on `slots` slots
    (batched across slots, as llama-server's continuous batching runs them). Prompts are new
    to the server for each `label`, as in `calibrate_curve`."""
    system = {"role": "system", "content": rubric}

    async def one(i: int, n_out: int) -> ChatResult:
        msgs = [system, {"role": "user", "content": padded_candidate(f"{label} {i}: ", chunk)}]
        return await backend.chat(
            ChatRequest(
                msgs,
                max_tokens=n_out,
                temperature=0.0,
                slot=i % slots,
                prompt_ids=await counter.count(msgs),
                extra={"ignore_eos": True},
            )
        )

    await asyncio.gather(*(one(i, 1) for i in range(slots)))  # every slot holds the rubric
    started = time.perf_counter()
    results = await asyncio.gather(*(one(100 + i, decode_tokens) for i in range(slots)))
    wall = time.perf_counter() - started
    timed = [_timed(r) for r in results]
    prompt_ms = statistics.fmean(t[1] for t in timed) or 1e-9
    decode_ms = statistics.fmean(t[3] for t in timed) or 1e-9
    return {
        "slots": float(slots),
        "prefill_tps": sum(t[0] for t in timed) / prompt_ms * 1000.0,
        "decode_tps": sum(t[2] for t in timed) / decode_ms * 1000.0,
        "wall_s": wall,
    }


def against_best_bound(
    rounds: Sequence[Mapping[str, Any]],
    single: Sequence[Curve],
    batched: Sequence[Mapping[str, float]],
    chunk: float,
) -> dict[str, float | None]:
    """Each round of a variant (`uncached`, `completion`, `elapsed_s`) against the best bound
    that round's calibrations found: per rate, the faster of single-stream (at the workload's
    `chunk`) and batched across slots. Where batching across slots is slower (on 2 CPU cores one
    stream already fills them) the best bound is the single-stream one: a batched figure alone
    would be no bound, and an efficiency above 1 against it would say nothing. Also the
    batched speed-up: the single-stream bound's time ÷ the batched bound's (< 1: slower)."""
    effs, speedups = [], []
    for row, one, many in zip(rounds, single, batched, strict=False):
        if not row.get("elapsed_s"):
            continue
        sp, sd = prefill_rate_at(one.prefill_tps, chunk), one.decode_tps
        bp, bd = float(many.get("prefill_tps") or 0.0), float(many.get("decode_tps") or 0.0)
        n, out = int(row["uncached"]), int(row.get("steps", row["completion"]))
        best = bound_s(max(sp, bp), max(sd, bd), n, out)
        if best > 0:
            effs.append(best / float(row["elapsed_s"]))
        if bound_s(bp, bd, n, out) > 0:
            speedups.append(bound_s(sp, sd, n, out) / bound_s(bp, bd, n, out))
    return {
        "efficiency": statistics.median(effs) if effs else None,
        "batched_speedup": statistics.median(speedups) if speedups else None,
    }


def bound_s(prefill_tps: float, decode_tps: float, uncached: int, output: int) -> float:
    """Lower bound on a workload's time at these rates (the roofline)."""
    if prefill_tps <= 0 or decode_tps <= 0:
        return 0.0
    return uncached / prefill_tps + output / decode_tps


def pick_settings(
    overlap: Sequence[Mapping[str, Any]],
    intervals: Sequence[Mapping[str, Any]],
    *,
    max_slots: int | None = None,
    request_path: str | None = None,
    tolerance: float = 0.03,
) -> dict[str, Any]:
    """The settings the measurements pick: the request path, slots and concurrency with the
    most completed requests per second (no errors; no more slots than `max_slots`, what phase
    1's memory budget allows; only cells of `request_path` when the path was chosen by a
    better measurement), and among cells within `tolerance` of that best, the one with the
    fewest slots (memory), then the lowest concurrency: cells that tie within the noise (on
    llama.cpp, concurrency 2 and 4 on one slot both hold 2 requests at the server) must not
    flip the pick from run to run. The trim interval: among those within 2% of the best
    savings, and within `tolerance` of the most requests per second of those, the one with the
    fewest uncached prompt tokens per request (the server's own count, the same run to run;
    req/s alone flipped 50 / 25 between two runs a few minutes apart)."""
    allowed = [r for r in overlap if max_slots is None or int(r["slots"]) <= max_slots]
    if request_path is not None:
        allowed = [r for r in allowed if r["request_path"] == request_path] or allowed
    clean = [r for r in allowed if not r.get("errors")] or list(allowed)
    top = max(float(r.get("throughput_rps") or 0.0) for r in clean)
    near = [r for r in clean if float(r.get("throughput_rps") or 0.0) >= top * (1 - tolerance)]
    best = min(near, key=lambda r: (int(r["slots"]), int(r["concurrency"])))
    out: dict[str, Any] = {
        "REQUEST_PATH": best["request_path"],
        "parallel": int(best["slots"]),
        "CONCURRENCY": int(best["concurrency"]),
    }
    if intervals:
        top = max(float(r.get("token_savings") or 0.0) for r in intervals)
        near = [r for r in intervals if float(r.get("token_savings") or 0.0) >= top - 0.02]
        fastest = max(float(r.get("throughput_rps") or 0.0) for r in near)
        quick = [
            r for r in near if float(r.get("throughput_rps") or 0.0) >= fastest * (1 - tolerance)
        ]
        pick = min(quick, key=lambda r: float(r.get("uncached_tokens_per_request") or math.inf))
        out["TRIM_INTERVAL"] = int(pick["interval"])
    return out
