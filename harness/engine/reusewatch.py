"""Watching, while a job runs, that the server still reuses the shared prefix.

Without the rubric's reuse a 170K job on a consumer card takes days instead of hours, and
servers lose reuse silently: a prefix that stops matching, a sliding-window layout, a cache
evicted by another client. Each request's record holds what the strategy let the server reuse
at most (`reusable_tokens`: the prefix it shares with what its slot held, plus the history a
conversation re-sends) and what the server says it reused (`cached_tokens`), so the prompt
tokens the strategy expects the server to compute are `prompt − reusable` (the candidate and
its template) and those it computed are `prompt − cached`.

`ReuseWatch` sums both over each window of `window` completed requests whose cached tokens are
known, and raises an alarm when a window computed more than `factor` times what was expected
(plus `SLACK_TOKENS` a request: a server recomputes a token or two at a turn's boundary). An
alarm is printed (one line naming the rows), put on the record that closed the window (so the
results file keeps it), kept in `alarms` for the report, and, with `stop`, ends the run after
the requests in flight: every finished row is kept, the rest resume later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.records import RequestRecord

__all__ = ["SLACK_TOKENS", "ReuseWatch", "ReuseWatchConfig"]

SLACK_TOKENS = 16
"""Uncached prompt tokens a request may compute beyond the strategy's expectation before they
count towards an alarm (templates and turn boundaries differ by a few tokens)."""


@dataclass(frozen=True, slots=True)
class ReuseWatchConfig:
    """How a job watches prefix reuse (see the module docstring)."""

    window: int = 50
    """Completed requests (with known cached tokens) per window."""
    factor: float = 2.0
    """A window that computed more than this many times the expected tokens raises an alarm."""
    stop: bool = False
    """Stop the run at the first alarm (`--stop-on-cache-miss`)."""


@dataclass(slots=True)
class _Window:
    requests: int = 0
    uncached: int = 0
    expected: int = 0
    first: str | None = None
    last: str | None = None


@dataclass(slots=True)
class ReuseWatch:
    """An engine sink (placed before the results store, so the record that closes a window
    carries its alarm into the results file); see the module docstring."""

    config: ReuseWatchConfig = field(default_factory=ReuseWatchConfig)
    say: Callable[[str], None] | None = None
    """Where the alarm's line goes (the progress stream)."""
    stop: Callable[[str], None] | None = None
    """Called with the alarm's line when the config says to stop."""
    alarms: list[dict[str, Any]] = field(default_factory=list)
    windows: int = 0
    """Windows checked."""
    _now: _Window = field(default_factory=_Window)

    def __call__(self, rec: RequestRecord) -> None:
        if not rec.ok or rec.cached_tokens is None:
            return
        w = self._now
        w.requests += 1
        w.uncached += max(0, rec.prompt_tokens - rec.cached_tokens)
        w.expected += max(0, rec.prompt_tokens - rec.reusable_tokens)
        w.first = w.first or rec.custom_id
        w.last = rec.custom_id
        if w.requests < self.config.window:
            return
        self._now = _Window()
        self.windows += 1
        allowed = self.config.factor * w.expected + SLACK_TOKENS * w.requests
        if w.uncached <= allowed:
            return
        alarm = {
            "window": self.windows,
            "rows": [w.first, w.last],
            "requests": w.requests,
            "uncached_tokens": w.uncached,
            "expected_uncached_tokens": w.expected,
            "ratio": w.uncached / w.expected if w.expected else None,
            "factor": self.config.factor,
        }
        self.alarms.append(alarm)
        rec.reuse_alarm = alarm
        line = describe(alarm)
        if self.say is not None:
            self.say(line)
        if self.config.stop and self.stop is not None:
            self.stop(line)


def describe(alarm: dict[str, Any]) -> str:
    """One line: which rows, how many tokens the server computed against the expected."""
    ratio = alarm.get("ratio")
    times = f"{ratio:.1f}x" if isinstance(ratio, int | float) else "more than"
    first, last = alarm["rows"]
    return (
        f"REUSE ALARM: rows {first}..{last} ({alarm['requests']} requests) made the server "
        f"compute {alarm['uncached_tokens']:,} uncached prompt tokens, {times} the "
        f"{alarm['expected_uncached_tokens']:,} the strategy expects (> {alarm['factor']:g}x): "
        "the server stopped reusing the shared prefix (a prefix that changed, a sliding-window "
        "layout, a cache evicted by another client)"
    )
