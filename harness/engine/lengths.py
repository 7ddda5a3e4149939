"""How long a job's prompts are, measured before it runs, and whether they fit the server.

Ollama's default context is 4,096 tokens on GPUs under 24 GiB; the rubric alone is ~4,000. A job
that does not fit must not start: `check_fits` raises a `ConfigError` (exit 2) naming the
longest prompt, the context and where that context came from. Counting every row of a 170,000-row
job would tokenize every candidate twice; the longest rows by characters (the longest by tokens is
among them) and a seeded sample give the maximum and the percentiles.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from harness.engine.tokens import TokenCounter
from harness.errors import ConfigError
from harness.workload import WorkItem

__all__ = ["PromptLengths", "check_fits", "measure_lengths"]


@dataclass(frozen=True, slots=True)
class PromptLengths:
    """Prompt tokens of a job: the shared prefix, and what follows it (candidate + template)."""

    prefix_tokens: int
    """Tokens of the shared prefix (BOS and the rubric's turn)."""
    p50: int
    """Median prompt tokens after the prefix, in the sample."""
    p99: int
    """99th percentile of prompt tokens after the prefix, in the sample."""
    longest: int
    """Most prompt tokens (whole prompt) of any row measured (the longest by characters are)."""
    longest_id: str
    reply_tokens: int
    """Room asked for the reply (max_tokens of that row)."""
    measured: int
    """Rows counted."""
    rows: int
    """Rows in the job."""

    @property
    def needed(self) -> int:
        """Context one request needs: the longest prompt plus its reply."""
        return self.longest + self.reply_tokens

    def describe(self) -> str:
        return (
            f"prompt tokens: rubric {self.prefix_tokens}, candidate p50 {self.p50}, p99 "
            f"{self.p99}; longest prompt {self.longest} ({self.longest_id}) + reply "
            f"{self.reply_tokens} = {self.needed} (counted {self.measured} of {self.rows} rows)"
        )


def _chars(item: WorkItem) -> int:
    return sum(len(m["content"]) for m in item.messages)


async def measure_lengths(
    counter: TokenCounter,
    items: Sequence[WorkItem],
    *,
    sample: int = 1000,
    longest: int = 50,
    seed: int = 0,
) -> PromptLengths:
    """Count the `longest` rows by characters and a seeded sample of `sample` rows."""
    if not items:
        raise ConfigError("the job has no rows to measure")
    by_length = sorted(range(len(items)), key=lambda i: _chars(items[i]), reverse=True)
    rng = random.Random(seed)
    picked = sorted(
        set(by_length[:longest]) | set(rng.sample(range(len(items)), min(sample, len(items))))
    )
    first = items[picked[0]]
    prefix = len(await counter.count(list(first.prefix), add_generation_prompt=False)) + 1
    tails: list[int] = []
    best = (-1, "", 0)
    for i in picked:
        item = items[i]
        n = len(await counter.count(list(item.messages)))
        tails.append(max(0, n - prefix))
        if n + (item.max_tokens or 0) > best[0] + best[2]:
            best = (n, item.custom_id, item.max_tokens or 0)
    tails.sort()
    p99 = tails[min(len(tails) - 1, round(0.99 * (len(tails) - 1)))]
    return PromptLengths(
        prefix_tokens=prefix,
        p50=int(statistics.median(tails)),
        p99=p99,
        longest=best[0],
        longest_id=best[1],
        reply_tokens=best[2],
        measured=len(picked),
        rows=len(items),
    )


def check_fits(lengths: PromptLengths, n_ctx: int | None, *, context_source: str) -> str | None:
    """Refuse a job whose typical prompt (the rubric plus the median candidate) and reply
    cannot fit one request's context: most rows would fail. When only some rows do not fit,
    return a warning (those rows are recorded as errors, never sent) instead."""
    if n_ctx is None:
        return None
    typical = lengths.prefix_tokens + lengths.p50 + lengths.reply_tokens
    if typical > n_ctx:
        raise ConfigError(
            f"the rubric ({lengths.prefix_tokens} tokens) plus a typical candidate (median: "
            f"{lengths.p50} tokens) and its reply ({lengths.reply_tokens}) need {typical} "
            f"tokens, but one request's context is {n_ctx} ({context_source}); raise it: "
            "--ctx (num_ctx), or OLLAMA_CONTEXT_LENGTH and restart Ollama"
        )
    if lengths.needed > n_ctx:
        return (
            f"the longest row ({lengths.longest_id}: {lengths.longest} prompt tokens) and "
            f"others past {n_ctx - lengths.reply_tokens} prompt tokens do not fit the context "
            f"({n_ctx}, {context_source}): they will be recorded as errors, not sent"
        )
    return None
