"""One job over several servers (`harness.backends.pool`): the dispatch logic on in-process
doubles and fake HTTP servers, fast. The same on real llama.cpp servers: test_pool_servers.py.

The doubles' figures (rows per endpoint, rates) are the dispatcher's behaviour against
simulated latencies, never measurements of a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.backends.base import Backend, ChatRequest
from harness.backends.openai import OpenAIBackend
from harness.backends.pool import PoolBackend
from harness.batch import BatchOptions, make_backend, run_batch
from harness.cli import main
from harness.engine import JobSpec, ResultsStore, RetryPolicy, RunnerConfig, run_job
from harness.engine.job import pending_items
from harness.engine.runner import Runner, duplicate_id
from harness.engine.store import read_results
from harness.engine.strategies import StatelessStrategy, TrimPolicy
from harness.engine.tokens import TokenCounter, estimate_tokenize
from harness.errors import BackendUnreachable, ConfigError, InputError, TransientServerError
from harness.models.templates import get_format
from harness.records import RequestRecord
from harness.run import execute
from harness.run.settings import RunConfig
from harness.testing import FaultConfig, FaultProxy, InProcessDouble
from harness.workload import WorkItem, write_candidates_csv

FAST_RETRY = RunnerConfig(retry=RetryPolicy(max_attempts=4, base_delay_s=0.001, max_delay_s=0.01))


def items(n: int, prefix: str = "r") -> list[WorkItem]:
    rubric = {"role": "system", "content": "Score the candidate from 1 to 10. " * 20}
    return [
        WorkItem(f"{prefix}{i}", (rubric, {"role": "user", "content": f"candidate {i}"}), 8)
        for i in range(n)
    ]


class Dying(InProcessDouble):
    """A double that stops answering (like a killed server) after `die_after` requests, and
    whose health check fails until `revive()`."""

    def __init__(self, die_after: int, error: type[Exception] = BackendUnreachable, **kw: Any):
        super().__init__(**kw)
        self.die_after = die_after
        self.error = error
        self.alive = True

    async def chat(self, request: ChatRequest) -> Any:
        if self.alive and self.calls >= self.die_after:
            self.alive = False
        if not self.alive:
            self.calls += 1
            raise self.error("connection refused (the double is down)")
        return await super().chat(request)

    async def health(self) -> bool:
        return self.alive

    def revive(self) -> None:
        self.alive = True
        self.die_after = 10**9


def spec(concurrency: int, strategy: str = "stateless", **kw: Any) -> JobSpec:
    return JobSpec(
        strategy=strategy,
        runner=RunnerConfig(
            concurrency=concurrency, retry=RetryPolicy(max_attempts=4, base_delay_s=0.001)
        ),
        progress=False,
        keep_records=True,
        **kw,
    )


def run(pool: Backend, work: list[WorkItem], job: JobSpec) -> Any:
    async def go() -> Any:
        async with pool:
            return await run_job(pool, work, job)

    return asyncio.run(go())


# -- routing ------------------------------------------------------------------------------------


def test_the_pool_shows_the_sum_of_the_slots_interleaved_across_servers() -> None:
    members = [InProcessDouble(n_slots=2), InProcessDouble(n_slots=1), InProcessDouble(n_slots=3)]
    pool = PoolBackend(members)
    asyncio.run(pool.start())
    assert pool.info.n_slots == 6 and pool.info.supports_slots
    names = pool.info.extra["endpoints"]
    assert len(set(names)) == 3  # the doubles share a URL: the names are made unique
    # Slot 0 on the first server, 1 on the second, 2 on the third, then their second slots:
    # any concurrency spreads evenly.
    assert [pool.endpoint_of(g) for g in range(6)] == [
        names[0], names[1], names[2], names[0], names[2], names[2]
    ]  # fmt: skip
    asyncio.run(pool.stop())


def test_a_fill_pool_uses_its_first_server_only_until_that_server_leaves() -> None:
    """The Ray executor's actors: their own server first, the others only as failover."""
    own, other = Dying(die_after=30, n_slots=2), InProcessDouble(n_slots=2)
    pool = PoolBackend([own, other], layout="fill")
    asyncio.run(pool.start())
    names = pool.info.extra["endpoints"]
    assert [pool.endpoint_of(g) for g in range(4)] == [names[0], names[0], names[1], names[1]]
    asyncio.run(pool.stop())
    result = run(PoolBackend([own, other], layout="fill"), items(100), spec(2))
    served = [r.endpoint for r in sorted(result.records, key=lambda r: r.started)]
    assert sorted(r.custom_id for r in result.records) == sorted(i.custom_id for i in items(100))
    first_other = served.index(names[1])
    assert first_other >= 28, "the other server is used only once the first one died"
    assert set(served[:first_other]) == {names[0]} and served[-1] == names[1]


def test_a_runner_fed_batch_by_batch_goes_on_with_its_conversations() -> None:
    """One Runner, several `run` calls (an actor's batches): the conversation is not restarted
    at each batch."""
    from harness.engine.strategies import make_strategy

    async def go() -> list[RequestRecord]:
        double = InProcessDouble(n_slots=1, n_ctx_per_slot=8192)
        out: list[RequestRecord] = []
        async with double:
            counter = TokenCounter(get_format("gemma"), estimate_tokenize(), source="estimate")
            strategy = make_strategy("conversation", TrimPolicy(max_context_tokens=8000))
            runner = Runner(double, strategy, counter, sinks=[out.append])
            work = items(48)
            for k in range(0, 48, 16):
                await runner.run(work[k : k + 16])
        return out

    records = asyncio.run(go())
    assert [r.turn for r in records] == list(range(48))


def test_each_worker_stays_on_one_server_and_every_id_runs_once() -> None:
    members = [InProcessDouble(n_slots=2, delay_s=0.001) for _ in range(3)]
    result = run(PoolBackend(members), items(600), spec(6))
    ids = [r.custom_id for r in result.records]
    assert sorted(ids) == sorted(it.custom_id for it in items(600))
    by_worker: dict[int, set[str | None]] = defaultdict(set)
    for r in result.records:
        by_worker[r.worker].add(r.endpoint)
    assert all(len(eps) == 1 for eps in by_worker.values()), by_worker
    assert len({r.endpoint for r in result.records}) == 3
    assert sum(m.calls for m in members) == 600
    rows = {ep["endpoint"]: ep["rows"] for ep in result.endpoints}
    assert sum(rows.values()) == 600 and min(rows.values()) > 150, rows
    assert result.metrics.extra["endpoints"].keys() == rows.keys()


def test_a_slot_moves_only_when_its_server_leaves_and_goes_home_only_at_a_conversation_start() -> (
    None
):
    pool = PoolBackend([InProcessDouble(n_slots=1) for _ in range(4)], health_interval_s=0)
    asyncio.run(pool.start())
    assert pool._pick(0, 0)[0] == 0
    pool._mark_down(0, "killed")
    moved = pool._pick(0, 3)[0]  # mid-conversation, but its server is gone: it must move
    assert moved != 0
    other = next(i for i in (1, 2, 3) if i != moved)
    pool._mark_down(other, "killed too")
    assert pool._pick(0, 4)[0] == moved  # another server leaving does not reshuffle it
    pool._mark_up(0)
    assert pool._pick(0, 5)[0] == moved  # home is back, but not in the middle of a conversation
    assert pool._pick(0, 0)[0] == 0  # a new conversation starts at home
    assert pool._pick(0, 1)[0] == 0
    pool._mark_down(moved, "gone")
    pool._mark_down(0, "gone again")
    last = pool._pick(0, 2)[0]
    assert last not in (0, moved, other)
    pool._mark_down(last, "the last one")
    with pytest.raises(BackendUnreachable, match="no server of the pool is left"):
        pool._pick(0, 0)
    with pytest.raises(BackendUnreachable, match="no server of the pool is left"):
        pool._pick(None)
    asyncio.run(pool.stop())


def test_conversations_move_only_when_their_server_dies_and_not_when_it_comes_back() -> None:
    """Server 1 dies at its 30th request and is taken back 40 ms later (a real health watch):
    a conversation on it moves once, to one other server; none moves when it comes back, yet
    new conversations start on it again."""
    dying = Dying(30, delay_s=0.001, n_slots=2, n_ctx_per_slot=2048)

    async def revive() -> None:
        while dying.alive:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.04)
        dying.revive()

    async def go() -> Any:
        members = [InProcessDouble(n_slots=2, n_ctx_per_slot=2048, delay_s=0.001)]
        pool = PoolBackend([members[0], dying, *members], health_interval_s=0.01)
        job = spec(6, strategy="conversation")
        job.policy = TrimPolicy(max_context_tokens=1500, trim_interval=4)
        async with pool:
            task = asyncio.create_task(revive())
            result = await run_job(pool, items(400), job)
            await task
            return result, pool.endpoints()

    (result, eps) = asyncio.run(go())
    ids = Counter(r.custom_id for r in result.records)
    assert len(ids) == 400 and set(ids.values()) == {1}
    assert all(r.ok for r in result.records)
    ep1 = eps[1]
    assert [e["event"] for e in ep1["events"]] == ["down", "up"], ep1
    down_at, back_at = ep1["down_at"], ep1["back_at"]
    conversations: dict[tuple[int, int], list[RequestRecord]] = defaultdict(list)
    restarts: dict[int, int] = defaultdict(int)
    for r in sorted(result.records, key=lambda r: (r.worker, r.started)):
        if r.turn == 0:
            restarts[r.worker] += 1
        conversations[(r.worker, restarts[r.worker])].append(r)
    moved = 0
    for conv in conversations.values():
        eps_seen = [r.endpoint for r in conv]
        changes = sum(a != b for a, b in itertools.pairwise(eps_seen))
        if changes:
            # only a conversation on the dead server, once, away from it, while it was down
            assert changes == 1 and eps_seen[0] == ep1["endpoint"], eps_seen
            moved += 1
    assert moved >= 1, "the test must catch a conversation on the server when it dies"
    assert [r for r in result.records if r.endpoint == ep1["endpoint"] and r.started > back_at]
    assert not [
        r
        for r in result.records
        if r.endpoint == ep1["endpoint"] and down_at < r.started and r.finished < back_at
    ]


def test_a_slots_first_request_on_another_server_is_cold_in_the_theoretical_maximum() -> None:
    """Each server warms its own prefix cache: after a slot moved (its server left, or it went
    back to one that came back with an empty cache) its reuse bound is the server's report."""
    counter = TokenCounter(get_format("gemma"), estimate_tokenize(), source="estimate")
    runner = Runner(InProcessDouble(), StatelessStrategy(), counter)
    ids = list(range(100))
    key = ("slot", 0)
    runner._last[key] = (ids, 5, "http://a")
    assert runner._reusable(key, ids, 0, "http://a") == 99  # same server: what it held
    assert runner._reusable(key, ids, 0, "http://b") == 0  # another: only what it reports
    assert runner._reusable(key, ids, 40, "http://b") == 40


def test_a_slow_server_gets_fewer_rows_than_round_robin_would_give_it() -> None:
    members = [InProcessDouble(delay_s=0.002), InProcessDouble(delay_s=0.002)]
    members.append(InProcessDouble(delay_s=0.010))  # five times slower
    result = run(PoolBackend(members), items(600), spec(3))
    split = Counter(r.endpoint for r in result.records)
    slow = split[result.endpoints[2]["endpoint"]]
    fast = min(split[result.endpoints[k]["endpoint"]] for k in (0, 1))
    print(f"\nrows per endpoint (doubles, 2/2/10 ms): {dict(split)}")
    assert slow < 0.5 * fast and slow < 600 / 3 / 2, split


def test_every_conversation_stays_on_one_server() -> None:
    members = [InProcessDouble(n_slots=2, n_ctx_per_slot=2048, delay_s=0.001) for _ in range(2)]
    job = spec(4, strategy="conversation")
    job.policy = TrimPolicy(max_context_tokens=1500, trim_interval=5)
    result = run(PoolBackend(members), items(200), job)
    conversations: dict[tuple[int, int], set[str | None]] = defaultdict(set)
    restarts: dict[int, int] = defaultdict(int)
    for r in sorted(result.records, key=lambda r: (r.worker, r.started)):
        if r.turn == 0:
            restarts[r.worker] += 1
        conversations[(r.worker, restarts[r.worker])].add(r.endpoint)
    assert len(conversations) > 8, "the conversations must restart for the test to mean much"
    assert all(len(eps) == 1 for eps in conversations.values()), conversations
    assert len({r.endpoint for r in result.records}) == 2


# -- failures -----------------------------------------------------------------------------------


class Relaunching(Dying):
    """A member that dies on `kill()` and whose `start()` brings it back (as an embedded
    member relaunches a server that died), or fails when `broken`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(10**9, **kw)
        self.starts = 0
        self.broken = False

    async def start(self) -> None:
        self.starts += 1
        if self.broken:
            raise BackendUnreachable("the model server would not start (the double is broken)")
        self.revive()

    def kill(self) -> None:
        self.alive = False


def test_starting_a_started_pool_again_relaunches_the_members_that_died_and_takes_them_back() -> (
    None
):
    """The API worker calls `start()` again after a failed batch: a member that died is
    started again and routed to again; one that answers is not touched; one that cannot start
    stays out with its reason; with none left, `start()` raises naming each member's reason."""
    ok, dead, broken = (Relaunching(delay_s=0.002) for _ in range(3))

    async def go() -> None:
        pool = PoolBackend([ok, dead, broken], health_interval_s=0, misses_allowed=1)
        await pool.start()
        assert (ok.starts, dead.starts, broken.starts) == (1, 1, 1)
        dead.kill()
        broken.kill()
        broken.broken = True
        await pool.check_health()
        assert [e.up for e in pool._eps] == [True, False, False]
        await pool.start()
        assert (ok.starts, dead.starts, broken.starts) == (1, 2, 2)
        assert [e.up for e in pool._eps] == [True, True, False]
        eps = pool.endpoints()
        assert [ev["event"] for ev in eps[1]["events"]] == ["down", "up"]
        assert eps[2]["events"][-1]["event"] == "start failed"
        assert "could not start again: the model server would not start" in str(
            eps[2]["events"][-1]["reason"]
        )
        # the relaunched member is routed to again
        await run_job(pool, items(12), spec(3))
        assert dead.calls > 0
        ok.kill()
        dead.kill()
        await pool.check_health()
        ok.broken = dead.broken = True
        with pytest.raises(BackendUnreachable, match="no server of the pool is left"):
            await pool.start()
        await pool.stop()

    asyncio.run(go())


def test_a_server_that_stops_answering_is_taken_out_and_its_rows_go_to_the_others() -> None:
    members = [InProcessDouble(delay_s=0.001), Dying(100, delay_s=0.001)]
    members.append(InProcessDouble(delay_s=0.001))
    t0 = time.time()
    result = run(PoolBackend(members, health_interval_s=0), items(600), spec(3))
    ids = Counter(r.custom_id for r in result.records)
    assert len(ids) == 600 and set(ids.values()) == {1}
    assert all(r.ok for r in result.records)
    dead = result.endpoints[1]
    assert dead["up"] is False and dead["down_at"] >= t0
    assert "BackendUnreachable" in dead["down_reason"]
    assert dead["rows"] == 100 and dead["down_after_requests"] >= 100
    assert dead["down_after_s"] >= 0
    assert not [
        r for r in result.records if r.endpoint == dead["endpoint"] and r.started > dead["down_at"]
    ]
    assert {ep["rows"] for ep in result.endpoints[::2]} != {0}


def test_a_reset_on_a_server_that_then_fails_its_health_check_moves_the_request() -> None:
    """What a request in flight on a SIGKILLed server sees: a reset (transient), then nothing
    listens. The pool asks /health, takes the server out and sends the request elsewhere at once
    (the runner sees one attempt)."""
    flaky = Dying(50, error=TransientServerError, delay_s=0.001)
    members = [InProcessDouble(delay_s=0.001), flaky]
    result = run(PoolBackend(members, health_interval_s=0), items(200), spec(2))
    assert sorted(r.custom_id for r in result.records) == sorted(f"r{i}" for i in range(200))
    assert all(r.ok and r.attempts == 1 for r in result.records)
    assert result.endpoints[1]["up"] is False
    assert "then no answer to /health" in result.endpoints[1]["down_reason"]


def test_a_transient_error_on_a_healthy_server_stays_the_runners_to_retry() -> None:
    calls = {"n": 0}

    def fail(n: int, req: ChatRequest) -> Exception | None:
        calls["n"] += 1
        return TransientServerError("503 once") if n == 3 else None

    members = [InProcessDouble(fail=fail), InProcessDouble()]
    result = run(PoolBackend(members, health_interval_s=0), items(20), spec(2))
    assert all(r.ok for r in result.records)
    assert sum(r.attempts for r in result.records) == 21  # one retry, by the runner
    assert all(ep["up"] for ep in result.endpoints)
    assert sum(ep["failures"] for ep in result.endpoints) == 1


def test_a_server_that_answers_again_is_taken_back() -> None:
    dying = Dying(5, delay_s=0.001)

    async def go() -> tuple[list[dict[str, Any]], Counter[str | None], str]:
        pool = PoolBackend([InProcessDouble(delay_s=0.001), dying], health_interval_s=0)
        async with pool:
            first = await run_job(pool, items(40, "a"), spec(2))
            assert pool.endpoints()[1]["up"] is False
            await pool.check_health()  # still down: stays out
            assert pool.endpoints()[1]["up"] is False
            dying.revive()
            await pool.check_health()
            back = pool.endpoints()
            second = await run_job(pool, items(40, "b"), spec(2))
            name = pool.endpoints()[1]["endpoint"]
            assert sorted(r.custom_id for r in first.records) == sorted(f"a{i}" for i in range(40))
            # The second run's report is the second run's: no history from the first.
            assert second.endpoints[1]["events"] == [] and second.endpoints[1]["down_at"] is None
            assert sum(ep["requests"] for ep in second.endpoints) == 40
            return back, Counter(r.endpoint for r in second.records), name

    eps, split, name = asyncio.run(go())
    assert eps[1]["up"] is True and eps[1]["back_at"] >= eps[1]["down_at"]
    assert [e["event"] for e in eps[1]["events"]] == ["down", "up"]
    assert split[name] > 0, split


class Hung(InProcessDouble):
    """A server that accepts connections but no longer answers (a stuck GPU, SIGSTOP)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.hung = False

    async def health(self) -> bool:
        if self.hung:
            await asyncio.sleep(3600)
        return True


def test_a_live_server_that_misses_its_health_checks_is_taken_out() -> None:
    async def go() -> list[dict[str, Any]]:
        hung = Hung()
        pool = PoolBackend([InProcessDouble(), hung], health_interval_s=0, health_timeout_s=0.05)
        async with pool:
            await pool.check_health()
            assert all(ep["up"] for ep in pool.endpoints())
            hung.hung = True
            await pool.check_health()  # one miss: still in
            assert pool.endpoints()[1]["up"] is True
            await pool.check_health()  # two in a row: out
            return pool.endpoints()

    eps = asyncio.run(go())
    assert eps[1]["up"] is False and "missed 2 health checks" in eps[1]["down_reason"]
    assert eps[0]["up"] is True


def test_a_moved_slot_lands_on_an_idle_slot_of_the_server_it_moves_to() -> None:
    async def go() -> tuple[str, int | None, set[int | None]]:
        a, b = InProcessDouble(n_slots=4), InProcessDouble(n_slots=4)
        pool = PoolBackend([a, b], health_interval_s=0)
        async with pool:
            # Two workers on the first server's slots 0 and 1 (global 0 and 2), one on b.
            for g in (0, 2, 1):
                await pool.chat(ChatRequest(items(1)[0].messages, 8, slot=g))
            pool._mark_down(1, "test")
            i, local = pool._pick(1, 0)
            busy = {pool._route[g][1] for g in (0, 2)}
            return pool._eps[i].name, local, busy

    _, local, busy = asyncio.run(go())
    assert local is not None and local not in busy, (local, busy)


def test_a_stopped_pool_starts_again() -> None:
    async def go() -> tuple[bool, bool, int]:
        pool = PoolBackend([InProcessDouble(), InProcessDouble()], health_interval_s=0)
        async with pool:
            pass
        after_stop = await pool.health()
        async with pool:
            res = await run_job(pool, items(10), spec(2))
            return after_stop, await pool.health(), len(res.records)

    after_stop, again, n = asyncio.run(go())
    assert after_stop is False and again is True and n == 10


def test_the_ray_driver_merges_each_actors_account_of_the_servers() -> None:
    from harness.rayexec import merge_accounts

    specs = [{"base_url": "http://a"}, {"base_url": "http://b"}]
    down = {"event": "down", "at": 105.0, "reason": "killed"}
    accounts = {
        0: [
            {"endpoint": "http://a", "slots": 1, "up": True, "requests": 50, "ok": 50,
             "failures": 0, "down_at": None, "events": []},
            {"endpoint": "http://b", "slots": 1, "up": False, "requests": 0, "ok": 0,
             "failures": 0, "down_at": 110.0, "down_reason": "late", "events": [
                 {"event": "down", "at": 110.0, "reason": "late"}]},
        ],
        1: [
            {"endpoint": "http://a", "slots": 1, "up": True, "requests": 20, "ok": 20,
             "failures": 0, "down_at": None, "events": []},
            {"endpoint": "http://b", "slots": 1, "up": False, "requests": 31, "ok": 30,
             "failures": 1, "down_at": 105.0, "down_reason": "killed",
             "down_after_requests": 60, "events": [down]},
        ],
    }  # fmt: skip
    a, b = merge_accounts(specs, accounts)
    assert a["up"] and a["requests"] == 70 and a["down_at"] is None
    assert b["up"] is False and b["down_at"] == 105.0 and b["down_reason"] == "killed"
    assert b["down_after_requests"] == 60 and b["failures"] == 1 and b["requests"] == 31
    assert [e["at"] for e in b["events"]] == [105.0, 110.0]
    assert merge_accounts(specs, {})[0]["up"] is True


def test_with_no_server_left_the_run_stops_and_the_rest_resumes_later(tmp_path: Path) -> None:
    members = [Dying(10), Dying(10)]
    job = spec(2, results_path=tmp_path / "r.jsonl")
    with pytest.raises(BackendUnreachable, match="no server of the pool is left"):
        run(PoolBackend(members, health_interval_s=0), items(100), job)
    done = [line["custom_id"] for line in read_results(tmp_path / "r.jsonl")]
    assert len(done) == 20 == len(set(done))
    result = run(PoolBackend([InProcessDouble(), InProcessDouble()]), items(100), job)
    assert result.skipped == 20 and result.ran == 80
    assert sorted(line["custom_id"] for line in read_results(tmp_path / "r.jsonl")) == sorted(
        f"r{i}" for i in range(100)
    )


def test_token_counting_goes_to_a_live_server() -> None:
    down = Dying(0)

    async def failing_tokenize(texts: Any, parse_special: bool = False) -> Any:
        raise BackendUnreachable("down")

    down.tokenize = failing_tokenize  # type: ignore[method-assign]
    pool = PoolBackend([down, InProcessDouble()], health_interval_s=0)

    async def go() -> Any:
        async with pool:
            return await pool.tokenize(["hello world"]), pool.endpoints()

    ids, eps = asyncio.run(go())
    assert len(ids[0]) > 0 and eps[0]["up"] is False


def test_the_pool_refuses_servers_of_different_models() -> None:
    other = InProcessDouble()
    other.info.model = "another"
    with pytest.raises(ConfigError, match="one model"):
        asyncio.run(PoolBackend([InProcessDouble(), other]).start())


# -- fake HTTP servers: the real client's failures ------------------------------------------------


class _FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FakeHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.open.add(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"data": [{"id": "fake"}]})
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        time.sleep(0.002)
        self._json(
            200,
            {
                "choices": [{"message": {"content": '{"score": 5}'}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10_000, "completion_tokens": 4},
            },
        )


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeOpenAI)
        self.open: set[socket.socket] = set()


class FakeServer:
    def __init__(self) -> None:
        self.httpd = _FakeHTTPServer()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def kill(self) -> None:
        """Like a killed server: stop listening (new connections are refused) and reset every
        open connection (requests in flight get no reply)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in list(self.httpd.open):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)  # acts on the socket now (close() may wait)


@pytest.fixture
def fakes() -> Iterator[Callable[[int], list[FakeServer]]]:
    made: list[FakeServer] = []

    def make(n: int) -> list[FakeServer]:
        made.extend(FakeServer() for _ in range(n))
        return made[-n:]

    yield make
    for f in made:
        if f.thread.is_alive():
            f.kill()


def test_a_killed_http_server_is_taken_out_through_the_real_client(
    fakes: Callable[[int], list[FakeServer]],
) -> None:
    servers = fakes(3)
    members = [OpenAIBackend(s.url, api_key_env=None) for s in servers]
    pool = PoolBackend(members, per_endpoint=2, health_interval_s=0)

    def kill_at(rec: RequestRecord) -> None:
        if sum(1 for _ in done) == 150:
            servers[0].kill()
        done.append(rec)

    done: list[RequestRecord] = []

    # The fakes have no tokenizer: count by estimate (no packaged-tokenizer helper server).
    counter = TokenCounter(get_format("gemma"), estimate_tokenize(), source="estimate")

    async def go() -> Any:
        async with pool:
            return await run_job(pool, items(400), spec(6), sinks=[kill_at], counter=counter)

    result = asyncio.run(go())
    assert sorted(r.custom_id for r in result.records) == sorted(f"r{i}" for i in range(400))
    assert [r.error for r in result.records if not r.ok] == []
    first = result.endpoints[0]
    assert first["endpoint"] == servers[0].url and first["up"] is False
    assert "BackendUnreachable" in first["down_reason"] or "/health" in first["down_reason"]
    assert all(ep["up"] for ep in result.endpoints[1:])


# -- the batch tool and the command line --------------------------------------------------------


def test_several_base_urls_make_a_pool_with_one_member_per_url() -> None:
    opts = BatchOptions(
        Path("x.csv"), backend="openai", base_url="http://a:1/v1,http://b:2", concurrency=3
    )
    backend = make_backend(opts)
    assert isinstance(backend, PoolBackend) and backend.per_endpoint == 3
    assert [m.info.base_url for m in backend.members] == ["http://a:1", "http://b:2"]
    one = make_backend(BatchOptions(Path("x.csv"), backend="openai", base_url="http://a:1"))
    assert not isinstance(one, PoolBackend)


def test_servers_share_the_cores_unless_threads_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert BatchOptions(Path("x"), servers=3).pool_threads()[0] == 1
    assert BatchOptions(Path("x"), servers=2).pool_threads()[0] == 1
    assert BatchOptions(Path("x"), servers=3, threads=2).pool_threads() == (2, "command line")
    assert BatchOptions(Path("x")).pool_threads()[0] is None  # one server: llama.cpp's default
    pool = make_backend(BatchOptions(Path("x"), model="tiny-gemma3", servers=3))
    assert isinstance(pool, PoolBackend) and len(pool.members) == 3
    assert all(m.settings.threads == 1 for m in pool.members)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"servers": 0}, "--servers 0 must be at least 1"),
        ({"servers": 2, "backend": "ollama"}, "--servers starts embedded servers"),
        ({"backend": "openai", "base_url": "http://a,http://a"}, "names a server twice"),
        ({"executor": "dask"}, "--executor 'dask' is not known"),
        ({"ray_address": "auto"}, "--ray-address is for --executor ray"),
    ],
)
def test_bad_pool_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchOptions(Path("x.csv"), **kwargs).validate()


def test_harness_run_over_a_pool_writes_each_rows_endpoint_and_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    src = write_candidates_csv(tmp_path / "c.csv", 90)
    built: list[PoolBackend] = []

    def make(cfg: RunConfig) -> PoolBackend:
        assert cfg.servers.value == 3 and cfg.pool_size == 3
        pool = PoolBackend([InProcessDouble(delay_s=0.001) for _ in range(3)])
        built.append(pool)
        return pool

    monkeypatch.setattr(execute, "open_backend", make)
    assert main(["run", str(src), "--servers", "3", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    lines = list(read_results(tmp_path / "c_results.jsonl"))
    assert len(lines) == 90 == len({ln["custom_id"] for ln in lines})
    names = set(built[0].info.extra["endpoints"])
    assert {ln["harness"]["endpoint"] for ln in lines} == names
    assert sum(line.startswith("endpoint ") for line in out.splitlines()) == 3
    assert "servers: 3 (--servers, command line)" in err
    report = json.loads((tmp_path / "c_results.endpoints.json").read_text())
    assert sum(ep["rows"] for ep in report["endpoints"]) == 90
    assert {ep["endpoint"] for ep in report["endpoints"]} == names


def test_one_server_writes_no_endpoint_field_and_no_endpoint_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_candidates_csv(tmp_path / "c.csv", 10)
    monkeypatch.setattr(execute, "open_backend", lambda cfg: InProcessDouble())
    result = run_batch(BatchOptions(src, progress=False))
    assert result.done == 10 and result.endpoints == [] and result.endpoint_lines() == []
    assert all("endpoint" not in ln["harness"] for ln in read_results(result.results_path))
    assert not (tmp_path / "c_results.endpoints.json").exists()


def test_base_url_may_be_given_several_times_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_candidates_csv(tmp_path / "c.csv", 4)
    seen: list[RunConfig] = []

    def make(cfg: RunConfig) -> InProcessDouble:
        seen.append(cfg)
        return InProcessDouble()

    monkeypatch.setattr(execute, "open_backend", make)
    argv = ["run", str(src), "--backend", "openai", "--no-progress", "--base-url", "http://a:1"]
    assert main([*argv, "--base-url", "http://b:2,http://c:3"]) == 0
    assert seen[0].endpoints.value == ("http://a:1", "http://b:2", "http://c:3")
    assert seen[0].pool_size == 3


# -- the engine keeps no state per item ----------------------------------------------------------


def test_the_duplicate_check_of_a_large_run_finds_the_one_duplicate() -> None:
    class Lazy:
        def __init__(self, n: int, twice: int | None) -> None:
            self.n, self.twice = n, twice

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, k: int) -> WorkItem:
            if not 0 <= k < self.n:
                raise IndexError(k)
            cid = f"id{self.twice if k == self.n - 1 and self.twice is not None else k}"
            return WorkItem(cid, ())

    assert duplicate_id(Lazy(70_000, None)) is None  # type: ignore[arg-type]
    assert duplicate_id(Lazy(70_000, 123)) == "id123"  # type: ignore[arg-type]
    assert duplicate_id(items(3) + items(1)) == "r0"


def test_a_duplicate_id_is_refused_before_anything_is_sent() -> None:
    double = InProcessDouble()
    with pytest.raises(InputError, match="appears twice"):
        run(double, items(5) + items(1), spec(1))
    assert double.calls == 0


def test_pending_items_are_a_view_not_a_copy(tmp_path: Path) -> None:
    work = items(10)
    with ResultsStore(tmp_path / "r.jsonl") as store:
        assert pending_items(work, store) is work
        for k in (0, 3, 4):
            store.write(RequestRecord(work[k].custom_id, "ok"))
        view = pending_items(work, store)
        assert len(view) == 7
        assert [it.custom_id for it in view] == [f"r{k}" for k in (1, 2, 5, 6, 7, 8, 9)]
        assert [it.custom_id for it in view[2:4]] == ["r5", "r6"]


# -- the slowing proxy ----------------------------------------------------------------------------


def test_the_fault_proxy_makes_a_server_look_n_times_slower(
    fakes: Callable[[int], list[FakeServer]],
) -> None:
    (server,) = fakes(1)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with (
        FaultProxy(server.url, FaultConfig(slow=5.0)) as proxy,
        httpx.Client(base_url=proxy.url, timeout=10, trust_env=False) as client,
    ):
        t0 = time.perf_counter()
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        slowed = time.perf_counter() - t0
        assert client.get("/health").status_code == 200  # other paths are not slowed
        stats = proxy.stats
    assert stats.slowed == 1 and stats.forwarded == 2
    assert slowed >= 5 * 0.002  # the upstream sleeps 2 ms: held at least 4 × that more
    with pytest.raises(ValueError, match="slow must be a factor >= 1"):
        FaultConfig(slow=0.5)


def test_per_server_latency_percentiles_are_within_two_percent_in_constant_memory() -> None:
    import random

    from harness.metrics import EndpointTally, percentile

    rng = random.Random(5)
    values = [rng.lognormvariate(3, 1) for _ in range(20_000)]
    tally = EndpointTally()
    for k, v in enumerate(values):
        tally.add(RequestRecord(f"x{k}", "ok", latency_ms=v, attempts=1))
    tally.add(RequestRecord("bad", "error", error_type="ParseError", attempts=2))
    exact = sorted(values)
    for q in (50, 95, 99):
        got, want = tally.percentile(q), percentile(exact, q)
        assert got is not None and want is not None
        assert abs(got - want) <= 0.021 * want, (q, got, want)
    figures = tally.figures(10.0)
    assert figures["rows"] == 20_001 and figures["errors"] == 1 and figures["retries"] == 1
    assert figures["latency_ms"]["max"] == max(values)
    assert len(tally.buckets) < 1000  # bounded by the latencies' range, not their number


# -- a pool from a scenario profile (the suites) ------------------------------------------------

POOL_SCENARIO = """\
name: p
phase: scale
profiles:
  three:
    backend: ollama
    model: gemma3:12b
    endpoints: [http://127.0.0.1:11434, http://127.0.0.1:11435, http://127.0.0.1:11436]
  cpu:
    backend: embedded
    model: tiny-gemma3
    servers: 2
  bad-embedded:
    backend: embedded
    endpoints: [http://127.0.0.1:1, http://127.0.0.1:2]
  bad-ollama:
    backend: ollama
    servers: 3
"""


def pool_config(tmp_path: Path, profile: str, **cli: Any) -> Any:
    from harness.config import load_profile
    from harness.run.resolve import resolve_run_config
    from harness.scenarios import load_scenario

    path = tmp_path / "p.yaml"
    path.write_text(POOL_SCENARIO)
    return resolve_run_config(
        profile=profile,
        config=load_profile(tmp_path / "none.yaml", profile),
        scenario=load_scenario(path),
        cli=cli,
    )


def test_a_profiles_endpoints_make_a_pool_with_per_server_concurrency(tmp_path: Path) -> None:
    cfg = pool_config(tmp_path, "three", concurrency=2)
    assert cfg.pool_size == 3 and cfg.total_concurrency == 6
    assert [o.base_url for o in cfg.member_specs()] == [
        "http://127.0.0.1:11434", "http://127.0.0.1:11435", "http://127.0.0.1:11436"
    ]  # fmt: skip
    assert cfg.endpoints.source == "scenario" and cfg.to_dict()["endpoints"]["value"]
    # The command line's comma list replaces the profile's.
    cli = pool_config(tmp_path, "three", base_url="http://127.0.0.1:9,http://127.0.0.1:8")
    assert cli.endpoints.value == ("http://127.0.0.1:9", "http://127.0.0.1:8")
    assert (cli.base_url.value, cli.endpoints.source) == ("http://127.0.0.1:9", "command line")
    emb = pool_config(tmp_path, "cpu")
    assert emb.pool_size == 2 and len(emb.member_specs()) == 2
    assert all(o.threads is not None and o.threads >= 1 for o in emb.member_specs())


@pytest.mark.parametrize(
    ("profile", "message"),
    [("bad-embedded", "set servers: N instead"), ("bad-ollama", "list each server's URL")],
)
def test_a_pool_profile_that_cannot_work_is_refused(
    tmp_path: Path, profile: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        pool_config(tmp_path, profile)


def test_a_server_given_more_slots_in_use_than_it_has_gets_no_pinned_request() -> None:
    """Two requests pinned to one busy llama.cpp slot crash or wedge the server (seen in the
    live SIGKILL test: the moved slot and the host's own worker both on slot 0): once a slot
    moves onto a server with no idle slot, every request to that server goes unpinned."""
    a, b = InProcessDouble(n_slots=1, delay_s=0.001), Dying(die_after=5, n_slots=1)
    result = run(PoolBackend([a, b], health_interval_s=0), items(40), spec(2))
    assert sorted(r.custom_id for r in result.records) == sorted(i.custom_id for i in items(40))
    assert a.requests[0][0] == 0  # while both were up: one worker per server, pinned
    assert a.requests[-1][0] is None and b.calls > 5  # after the move: unpinned
