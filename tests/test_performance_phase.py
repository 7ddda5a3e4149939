"""The performance phase's logic (harness.phases.performance) on made-up figures: the order the
variants run in, ratios per round with their spread, the roofline bound, where a request's
time went, and the settings the measurements pick."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness.phases import performance as perf
from harness.records import RequestRecord


def test_variants_run_round_by_round() -> None:
    order: list[tuple[str, int]] = []

    async def run(variant: str, r: int) -> dict[str, Any]:
        order.append((variant, r))
        return {"throughput_rps": 1.0}

    out = asyncio.run(perf.interleave(["a", "b", "c"], 2, run))
    assert order == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]
    assert {k: len(v) for k, v in out.items()} == {"a": 2, "b": 2, "c": 2}


def test_rotated_rounds_start_each_round_further_on() -> None:
    order: list[tuple[str, int]] = []

    async def run(variant: str, r: int) -> dict[str, Any]:
        order.append((variant, r))
        return {"throughput_rps": 1.0}

    cells = ["a", "b", "c", "d", "e", "f"]
    out = asyncio.run(perf.interleave(cells, 3, run, rotate=True))
    firsts = [v for v, r in order if (v, r) == next(x for x in order if x[1] == r)]
    assert firsts == ["a", "c", "e"]  # 6 cells over 3 rounds: 2 further on each round
    for r in range(3):  # still every cell once a round
        assert sorted(v for v, rr in order if rr == r) == cells
    assert all(len(v) == 3 for v in out.values())


def test_alternated_rounds_run_backwards_every_other_round() -> None:
    order: list[tuple[str, int]] = []

    async def run(variant: str, r: int) -> dict[str, Any]:
        order.append((variant, r))
        return {"throughput_rps": float(r)}

    out = asyncio.run(perf.interleave(["a", "b", "c"], 4, run, alternate=True))
    assert [v for v, _ in order] == list("abccbaabccba")
    assert [r for _, r in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    # each variant's samples stay in round order, so ratios pair the same round
    assert out["a"] == out["c"] == [{"throughput_rps": float(r)} for r in range(4)]
    # of any two variants, each runs first in half the rounds
    firsts = [min(("a", "c"), key=lambda v, r=r: order.index((v, r))) for r in range(4)]
    assert firsts.count("a") == firsts.count("c") == 2


def test_a_cell_is_its_median_over_rounds_with_its_spread_and_errors() -> None:
    samples = {
        "1/tokens/2": [
            {"throughput_rps": x, "errors": e} for x, e in ((2.0, 0), (1.0, 1), (2.2, 0))
        ],
        "1/tokens/4": [],
    }
    got = perf.cell_medians(samples)
    assert got["1/tokens/2"]["throughput_rps"] == 2.0  # the slow round moves no median
    assert got["1/tokens/2"]["spread"] == pytest.approx((2.2 - 1.0) / 2.0)
    assert got["1/tokens/2"]["rounds"] == [2.0, 1.0, 2.2]
    assert got["1/tokens/2"]["errors"] == 1
    assert got["1/tokens/4"]["throughput_rps"] == 0.0  # no rounds: nothing measured, no crash


def test_batched_calibrations_are_taken_as_medians() -> None:
    rates = [
        {"slots": 2.0, "prefill_tps": p, "decode_tps": d}
        for p, d in ((230.0, 57.0), (180.0, 58.0), (240.0, 40.0))
    ]
    got = perf.median_rates(rates)
    assert (got["prefill_tps"], got["decode_tps"]) == (230.0, 57.0)
    assert got["prefill_tps_spread"] == pytest.approx(60.0 / 230.0)
    assert got["slots"] == 2.0 and got["calibrations"] == 3
    assert "median of 3" in got["source"]
    assert perf.median_rates([]) == {}


def test_ratios_are_taken_per_round_and_gated_on_the_median() -> None:
    rounds = {
        "tokens": [{"throughput_rps": r} for r in (1.3, 1.2, 2.6, 1.25, 1.3)],
        "chat": [{"throughput_rps": r} for r in (1.0, 1.0, 1.0, 1.0, 0.0)],
    }
    s = perf.ratio_spreads(rounds, {"t_over_c": ("tokens", "chat", "throughput_rps")})["t_over_c"]
    # Round 5 has no chat figure: left out, not a division by zero; the outlier moves no median.
    assert s.rounds == 4 and s.median == pytest.approx(1.275)
    assert (s.low, s.high) == (1.2, 2.6)
    assert s.spread == pytest.approx((2.6 - 1.2) / 1.275)
    assert perf.spread([]).rounds == 0


def test_the_bound_is_prefill_plus_decode_at_the_calibrated_rates() -> None:
    assert perf.bound_s(100.0, 20.0, 900, 40) == pytest.approx(9.0 + 2.0)
    assert perf.bound_s(0.0, 20.0, 900, 40) == 0.0  # no calibration: no bound, not infinity


def test_the_best_bound_takes_the_faster_of_single_stream_and_batched_per_rate() -> None:
    rounds = [{"uncached": 900, "completion": 40, "elapsed_s": 20.0}] * 2
    single = [perf.Curve(4000, {32: 100.0, 512: 100.0}, 20.0)] * 2
    # Batched prefill faster, batched decode slower: the best bound is 900/300 + 40/20 = 5 s.
    faster = [{"prefill_tps": 300.0, "decode_tps": 10.0}] * 2
    got = perf.against_best_bound(rounds, single, faster, 88)
    assert got["efficiency"] == pytest.approx(5.0 / 20.0)
    assert got["batched_speedup"] == pytest.approx((9.0 + 2.0) / (3.0 + 4.0))
    # Batching slower at both (2 CPU cores): the single-stream bound, never a bound above it.
    slower = [{"prefill_tps": 50.0, "decode_tps": 10.0}] * 2
    got = perf.against_best_bound(rounds, single, slower, 88)
    assert got["efficiency"] == pytest.approx(11.0 / 20.0)
    assert got["batched_speedup"] == pytest.approx(11.0 / 22.0)
    assert perf.against_best_bound(rounds, single, [], 88) == {
        "efficiency": None,
        "batched_speedup": None,
    }


def test_the_breakdown_is_what_the_server_did_not_account_for() -> None:
    recs = [
        RequestRecord("a", "ok", latency_ms=300.0, prompt_ms=100.0, decode_ms=150.0),
        RequestRecord("b", "ok", latency_ms=500.0, prompt_ms=200.0, decode_ms=250.0),
        RequestRecord("c", "error", latency_ms=9000.0),
    ]
    row = perf.breakdown("tokens", recs)
    assert (row.prefill_ms, row.decode_ms, row.overhead_ms) == (150.0, 200.0, 50.0)
    # removing all 50 ms of overhead would make the request 400 / 350 times faster, no more
    assert perf.overhead_ceiling(row) == pytest.approx(400.0 / 350.0)
    assert perf.overhead_ceiling(perf.breakdown("none", [])) is None


OVERLAP = [
    {"slots": 1, "request_path": "chat", "concurrency": 2, "throughput_rps": 1.02, "errors": 0},
    {"slots": 1, "request_path": "tokens", "concurrency": 1, "throughput_rps": 0.90, "errors": 0},
    {"slots": 1, "request_path": "tokens", "concurrency": 4, "throughput_rps": 0.95, "errors": 0},
    {"slots": 2, "request_path": "tokens", "concurrency": 2, "throughput_rps": 1.40, "errors": 3},
    {"slots": 4, "request_path": "tokens", "concurrency": 4, "throughput_rps": 2.00, "errors": 0},
]
INTERVALS = [
    {"interval": 10, "throughput_rps": 1.5, "token_savings": 0.93},
    {"interval": 25, "throughput_rps": 0.94, "token_savings": 0.974},
    {"interval": 50, "throughput_rps": 0.91, "token_savings": 0.975},
]


def test_the_settings_are_the_best_measured_within_the_memory_budget() -> None:
    got = perf.pick_settings(OVERLAP, INTERVALS, max_slots=2)
    # 4 slots do not fit phase 1's budget; the 2-slot cell had errors: the fastest clean cell.
    assert got == {"REQUEST_PATH": "chat", "parallel": 1, "CONCURRENCY": 2, "TRIM_INTERVAL": 25}
    # Interval 10 is fastest but loses 4.5 points of savings: the fastest within 2% of the best.
    assert perf.pick_settings(OVERLAP, INTERVALS)["parallel"] == 4


def test_cells_that_tie_within_the_noise_pick_the_fewest_slots_then_the_least_concurrency() -> None:
    ties = [
        {"slots": 2, "request_path": "tokens", "concurrency": 4, "throughput_rps": 2.00},
        {"slots": 1, "request_path": "tokens", "concurrency": 4, "throughput_rps": 1.99},
        {"slots": 1, "request_path": "tokens", "concurrency": 2, "throughput_rps": 1.96},
        {"slots": 1, "request_path": "tokens", "concurrency": 1, "throughput_rps": 1.60},
    ]
    got = perf.pick_settings(ties, [])
    assert (got["parallel"], got["CONCURRENCY"]) == (1, 2)  # 1.96 is within 3% of 2.00
    got = perf.pick_settings(ties, [], tolerance=0.0)
    assert (got["parallel"], got["CONCURRENCY"]) == (2, 4)  # no tolerance: the fastest cell


def test_trim_intervals_that_tie_on_speed_pick_the_fewest_uncached_tokens() -> None:
    def runs(rps25: float, rps50: float) -> list[dict[str, float]]:
        return [  # two runs of the suite here: savings and uncached tokens equal, req/s not
            {"interval": 10, "throughput_rps": 1.1, "token_savings": 0.9284,
             "uncached_tokens_per_request": 322.4},
            {"interval": 25, "throughput_rps": rps25, "token_savings": 0.9743,
             "uncached_tokens_per_request": 132.4},
            {"interval": 50, "throughput_rps": rps50, "token_savings": 0.9751,
             "uncached_tokens_per_request": 128.7},
        ]  # fmt: skip

    assert perf.pick_settings(OVERLAP, runs(2.285, 2.418))["TRIM_INTERVAL"] == 50
    assert perf.pick_settings(OVERLAP, runs(2.030, 2.009))["TRIM_INTERVAL"] == 50  # a tie: 50
    assert perf.pick_settings(OVERLAP, runs(2.400, 2.200))["TRIM_INTERVAL"] == 25  # 8% faster


def test_a_request_path_chosen_by_the_interleaved_rounds_restricts_the_sweep() -> None:
    got = perf.pick_settings(OVERLAP, INTERVALS, max_slots=2, request_path="tokens")
    assert (got["REQUEST_PATH"], got["parallel"], got["CONCURRENCY"]) == ("tokens", 1, 4)
    # A path the sweep never measured: the sweep's own best, not nothing.
    assert perf.pick_settings(OVERLAP, [], max_slots=1, request_path="text")["REQUEST_PATH"] == (
        "chat"
    )


def test_replies_on_two_paths_are_compared_item_by_item() -> None:
    def rec(cid: str, content: str, score: int | None, prompt: int = 4000) -> RequestRecord:
        parsed = {"score": score} if score is not None else None
        return RequestRecord(cid, "ok", content=content, parsed=parsed, prompt_tokens=prompt)

    tokens = [rec("a", '{"score": 7}', 7), rec("b", '{"score": 3}', 3), rec("c", "x", None)]
    chat = [
        rec("c", "x", None),  # same text, but no score: matches as a reply, not as a score
        rec("b", '{"score":3}', 3, prompt=4001),  # same score, other text and prompt length
        rec("a", '{"score": 7}', 7),
        rec("z", '{"score": 1}', 1),  # only on one path: not compared
    ]
    out = perf.compare_replies(tokens, chat)
    assert out["items"] == 3
    assert out["same_reply"] == pytest.approx(2 / 3)
    assert out["same_score"] == pytest.approx(2 / 3)
    assert out["same_prompt_tokens"] == pytest.approx(2 / 3)
    assert out["parsed"] == pytest.approx(2 / 3)
    assert [d["custom_id"] for d in out["differ"]] == ["b"]
    failed = [RequestRecord("a", "error"), RequestRecord("b", "ok", content='{"score": 3}')]
    assert perf.compare_replies(failed, failed)["same_reply"] == 0.5  # an error matches nothing
    assert perf.compare_replies([], chat)["same_score"] is None


def test_the_prefill_rate_between_calibrated_chunks_interpolates_time_per_token() -> None:
    rates = {32: 200.0, 128: 400.0, 512: 500.0}
    # 80 tokens: halfway from 32 to 128 in time per token (5 ms and 2.5 ms): 3.75 ms a token.
    assert perf.prefill_rate_at(rates, 80) == pytest.approx(1000 / 3.75)
    assert perf.prefill_rate_at(rates, 128) == pytest.approx(400.0)
    assert perf.prefill_rate_at(rates, 8) == 200.0 and perf.prefill_rate_at(rates, 4096) == 500.0
    assert perf.prefill_rate_at({}, 80) == 0.0  # no calibration: no bound


def test_calibrations_of_several_rounds_combine_by_median() -> None:
    curves = [
        perf.Curve(3874, {32: 190.0, 128: 300.0}, 60.0),
        perf.Curve(3874, {32: 210.0, 128: 240.0}, 66.0),
        perf.Curve(3874, {32: 205.0, 128: 290.0}, 20.0),  # a round the machine slowed
    ]
    m = perf.median_curve(curves)
    assert m.prefill_tps == {32: 205.0, 128: 290.0} and m.decode_tps == 60.0
    assert m.depth_tokens == 3874 and "median of 3" in m.source


def _scored(cid: str, score: int | None, scoring: dict[str, Any] | None = None) -> RequestRecord:
    rec = RequestRecord(cid, "ok" if score is not None else "error")
    rec.parsed = {"score": score} if score is not None else None
    rec.scoring = scoring
    return rec


def test_score_agreement_counts_the_same_rows_and_lists_those_that_differ() -> None:
    decoded = [_scored(f"r{i}", 6) for i in range(4)] + [_scored("r4", None)]
    dist = {"6": 0.51, "7": 0.49}
    read = [
        _scored("r0", 6, {"mode": "logprobs", "argmax": 6, "p": 0.6, "distribution": dist}),
        _scored("r1", 6, {"mode": "logprobs", "argmax": 7, "p": 0.4, "distribution": dist}),
        _scored("r2", 7, {"mode": "logprobs", "argmax": 7, "p": 0.49, "distribution": dist}),
        _scored("r3", 6, {"mode": "decode", "fallback": "no allowed token"}),
        _scored("r4", 6, {"mode": "logprobs", "argmax": 6, "p": 0.9, "distribution": dist}),
    ]
    out = perf.score_agreement(decoded, read)
    assert out["rows"] == 5
    assert out["agreement"] == pytest.approx(3 / 5)  # r0, r1, r3; r2 differs, r4 unparsed
    assert out["agreement_argmax"] == pytest.approx(1 / 5)  # only r0's most probable is 6
    assert out["read_in_logprobs"] == 4
    assert [d["custom_id"] for d in out["differ"]] == ["r2", "r4"]
    assert out["differ"][0]["margin"] == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("agreement", "speedup", "mode"),
    [(0.99, 1.8, "logprobs"), (0.97, 1.8, "decode"), (0.995, 0.9, "decode"), (None, 1.8, "decode")],
)
def test_score_mode_is_logprobs_only_when_the_same_answer_and_faster(
    agreement: float | None, speedup: float, mode: str
) -> None:
    assert perf.score_mode_pick(agreement, speedup)[0] == mode


def test_the_bound_counts_the_steps_the_mode_needs() -> None:
    curve = perf.Curve(4000, {128: 500.0}, 25.0)
    rows = [{"elapsed_s": 1.0, "uncached": 500, "completion": 16, "steps": 8}]
    got = perf.against_best_bound(rows, [curve], [{}], 128)
    # 500 prefill tokens at 500 tok/s + 8 steps at 25 tok/s = 1.32 s; not 16 completion tokens.
    assert got["efficiency"] == pytest.approx(1.32)


def test_a_difference_counts_only_beyond_the_rounds_spread() -> None:
    # The flags comparison's flip: 0.885 vs 0.713 req/s one run, 1.19 vs 1.51 the next.
    ollama = {"throughput_rps": 1.0, "throughput_rps_range": [0.885, 1.19]}
    swa = {"throughput_rps": 1.1, "throughput_rps_range": [0.713, 1.51]}
    assert not perf.beyond_spread(ollama, swa, "throughput_rps")
    steady = {"x": 126.3, "x_range": [126.0, 126.6]}
    conv = {"x": 60.0, "x_range": [55.0, 70.0]}
    assert perf.beyond_spread(steady, conv, "x")
    assert not perf.beyond_spread(steady, {"x": None, "x_range": None}, "x")
