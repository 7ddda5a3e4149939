"""The token counter: exact ids for every prompt, whatever its cache keeps or drops.

The regression this file guards: `pytest -m scale_10k` on the tiny model stopped at request
5,125 with `KeyError: piece not tokenized yet: 'user\\nYou are a senior technical recruite'`.
A small model repeats itself, so a conversation's prompt holds the same reply piece twice;
the counter pinned every such piece, and after 64 of them it dropped the oldest pin (the
rubric) in the middle of `count()`, after the rubric's entry had long left the LRU (a pinned
piece never refreshed it). The retry inside `count()` then found no rubric.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.backends.base import ChatRequest
from harness.engine import JobSpec, RunnerConfig, TrimPolicy, run_job
from harness.engine.tokens import TokenCounter
from harness.models.templates import get_format
from harness.testing import InProcessDouble, quad_tokenize
from harness.workload import WorkItem

GEMMA = get_format("gemma")
RUBRIC = "You are a senior technical recruiter. " + " ".join(f"rule{i}" for i in range(300))


def fresh_ids(messages: Sequence[dict[str, str]], *, generation: bool = True) -> list[int]:
    """What a tokenizer run on the whole rendered prompt gives (BOS first)."""
    text = GEMMA.render_text(messages, add_generation_prompt=generation)
    return list(quad_tokenize("<bos>", GEMMA.specials)) + list(quad_tokenize(text, GEMMA.specials))


def held_now(counter: TokenCounter) -> int:
    """The bytes of the counter's two tables, recounted from scratch."""
    tables = (counter._cache, counter._pinned)
    entries = sum(sys.getsizeof(k) + sys.getsizeof(v) for t in tables for k, v in t.items())
    return entries + sum(sys.getsizeof(t) for t in tables)


async def double_tokenize(texts: list[str], parse_special: bool) -> list[list[int]]:
    specials = GEMMA.specials if parse_special else ()
    return [list(quad_tokenize(t, specials)) for t in texts]


def test_repeated_replies_never_lose_the_rubric() -> None:
    """The scale phase's sequence in small: free-text replies that repeat within a
    conversation (each reply comes twice in a row), conversations restarted every 50
    requests, a small piece cache. The code before the fix raised KeyError on the rubric
    once 64 repeated replies had been pinned (request ~130 here)."""
    calls = {"n": 0}

    def repeating(request: ChatRequest) -> str:
        calls["n"] += 1
        return f"id id id TARGET{(calls['n'] - 1) // 2}"

    backend = InProcessDouble(reply=repeating)
    system = {"role": "system", "content": RUBRIC}
    items = [
        WorkItem(f"c{i:04d}", (system, {"role": "user", "content": f"candidate {i}"}), max_tokens=8)
        for i in range(400)
    ]
    counter = TokenCounter(GEMMA, backend.tokenize, source="server", cache_size=16)
    spec = JobSpec(
        strategy="conversation",
        policy=TrimPolicy(max_context_tokens=1_000_000, trim_interval=50),
        runner=RunnerConfig(prefetch=16),
        progress=False,
        keep_records=True,
    )
    result = asyncio.run(run_job(backend, items, spec, counter=counter))
    assert result.metrics.completed == 400, result.metrics.errors_by_type
    # Every count the engine made equals what the server saw.
    assert [r.expected_prompt_tokens for r in result.records] == [n for _, n in backend.requests]


# -- the property: any cache policy, exact ids -------------------------------------------------

replies = st.sampled_from(["a b", "id id id", '{"score": 7}', "x", "hello there", "a b c d e"])


@st.composite
def runs(draw: st.DrawFn) -> list[tuple[str, object]]:
    """A sequence of what the engine does with a counter: prefetch, count a turn (with
    replies that repeat), restart a conversation (trim), start a new rubric (restart)."""
    ops: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["prefetch", "turn", "turn", "turn", "trim", "restart"]))
        if kind == "turn":
            ops.append((kind, (draw(st.integers(0, 30)), draw(replies))))
        elif kind == "prefetch":
            ops.append((kind, draw(st.lists(st.integers(0, 30), min_size=1, max_size=6))))
        else:
            ops.append((kind, draw(st.integers(0, 3))))
    return ops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=runs(), cache_size=st.integers(0, 6), pin_cap=st.integers(0, 3))
def test_count_is_exact_whatever_the_cache_drops(
    ops: list[tuple[str, object]], cache_size: int, pin_cap: int
) -> None:
    counter = TokenCounter(
        GEMMA, double_tokenize, source="double", cache_size=cache_size, pin_cap=pin_cap
    )
    rubric = {"role": "system", "content": RUBRIC}
    history: list[dict[str, str]] = []

    async def go() -> None:
        nonlocal rubric, history
        for kind, arg in ops:
            if kind == "prefetch":
                assert isinstance(arg, list)
                prompts = [[rubric, {"role": "user", "content": f"cand {k}"}] for k in arg]
                await counter.prepare(prompts)
                for p in prompts:
                    assert list(await counter.count(p)) == fresh_ids(p)
            elif kind == "turn":
                assert isinstance(arg, tuple)
                k, reply = arg
                turn = {"role": "user", "content": f"cand {k}"}
                messages = [rubric, *history, turn]
                assert list(await counter.count(messages)) == fresh_ids(messages)
                history += [turn, {"role": "assistant", "content": reply}]
            elif kind == "trim":
                assert isinstance(arg, int)
                history = history[len(history) - 2 * arg :] if arg else []
            else:
                assert isinstance(arg, int)
                rubric = {"role": "system", "content": f"{RUBRIC} v{arg}"}
                history = []
            # A plain text (a reply) counts exactly too.
            assert list(await counter.text_ids("id id id")) == list(quad_tokenize("id id id"))
            # What the tables hold is what they hold now, whatever came in, moved or left.
            assert counter.held_bytes() == held_now(counter)
            assert len(counter._cache) <= cache_size and len(counter._pinned) <= pin_cap
        # The rubric of the run is never lost while it is in use.
        prefix = await counter.count([rubric], add_generation_prompt=False)
        assert list(prefix) == fresh_ids([rubric], generation=False)

    asyncio.run(go())
