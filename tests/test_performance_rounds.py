"""The performance phase's rounds (harness.phases.performance_runs: `measure`, `sweeps`,
`conclude`) on the in-process double: which variant runs on which request path, what each
round records, every server started is released, and each job is the run's job (`spec_for`)
with the variant's own settings, the same job the suite built itself before. The double's
figures are logic checks, never measurements."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.backends.base import Backend, ChatRequest, ChatResult
from harness.baselines import DirectResult
from harness.config import ProfileConfig
from harness.engine import JobSpec, RunnerConfig, TrimPolicy
from harness.phases import performance_runs as runs
from harness.phases.common import phase_job
from harness.run.preflight import spec_for
from harness.run.resolve import resolve_run_config
from harness.testing.doubles import InProcessDouble
from harness.workload import WorkItem, generate_candidates, load_prompt

T = TypeVar("T")
OPTS: dict[str, Any] = {
    "reply_items": 3,
    "agreement_items": 4,
    "slots": [1, 2],
    "concurrency": [1, 2, 4],
    "sweep_requests": 2,
    "sweep_rounds": 2,
    "trim_intervals": [2, 3],
}


class PathDouble(InProcessDouble):
    """The double, noting the request path each request went on (as the suite switches it)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(delay_s=0.001, **kw)
        self.request_path = "chat"
        self.paths: list[str] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.paths.append(self.request_path)
        return await super().chat(request)


def items(n: int) -> list[WorkItem]:
    prompt = load_prompt()
    system = {"role": "system", "content": prompt.system}
    return [
        WorkItem(
            f"{row['id']}-{i}",
            (system, {"role": "user", "content": prompt.render(row, "id")}),
            max_tokens=8,
        )
        for i, row in enumerate(generate_candidates(n))
    ]


def run_job_of(backend: Backend) -> JobSpec:
    """What `spec_for` gives the suite for a server: the run's settings, capped to it."""
    cfg = resolve_run_config(
        profile="embedded",
        config=ProfileConfig("embedded"),
        cli={"backend": "embedded", "strategy": "conversation", "concurrency": 3, "parallel": 3},
    )
    return spec_for(cfg, backend, results=None, desc="performance", progress=False)


def test_a_phase_job_is_the_runs_job_with_what_the_phase_sets() -> None:
    base = run_job_of(InProcessDouble(n_ctx_per_slot=4096))
    assert base.policy.max_context_tokens <= 4096  # spec_for capped it to the server
    job = phase_job(base, strategy="stateless", keep_records=True)
    assert (job.strategy, job.keep_records) == ("stateless", True)
    # what the phase does not set stays the run's
    assert (job.policy, job.runner, job.desc, job.reuse) == (
        base.policy,
        base.runner,
        base.desc,
        base.reuse,
    )
    assert base.strategy == "conversation"  # the run's job itself is not changed


def test_the_benchs_jobs_are_the_ones_the_suite_built_itself() -> None:
    """Every engine setting of a variant's job is the variant's own (not the run's concurrency,
    strategy or score mode): the same job, so the same figures, as before `spec_for`."""
    backend = InProcessDouble(n_ctx_per_slot=8192)
    policy = TrimPolicy(8192, trim_interval=50)
    prompt = load_prompt()
    bench = runs.Bench(backend, None, [], 1, policy, prompt, job=run_job_of(backend))  # type: ignore[arg-type]
    before = JobSpec(strategy="conversation", policy=policy, keep_records=True, progress=False)
    assert bench.spec("conversation") == JobSpec(**{**vars_of(before), "desc": "performance"})
    scored = JobSpec(
        policy=policy, runner=RunnerConfig(score_mode="logprobs"), keep_records=True, progress=False
    )
    assert bench.spec(runner=RunnerConfig(score_mode="logprobs")) == JobSpec(
        **{**vars_of(scored), "desc": "performance"}
    )


def vars_of(spec: JobSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in JobSpec.__dataclass_fields__}


def test_measure_runs_every_variant_each_round_on_its_path(tmp_path: Path) -> None:
    backend, batched = PathDouble(), PathDouble(n_slots=2)
    direct_calls: list[tuple[int, bool]] = []

    async def direct(b: Backend, its: Sequence[WorkItem], cache_prompt: bool) -> DirectResult:
        assert b is backend
        direct_calls.append((len(its), cache_prompt))
        return DirectResult(len(its), 0.5 if cache_prompt else 5.0)

    rounds, n = 2, 2
    pool = items(n * rounds * len(runs.VARIANTS) + 40)
    figures = asyncio.run(
        runs.measure(
            backend, batched, pool, load_prompt(), rounds, n, OPTS,
            job=run_job_of(backend), plots_dir=tmp_path, direct=direct,
        )
    )  # fmt: skip
    assert set(figures["rounds"]) == {*runs.ROUND_ORDER, "batched"}
    assert all(len(rows) == rounds for rows in figures["rounds"].values())
    for v in ("tokens", "chat", "text", "conversation", "decode", "logprobs"):
        assert all("bound_s" in r and "efficiency" in r for r in figures["rounds"][v])
    # the direct client once a round with the cache on, the naive client once with it off
    assert direct_calls == [(n, True)] * rounds + [(min(n, 3), False)]
    tokens_rps = statistics.median(r["throughput_rps"] for r in figures["rounds"]["tokens"])
    assert figures["cached_over_naive"] == pytest.approx(tokens_rps / (min(n, 3) / 5.0))
    assert {"tokens", "chat", "text"} <= set(backend.paths)
    # the same replies on the token and text paths (the double answers by content), primer out
    replies = figures["replies"]["tokens_vs_text"]
    assert replies["items"] == OPTS["reply_items"] and replies["same_reply"] == 1.0
    assert figures["score_agreement_rows"] == OPTS["agreement_items"]
    assert set(figures["ratios"]) >= set(runs.RATIOS)
    assert [Path(p).name for p in figures["plots"]] == [
        "throughput_latency_tokens.png",
        "request_breakdown.png",
    ]
    assert all(Path(p).exists() for p in figures["plots"])
    assert batched.calls > 0  # the batched bound ran on its own server


class FakeServers:
    """`runs.Servers` over doubles: what was started, each server's job, what was released."""

    def __init__(self) -> None:
        self.started: list[tuple[int, int, str]] = []
        self.released: list[Backend] = []
        self.up: list[Backend] = []
        self.jobs = 0
        self.loop = asyncio.new_event_loop()

    def start(self, *, parallel: int, concurrency: int, request_path: str) -> Backend:
        self.started.append((parallel, concurrency, request_path))
        backend = PathDouble(n_slots=parallel)
        backend.request_path = request_path
        self.up.append(backend)
        return backend

    def job(self, backend: Backend) -> JobSpec:
        self.jobs += 1
        return run_job_of(backend)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def release(self, backend: Backend) -> None:
        self.released.append(backend)


def test_the_sweep_runs_every_cell_each_round_and_releases_every_server() -> None:
    servers = FakeServers()
    try:
        out = runs.sweeps(servers, items(120), OPTS)
    finally:
        servers.loop.close()
    assert servers.started == [
        (1, 1, "chat"), (1, 1, "tokens"), (2, 2, "chat"), (2, 2, "tokens"), (1, 1, "tokens"),
    ]  # fmt: skip
    assert sorted(map(id, servers.released)) == sorted(map(id, servers.up))
    cells = {(c["slots"], c["request_path"], c["concurrency"]) for c in out["overlap"]}
    assert cells == {(s, p, c) for s in (1, 2) for p in ("chat", "tokens") for c in (1, 2, 4)}
    assert all(len(c["rounds"]) == OPTS["sweep_rounds"] for c in out["overlap"])
    assert all(c["errors"] == 0 and c["throughput_rps"] > 0 for c in out["overlap"])
    assert [r["interval"] for r in out["trim_intervals"]] == OPTS["trim_intervals"]
    assert out["sweep_rounds"] == OPTS["sweep_rounds"]
    # each warm-up, cell and interval run is the server's run job (spec_for) with its changes
    assert servers.jobs == 4 + len(cells) * OPTS["sweep_rounds"] + len(OPTS["trim_intervals"])


def test_conclude_picks_the_settings_from_the_figures() -> None:
    figures: dict[str, Any] = {
        "tokens_over_chat": 1.05,
        "tokens_over_chat_ceiling": 1.1,
        "logprobs_over_decode": 1.5,
        "score_agreement": 0.99,
        "overlap": [
            {"slots": 1, "request_path": "tokens", "concurrency": 1, "throughput_rps": 1.0},
            {"slots": 2, "request_path": "tokens", "concurrency": 2, "throughput_rps": 2.0},
            {"slots": 2, "request_path": "chat", "concurrency": 2, "throughput_rps": 3.0},
        ],
        "trim_intervals": [
            {
                "interval": 10,
                "throughput_rps": 1.0,
                "token_savings": 0.8,
                "uncached_tokens_per_request": 90,
            },
        ],
        "rounds": {
            "tokens": [{"uncached": 300, "requests": 3}],
            "conversation": [{"uncached": 90, "requests": 3}],
        },
    }
    mode, why = runs.conclude(figures, max_slots=2)
    rec = figures["recommended"]
    # the path from the interleaved rounds (tokens won there), though chat's cell is faster
    assert (rec["REQUEST_PATH"], rec["parallel"], rec["CONCURRENCY"]) == ("tokens", 2, 2)
    assert rec["STRATEGY"] == "conversation" and rec["TRIM_INTERVAL"] == 10
    assert figures["uncached_tokens_per_request"] == {"stateless": 100, "conversation": 30}
    assert figures["tokens_over_chat_of_ceiling"] == pytest.approx(1.05 / 1.1)
    assert figures["tokens_over_chat_goal"] == runs.TOKENS_OVER_CHAT_GOAL
    assert (mode, rec["SCORE_MODE"]) == ("logprobs", "logprobs") and "99.0%" in why
    assert figures["max_slots_within_budget"] == 2


class InFlight(InProcessDouble):
    """The double, noting each request's row and the most requests in flight at once."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.01)
        self.now = self.most = 0
        self.sent: list[str] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.now += 1
        self.most = max(self.most, self.now)
        self.sent.append(str(request.messages[-1]["content"]))
        try:
            return await super().chat(request)
        finally:
            self.now -= 1


def test_on_a_server_it_does_not_start_the_sweep_measures_requests_in_flight() -> None:
    """Ollama's slots are its own: the cells are the client's concurrency, every one each round,
    on rows new to the server (a repeat would be served from its cache)."""
    opts = {**OPTS, "sweep_requests": 4}
    double = InFlight()
    pool = items(1 + 2 * 3 * 4)

    async def go() -> list[dict[str, Any]]:
        await double.start()
        try:
            return await runs.concurrency_cells(double, pool, run_job_of(double), opts)
        finally:
            await double.stop()

    cells = asyncio.run(go())
    assert [c["concurrency"] for c in cells] == [1, 2, 4]
    assert all(len(c["rounds"]) == 2 and c["errors"] == 0 for c in cells)
    assert double.most == 4  # the 4-cell held four requests at once
    assert len(double.sent) == len(set(double.sent)) == len(pool)  # every row new, once
    with pytest.raises(ValueError, match="needs 25 items, got 24"):
        asyncio.run(runs.concurrency_cells(double, pool[:-1], run_job_of(double), opts))


def test_the_concurrency_picked_is_the_fastest_clean_and_of_a_tie_the_lowest() -> None:
    def cell(c: int, rps: float, errors: int = 0) -> dict[str, Any]:
        return {"concurrency": c, "throughput_rps": rps, "errors": errors}

    assert runs.pick_concurrency([cell(1, 1.0), cell(2, 1.9), cell(4, 1.95)]) == 2
    assert runs.pick_concurrency([cell(1, 1.0), cell(2, 1.5), cell(4, 3.0)]) == 4
    assert runs.pick_concurrency([cell(1, 1.0), cell(2, 1.5), cell(4, 3.0, errors=1)]) == 2
