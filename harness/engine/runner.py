"""The async runner: bounded concurrency, slot affinity, retries, exactly-once recording.

Each of `concurrency` workers takes the next work item, plans it with the strategy (its own
rolling conversation, for `conversation`), and sends it. With several llama.cpp slots a worker
stays on one slot (`id_slot`), so its prefix stays cached there — when each worker can have a
slot of its own. With more workers than slots nothing is pinned and the server's queue serves
them: requests pinned to a slot that is busy crash llama-server (`GGML_ASSERT(batch.size() >
0)`, server-context.cpp:4022, in the packaged build) or wedge it (a deferred task requeued in
a loop, the slot never decoding), seen with 2 and 4 requests in flight on 1 slot. Failures:

- transient (connection reset or refused, 429/5xx, timeouts, truncated bodies): retried with
  exponential backoff and jitter, up to `RetryPolicy.max_attempts`; then recorded as the row's
  error — except an unreachable server, which aborts the run (nothing is recorded for the rows
  left, so the next run resumes them);
- a context overflow reported by the server: the conversation is trimmed and the request sent
  once more; a request too long even alone is the row's error (never sent);
- a reply that does not parse under the output schema: sent once more, then recorded as the
  row's error with the raw text;
- anything else (model not found, HTTP 4xx): recorded, not retried; a missing model aborts.

Every record goes to the sinks (store, metrics, progress) as soon as it exists.

The runner keeps no state per item: `items` may be a lazy sequence (its items are made when
taken, `prefetch` at a time), and the check that no id appears twice keeps 8 bytes per item
for its duration (a hash each), not the ids.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from harness.backends.base import Backend, ChatRequest, ChatResult, Usage
from harness.backends.completion import chat_completion
from harness.engine.logprobs import LogprobScorer, logprobs_unavailable, probe_requests
from harness.engine.strategies import Conversation, ConversationStrategy, Strategy
from harness.engine.tokens import TokenCounter, TokenSeq, common_prefix_len
from harness.errors import (
    BackendUnreachable,
    ContextOverflow,
    HarnessError,
    InputError,
    ModelNotFound,
    NoAPI,
)
from harness.records import RequestRecord
from harness.scoring import SCORE_MODES, ScoreReading, Unreadable, ValueTree, read_distribution
from harness.workload import WorkItem, parse_reply

__all__ = ["TRUNCATION_TOLERANCE", "RetryPolicy", "Runner", "RunnerConfig", "duplicate_id"]

TRUNCATION_TOLERANCE = 16
"""Prompt tokens a server may count short of the engine's count before the prompt is taken
to be truncated (or 1% of the prompt, whichever is more): chat templates differ by a few
tokens (a BOS, a newline)."""

Sink = Callable[[RequestRecord], None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures."""

    max_attempts: int = 8
    """Tries per request, the first included."""
    base_delay_s: float = 0.25
    max_delay_s: float = 15.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Wait before try `attempt + 1`: half fixed, half random ("equal jitter")."""
        d = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return float(d / 2 + rng.uniform(0, d / 2))


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    concurrency: int = 1
    request_timeout_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    parse_retries: int = 1
    """Extra tries for a reply that does not parse under the item's output schema."""
    use_slots: bool = True
    """Pin each worker to a server slot when the server has slots (llama.cpp)."""
    prefetch: int = 128
    """Work items whose text pieces are tokenized together, ahead of sending."""
    seed: int = 0
    """Seed of the backoff jitter."""
    score_mode: str = "decode"
    """`decode` (the model writes the reply) or `logprobs` (the reply's fixed part is sent
    written, the value read from the probabilities: `harness.engine.logprobs`)."""
    top_logprobs: int | None = None
    """Decoded replies: also ask the top log-probabilities of each generated token (kept in
    the reply body), so a score that changed between runs can be told a near-tie or not."""


class Runner:
    """Runs work items through a backend with a strategy; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        strategy: Strategy,
        counter: TokenCounter,
        *,
        config: RunnerConfig | None = None,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.backend = backend
        self.strategy = strategy
        self.counter = counter
        self.config = config or RunnerConfig()
        self.sinks = list(sinks)
        self._rng = random.Random(self.config.seed)
        self._items: Sequence[WorkItem] = ()
        self._pos = 0
        self._ahead: deque[WorkItem] = deque()
        """Items taken from `_items` and tokenized together, not yet handed to a worker."""
        self._take_lock = asyncio.Lock()
        self._convs: dict[int, Conversation] = {}
        """Each worker's rolling conversation: kept between `run` calls, so a runner fed one
        batch at a time (the Ray executor's actors) continues its conversations."""
        self._last: dict[object, tuple[TokenSeq, int, str | None]] = {}
        """Per slot (or worker): the last prompt, its reply's length and the server of a pool
        that held it."""
        self.aborted: BaseException | None = None
        self.stop_reason: str | None = None
        """Why the run was asked to stop early (`stop`): no item is taken after it."""
        if self.config.score_mode not in SCORE_MODES:
            raise InputError(
                f"score mode {self.config.score_mode!r}: choose one of {', '.join(SCORE_MODES)}"
            )
        self.scorer: LogprobScorer | None = None
        self.score_note: str | None = None
        """Why logprobs mode was asked but every row is decoded (None otherwise)."""
        if self.config.score_mode == "logprobs":
            self.score_note = logprobs_unavailable(backend, counter.source)
            if self.score_note is None:
                self.scorer = LogprobScorer(counter)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, items: Sequence[WorkItem]) -> int:
        """Run every item once; returns how many were run. Raises on run-aborting errors."""
        twice = duplicate_id(items)
        if twice is not None:
            raise InputError(f"custom_id {twice!r} appears twice in the work items")
        self._items, self._pos = items, 0
        self._ahead.clear()
        n_workers = max(1, min(self.config.concurrency, len(items)))
        slots = self.backend.info.n_slots if self.backend.info.supports_slots else None
        if slots and n_workers > slots:
            slots = None  # a slot per worker, or none pinned (see the module docstring)
        tasks = [
            asyncio.create_task(self._worker(w, slots), name=f"worker-{w}")
            for w in range(n_workers)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return self._pos

    def stop(self, reason: str) -> None:
        """Take no further item: the requests in flight finish and are recorded, `run`
        returns, the items not taken stay pending (a later run resumes them)."""
        self.stop_reason = self.stop_reason or reason

    async def _take(self) -> WorkItem | None:
        async with self._take_lock:
            if self.stop_reason is not None:
                return None
            if not self._ahead:
                end = min(len(self._items), self._pos + self.config.prefetch)
                if self._pos >= end:
                    return None
                batch = self._items[self._pos : end]
                await self.counter.prepare(it.messages for it in batch)
                self._ahead.extend(batch)
            self._pos += 1
            return self._ahead.popleft()

    async def _worker(self, w: int, slots: int | None) -> None:
        conv = self._convs.setdefault(w, Conversation())
        slot = w % slots if slots and self.config.use_slots else None
        while True:
            item = await self._take()
            if item is None:
                return
            rec = await self.process(item, conv, worker=w, slot=slot)
            for sink in self.sinks:
                sink(rec)

    # -- one request -----------------------------------------------------------------------

    def _reusable(
        self, key: object, ids: TokenSeq, reported: int | None, endpoint: str | None = None
    ) -> int:
        """Upper bound on prefix-cache reuse: the common prefix with what the slot held.

        The first request on a slot meets a cache this run did not fill (a server that earlier
        runs warmed, or a cold one): nothing bounds it but the server's own report, so that
        report is taken as its bound. Over a pool each server warms its own cache: a slot's
        first request on another server than its last one (it moved when a server left, or went
        back to one that came back) counts as a first request.
        """
        prev = self._last.get(key)
        if not ids:
            return 0
        if prev is None or prev[2] != endpoint:
            return min(reported or 0, len(ids) - 1)
        prev_ids, prev_completion, _ = prev
        lcp = common_prefix_len(ids, prev_ids)
        if lcp == len(prev_ids):
            lcp += min(prev_completion, len(ids) - lcp)
        return min(lcp, len(ids) - 1)

    async def process(
        self, item: WorkItem, conv: Conversation, *, worker: int = 0, slot: int | None = None
    ) -> RequestRecord:
        """Plan, send, retry and parse one item; always returns its record."""
        rec = RequestRecord(item.custom_id, "error", worker=worker, slot=slot, started=time.time())
        retry = self.config.retry
        key: object = ("slot", slot) if slot is not None else ("worker", worker)
        force_trim = overflow_retried = False
        parse_failures = transient = 0
        tree: ValueTree | None = None
        fallback: str | None = None
        if self.scorer is not None and item.constrain:
            found = await self.scorer.tree_for(item.output_schema)
            tree = found if isinstance(found, ValueTree) else None
        while True:
            plan = await self.strategy.plan(conv, item, self.counter, force_trim=force_trim)
            force_trim = False
            rec.trim = plan.trim or rec.trim
            rec.expected_prompt_tokens = plan.prompt_tokens
            if plan.refused is not None:
                return self._fail(rec, plan.refused, "ContextOverflow")
            rec.turn = conv.requests
            request = ChatRequest(
                messages=plan.messages,
                max_tokens=item.max_tokens,
                temperature=item.temperature,
                seed=item.seed + parse_failures if item.seed is not None else None,
                output_schema=item.output_schema if item.constrain else None,
                grammar=item.grammar if item.constrain else None,
                slot=slot,
                turn=conv.requests,
                timeout_s=self.config.request_timeout_s,
                extra=item.extra,
                prompt_ids=plan.prompt_ids,
                top_logprobs=self.config.top_logprobs,
            )
            rec.attempts += 1
            probes: list[ChatRequest] = []
            expected_tokens = plan.prompt_tokens
            try:
                if tree is not None:
                    probes = probe_requests(request, tree, plan.prompt_ids)
                    expected_tokens += len(tree.prefill_ids) + len(tree.probes[0].path)
                    rec.expected_prompt_tokens = expected_tokens
                    started = time.perf_counter()
                    results = await self.backend.chat_many(probes)
                    result = self._merge(results, (time.perf_counter() - started) * 1000.0)
                else:
                    results = []
                    result = await self.backend.chat(request)
            except ContextOverflow as exc:
                if isinstance(self.strategy, ConversationStrategy) and not overflow_retried:
                    overflow_retried = force_trim = True
                    continue
                return self._fail(rec, exc, "ContextOverflow")
            except (BackendUnreachable, ModelNotFound, NoAPI) as exc:
                transient += 1
                if isinstance(exc, BackendUnreachable) and transient < retry.max_attempts:
                    await asyncio.sleep(retry.delay(transient, self._rng))
                    continue
                raise  # the server is gone or wrong: abort the run, resume later
            except HarnessError as exc:
                transient += 1
                if exc.retryable and transient < retry.max_attempts:
                    await asyncio.sleep(retry.delay(transient, self._rng))
                    continue
                return self._fail(rec, exc, type(exc).__name__)
            usage = result.usage
            rec.endpoint = result.endpoint  # the server of a pool that answered
            shortfall = self._truncated(expected_tokens, usage)
            if shortfall is not None or result.context_shifted:
                # The model did not see the prompt that was sent: never a result. A rolling
                # conversation is trimmed and the request sent once more (as for an overflow
                # the server reports), so one long history does not fail the rows after it.
                rec.prompt_tokens = usage.prompt_tokens
                rec.context_shifted = rec.context_shifted or result.context_shifted
                self._last.pop(key, None)
                if isinstance(self.strategy, ConversationStrategy) and not overflow_retried:
                    overflow_retried = force_trim = True
                    continue
                return self._fail(
                    rec, shortfall or self._shifted(plan.prompt_tokens), "ContextOverflow"
                )
            sent_ids = probes[0].prompt_ids if probes else plan.prompt_ids
            assert isinstance(sent_ids, TokenSeq)
            rec.reusable_tokens = self._reusable(
                key, sent_ids, usage.cached_tokens, result.endpoint
            )
            held = probes[-1].prompt_ids if probes else plan.prompt_ids
            assert isinstance(held, TokenSeq)
            self._last[key] = (held, 1 if probes else usage.completion_tokens, result.endpoint)
            if tree is not None:
                try:
                    reading = read_distribution(
                        tree, [r.top_logprobs[0] if r.top_logprobs else [] for r in results]
                    )
                except Unreadable as exc:
                    # The probabilities do not tell: this row is decoded instead.
                    tree, fallback = None, str(exc)
                    continue
                result.content = tree.shape.reply(_json_value(reading))
                rec.scoring = {"mode": "logprobs", **reading.to_dict()}
                rec.probe_tokens = sum(r.usage.uncached_tokens for r in results[1:])
            elif fallback is not None:
                rec.scoring = {"mode": "decode", "fallback": fallback}
            rec.content = result.content
            rec.raw = result.raw
            rec.completion = chat_completion(result, model=self.backend.info.model)
            rec.prompt_tokens = usage.prompt_tokens
            rec.cached_tokens = usage.cached_tokens
            rec.cached_source = usage.cached_source
            rec.cached_omitted = usage.cached_omitted
            rec.completion_tokens = usage.completion_tokens
            rec.latency_ms = result.timings.total_ms
            rec.prompt_ms = result.timings.prompt_ms
            rec.decode_ms = result.timings.decode_ms
            if item.output_schema is not None:
                try:
                    rec.parsed = parse_reply(result.content, item.output_schema)
                except ValueError as exc:
                    parse_failures += 1
                    if parse_failures <= self.config.parse_retries:
                        continue
                    return self._fail(rec, exc, "ParseError")
            self.strategy.commit(conv, item, plan, result.content)
            rec.status = "ok"
            rec.finished = time.time()
            return rec

    @staticmethod
    def _merge(results: Sequence[ChatResult], wall_ms: float) -> ChatResult:
        """A row's probes as one result: the first probe's reply and prompt counts (the row's
        prompt with the prefill), the server's time of them all, the wall time of them all."""
        first = results[0]
        t = first.timings
        t.total_ms = wall_ms
        if len(results) > 1:
            t.prompt_ms = sum(r.timings.prompt_ms or 0.0 for r in results)
            t.decode_ms = sum(r.timings.decode_ms or 0.0 for r in results)
            first.usage.completion_tokens = sum(r.usage.completion_tokens for r in results)
            first.context_shifted = any(r.context_shifted for r in results)
        return first

    def _truncated(self, expected: int, usage: Usage) -> ContextOverflow | None:
        """A server that counted fewer prompt tokens than were sent cut the prompt (Ollama
        does so silently when `truncate` is not false). Chat templates may differ from the
        engine's by a few tokens, so a shortfall counts past `TRUNCATION_TOLERANCE`."""
        if not usage.prompt_tokens_complete or not usage.prompt_tokens or not expected:
            return None
        if usage.prompt_tokens >= expected - max(TRUNCATION_TOLERANCE, expected // 100):
            return None
        n_ctx = self.backend.info.n_ctx_per_slot
        return ContextOverflow(
            f"the prompt was truncated: the server counted {usage.prompt_tokens} prompt tokens "
            f"of the {expected} sent (num_ctx / n_ctx {n_ctx}); raise the context "
            "(num_ctx, OLLAMA_CONTEXT_LENGTH) or shorten the prompt",
            prompt_tokens=expected,
            n_ctx=n_ctx,
        )

    def _shifted(self, expected: int) -> ContextOverflow:
        n_ctx = self.backend.info.n_ctx_per_slot
        return ContextOverflow(
            f"the server shifted its context (dropped tokens) on a {expected}-token prompt "
            f"with n_ctx {n_ctx}: the trim policy let the conversation outgrow the context; "
            "lower CONTEXT_TRIM_THRESHOLD or TRIM_INTERVAL",
            prompt_tokens=expected,
            n_ctx=n_ctx,
        )

    @staticmethod
    def _fail(rec: RequestRecord, exc: BaseException, kind: str) -> RequestRecord:
        rec.status = "error"
        # A pool names the server that failed the request on the error it raises.
        rec.endpoint = getattr(exc, "endpoint", None) or rec.endpoint
        rec.error_type = kind
        rec.error = str(exc)
        if kind == "ParseError" and rec.content is not None:
            rec.error = f"{exc}; raw reply: {rec.content[:500]!r}"
        if isinstance(exc, ContextOverflow) and exc.prompt_tokens and not rec.prompt_tokens:
            rec.prompt_tokens = 0
        rec.finished = time.time()
        return rec


def _json_value(reading: ScoreReading) -> str:
    import json

    return json.dumps(reading.score)


_EXACT_BELOW = 65_536
"""Up to this many items the duplicate check keeps the ids in a set (exact and quick)."""


def duplicate_id(items: Sequence[WorkItem]) -> str | None:
    """An id that appears twice in `items`, or None.

    A large run's check keeps one 8-byte hash per item in an array, sorted, and compares the
    ids only where two hashes are equal (a collision is told from a true duplicate), so it
    costs 8 bytes per item for its duration instead of a set of every id."""
    n = len(items)
    if n < _EXACT_BELOW:
        seen: set[str] = set()
        for item in items:
            if item.custom_id in seen:
                return item.custom_id
            seen.add(item.custom_id)
        return None
    import numpy as np

    hashes = np.fromiter((hash(it.custom_id) for it in items), dtype=np.int64, count=n)
    hashes.sort()
    same = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if not len(same):
        return None
    suspects = {int(h) for h in same}
    ids: set[str] = set()
    for item in items:
        if hash(item.custom_id) in suspects:
            if item.custom_id in ids:
                return item.custom_id
            ids.add(item.custom_id)
    return None
