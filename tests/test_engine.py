"""Engine logic on the in-process double: properties (hypothesis), retries, parsing, trims."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.backends.base import ChatRequest
from harness.engine import JobSpec, RetryPolicy, RunnerConfig, TrimPolicy, run_job
from harness.engine.job import JobResult
from harness.engine.tokens import TokenCounter
from harness.errors import (
    BackendUnreachable,
    ConfigError,
    ContextOverflow,
    ModelNotFound,
    TransientServerError,
)
from harness.models.templates import get_format
from harness.testing import InProcessDouble
from harness.workload import WorkItem

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.0001, max_delay_s=0.001)
SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["score"],
}


def make_items(
    n: int, *, system_words: int = 50, cand_words: Sequence[int] | None = None, max_tokens: int = 4
) -> list[WorkItem]:
    system = {"role": "system", "content": " ".join(f"rule{i}" for i in range(system_words))}
    sizes = cand_words or [5] * n
    return [
        WorkItem(
            f"id{i:04d}",
            (system, {"role": "user", "content": f"cand{i} " + " ".join(["w"] * sizes[i])}),
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]


def run(
    backend: InProcessDouble,
    items: list[WorkItem],
    *,
    strategy: str = "stateless",
    policy: TrimPolicy | None = None,
    concurrency: int = 1,
    retry: RetryPolicy = FAST_RETRY,
) -> JobResult:
    spec = JobSpec(
        strategy=strategy,
        policy=policy or TrimPolicy(max_context_tokens=100_000),
        runner=RunnerConfig(concurrency=concurrency, retry=retry),
        progress=False,
        keep_records=True,
    )
    return asyncio.run(run_job(backend, items, spec))


# -- properties -------------------------------------------------------------------------------

policies = st.builds(
    lambda max_ctx, frac, interval, keep: TrimPolicy(
        max_context_tokens=max_ctx,
        trim_threshold=max(1, int(max_ctx * frac)),
        trim_interval=interval,
        keep_last=keep,
    ),
    st.integers(120, 3000),
    st.floats(0.3, 1.0),
    st.one_of(st.none(), st.integers(1, 12)),
    st.integers(0, 3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies,
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=30),
    system_words=st.integers(1, 200),
    max_tokens=st.integers(1, 40),
    strategy=st.sampled_from(["stateless", "conversation"]),
    concurrency=st.integers(1, 3),
)
def test_engine_properties(
    policy: TrimPolicy,
    sizes: list[int],
    system_words: int,
    max_tokens: int,
    strategy: str,
    concurrency: int,
) -> None:
    items = make_items(
        len(sizes), system_words=system_words, cand_words=sizes, max_tokens=max_tokens
    )
    backend = InProcessDouble(n_slots=concurrency)
    result = run(backend, items, strategy=strategy, policy=policy, concurrency=concurrency)
    # Every id answered exactly once.
    assert sorted(r.custom_id for r in result.records) == [it.custom_id for it in items]
    # No request sent longer than MAX_CONTEXT_TOKENS (prompt + reply room).
    for _slot, prompt_tokens in backend.requests:
        assert prompt_tokens + max_tokens <= policy.max_context_tokens
    # Refused requests are exactly those that cannot fit even alone.
    for rec in result.records:
        if rec.status == "error":
            assert rec.error_type == "ContextOverflow"
            assert "MAX_CONTEXT_TOKENS" in (rec.error or "")
    # Savings never exceed the theoretical maximum, per request and overall.
    for rec in result.records:
        if rec.ok:
            assert (rec.cached_tokens or 0) <= rec.reusable_tokens
    m = result.metrics
    if m.token_savings is not None and m.token_savings_theoretical_max is not None:
        assert m.token_savings <= m.token_savings_theoretical_max + 1e-12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies,
    sizes=st.lists(st.integers(0, 120), min_size=1, max_size=30),
    system_words=st.integers(1, 100),
    max_tokens=st.integers(1, 20),
)
def test_trims_happen_exactly_when_the_policy_says(
    policy: TrimPolicy, sizes: list[int], system_words: int, max_tokens: int
) -> None:
    items = make_items(
        len(sizes), system_words=system_words, cand_words=sizes, max_tokens=max_tokens
    )
    backend = InProcessDouble()
    result = run(backend, items, strategy="conversation", policy=policy)

    # An independent model of the policy, in the order the single worker ran the items.
    counter = TokenCounter(get_format("gemma"), backend.tokenize, source="server")

    def count(msgs: list[Any]) -> int:
        return len(asyncio.run(counter.count(msgs))) + max_tokens

    prefix = list(items[0].prefix)
    history: list[Any] = []
    sent = 0
    expected: dict[str, str | None] = {}
    for item in items:
        turn = list(item.turn)
        reason = None
        if sent:
            if policy.trim_interval is not None and sent >= policy.trim_interval:
                reason = "interval"
            elif count(prefix + history + turn) > policy.threshold:
                reason = "threshold"
        if reason:
            history = history[-2 * policy.keep_last :] if policy.keep_last else []
            sent = 0
            if history and count(prefix + history + turn) > policy.threshold:
                history = []
        expected[item.custom_id] = reason
        if count(prefix + history + turn) <= policy.max_context_tokens:
            rec = next(r for r in result.records if r.custom_id == item.custom_id)
            history += [*turn, {"role": "assistant", "content": rec.content}]
            sent += 1
    assert {r.custom_id: r.trim for r in result.records} == expected
    assert result.metrics.context_trims == sum(1 for v in expected.values() if v)


def test_trim_interval_gives_the_roadmap_count() -> None:
    """1,000 requests with TRIM_INTERVAL 50 restart 19 times (the roadmap's '~20')."""
    result = run(
        InProcessDouble(),
        make_items(1000),
        strategy="conversation",
        policy=TrimPolicy(max_context_tokens=1_000_000, trim_interval=50),
    )
    assert result.metrics.context_trims == 19
    assert result.metrics.trims_by_reason == {"interval": 19}
    assert result.metrics.errors == 0


def test_conversation_saves_more_than_stateless_on_the_double() -> None:
    items = make_items(50, system_words=300)
    stateless = run(InProcessDouble(), items).metrics
    conversation = run(InProcessDouble(), items, strategy="conversation").metrics
    assert stateless.token_savings == pytest.approx(stateless.token_savings_theoretical_max)
    assert conversation.savings_efficiency == pytest.approx(1.0)
    assert (conversation.token_savings or 0) > (stateless.token_savings or 0) > 0.8


def test_workers_stay_on_their_slots() -> None:
    backend = InProcessDouble(n_slots=3, delay_s=0.001)  # a delay lets the workers interleave
    result = run(backend, make_items(30), concurrency=3)
    assert {r.slot for r in result.records} == {0, 1, 2}
    assert all(r.slot == r.worker for r in result.records)
    assert {slot for slot, _ in backend.requests} == {0, 1, 2}


def test_more_workers_than_slots_pin_none() -> None:
    """Requests pinned to a busy llama.cpp slot crash or wedge the server (runner docstring):
    with more workers than slots the server's own queue places every request."""
    backend = InProcessDouble(n_slots=1, delay_s=0.001)
    result = run(backend, make_items(12), concurrency=4)
    assert len({r.worker for r in result.records}) == 4
    assert {r.slot for r in result.records} == {None}
    assert {slot for slot, _ in backend.requests} == {None}


# -- failures ---------------------------------------------------------------------------------


def test_transient_failures_are_retried_then_recorded() -> None:
    def fail(call: int, request: ChatRequest) -> BaseException | None:
        content = request.messages[-1]["content"]
        if content.startswith("cand3 "):
            return TransientServerError("always 503", status_code=503)
        return TransientServerError("flaky", status_code=500) if call % 3 == 0 else None

    result = run(InProcessDouble(fail=fail), make_items(12))
    by_id = {r.custom_id: r for r in result.records}
    assert by_id["id0003"].status == "error"
    assert by_id["id0003"].attempts == FAST_RETRY.max_attempts
    assert by_id["id0003"].error_type == "TransientServerError"
    assert sum(r.ok for r in result.records) == 11
    assert result.metrics.retries >= 4


def test_unreachable_server_aborts_the_run_without_recording() -> None:
    def fail(call: int, request: ChatRequest) -> BaseException | None:
        return BackendUnreachable("cannot connect to http://127.0.0.1:1") if call > 5 else None

    with pytest.raises(BackendUnreachable, match=r"127\.0\.0\.1:1"):
        run(InProcessDouble(fail=fail), make_items(10))


def test_missing_model_aborts_at_once() -> None:
    def fail(call: int, request: ChatRequest) -> BaseException | None:
        return ModelNotFound("no model")

    with pytest.raises(ModelNotFound):
        run(InProcessDouble(fail=fail), make_items(3))


def test_unparseable_reply_is_retried_once_then_kept_raw() -> None:
    replies = iter(['{"score": 11}', "garbage", '{"score": 4}'])
    item = WorkItem("a", ({"role": "user", "content": "x"},), max_tokens=8, output_schema=SCHEMA)
    ok_item = WorkItem("b", ({"role": "user", "content": "y"},), max_tokens=8, output_schema=SCHEMA)
    result = run(InProcessDouble(reply=lambda r: next(replies)), [item, ok_item])
    a, b = sorted(result.records, key=lambda r: r.custom_id)
    assert a.status == "error" and a.error_type == "ParseError" and a.attempts == 2
    assert "raw reply: 'garbage'" in (a.error or "")
    assert b.ok and b.parsed == {"score": 4}


def test_server_context_overflow_trims_the_conversation_and_retries_once() -> None:
    backend = InProcessDouble(n_ctx_per_slot=300)
    items = make_items(12, system_words=60, cand_words=[40] * 12)
    result = run(backend, items, strategy="conversation")
    assert result.metrics.errors == 0
    assert result.metrics.trims_by_reason.get("overflow", 0) >= 1
    assert all(p + 4 <= 300 for _, p in backend.requests)


def test_a_request_too_long_alone_is_refused_locally() -> None:
    backend = InProcessDouble()
    items = make_items(3, cand_words=[1, 500, 1], max_tokens=10)
    result = run(backend, items, policy=TrimPolicy(max_context_tokens=200))
    by_id = {r.custom_id: r for r in result.records}
    assert by_id["id0001"].error_type == "ContextOverflow"
    assert "not sent" in (by_id["id0001"].error or "")
    assert len(backend.requests) == 2


def test_policy_validation_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="CONTEXT_TRIM_THRESHOLD = 9000"):
        TrimPolicy(max_context_tokens=8000, trim_threshold=9000).validate()
    with pytest.raises(ConfigError, match="TRIM_INTERVAL = 0"):
        TrimPolicy(trim_interval=0).validate()


def test_duplicate_ids_are_refused() -> None:
    items = make_items(2)
    with pytest.raises(Exception, match="appears twice"):
        run(InProcessDouble(), [items[0], items[0]])


def test_context_overflow_error_carries_counts() -> None:
    exc = ContextOverflow("x", prompt_tokens=10, n_ctx=5)
    assert (exc.prompt_tokens, exc.n_ctx) == (10, 5)
    assert Counter(["a"]) == Counter(["a"])
