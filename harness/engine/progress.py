"""Progress of a run: a live bar on a terminal, log lines elsewhere, both with a recent-window ETA.

The ETA divides what is left by the rate over a recent window (the last `window_s` seconds),
not the whole-run mean, so it follows a run that speeds up once caches are warm or slows down
when the machine is busy.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

from harness.records import RequestRecord

__all__ = ["Progress", "format_duration"]

_SAMPLE_S = 0.1
"""The rate window keeps one (time, done) sample per this many seconds, so its length is
bounded by `window_s / _SAMPLE_S` whatever the request rate."""


def format_duration(seconds: float | None) -> str:
    """`1:02:03` style; `?` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    total = max(0, round(seconds))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Counts finished requests and shows rate, savings and ETA."""

    def __init__(
        self,
        total: int,
        *,
        desc: str = "requests",
        stream: TextIO | None = None,
        tty: bool | None = None,
        log_every_s: float = 10.0,
        log_every_n: int | None = None,
        window_s: float = 60.0,
        enabled: bool = True,
        initial: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every_s = log_every_s
        self.log_every_n = log_every_n or max(1, total // 20)
        self.window_s = window_s
        self.enabled = enabled
        self.done = initial
        self.errors = 0
        self.prompt = 0
        self.cached = 0
        self.started = time.monotonic()
        self._window: deque[tuple[float, int]] = deque([(self.started, initial)])
        self._last_log_t = self.started
        self._last_log_n = initial
        self._bar = None
        self.eta_checks: dict[str, dict[str, float | None]] = {}
        """At 10%, 50% and 90% done: the ETA shown then, as a predicted end (monotonic s)."""
        self._checkpoints = [0.1, 0.5, 0.9]
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="req", file=self.stream,
                dynamic_ncols=True, smoothing=0.05,
            )  # fmt: skip

    def rate(self) -> float | None:
        """Requests per second over the recent window."""
        if len(self._window) < 2:
            return None
        (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        left = self.total - self.done
        if left <= 0:
            return 0.0
        return left / rate if rate else None

    def savings(self) -> float | None:
        return self.cached / self.prompt if self.prompt else None

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        if not rec.ok:
            self.errors += 1
        elif rec.cached_tokens is not None:
            self.prompt += rec.prompt_tokens
            self.cached += rec.cached_tokens
        now = time.monotonic()
        if len(self._window) > 1 and now - self._window[-2][0] < _SAMPLE_S:
            # One sample per _SAMPLE_S (the last one moves until it is _SAMPLE_S past the one
            # before it): a bounded window that still slides.
            self._window[-1] = (now, self.done)
        else:
            self._window.append((now, self.done))
        while len(self._window) > 2 and now - self._window[0][0] > self.window_s:
            self._window.popleft()
        while self._checkpoints and self.total and self.done >= self._checkpoints[0] * self.total:
            at = self._checkpoints.pop(0)
            eta = self.eta_s()
            self.eta_checks[f"{at:.0%}"] = {
                "elapsed_s": now - self.started,
                "eta_s": eta,
                "predicted_end_s": now - self.started + eta if eta is not None else None,
            }
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.done % 10 == 0 or self.done == self.total:
                sav = self.savings()
                self._bar.set_postfix(
                    savings=f"{sav:.1%}" if sav is not None else "-", errors=self.errors,
                    refresh=False,
                )  # fmt: skip
            return
        if (
            now - self._last_log_t >= self.log_every_s
            or self.done - self._last_log_n >= self.log_every_n
            or self.done == self.total
        ):
            self._last_log_t, self._last_log_n = now, self.done
            print(self.line(), file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """A line for the user (a warning), shown even with progress off, above the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def line(self) -> str:
        """One log line: done/total, rate, savings so far, errors, ETA."""
        rate = self.rate()
        sav = self.savings()
        pct = self.done / self.total if self.total else 1.0
        return (
            f"{self.desc}: {self.done}/{self.total} ({pct:.1%}) "
            f"{(rate or 0.0):.2f} req/s, savings {f'{sav:.1%}' if sav is not None else '-'}, "
            f"errors {self.errors}, elapsed {format_duration(time.monotonic() - self.started)}, "
            f"ETA {format_duration(self.eta_s())}"
        )

    def eta_accuracy(self, actual_end_s: float) -> dict[str, Any]:
        """Each checkpoint's predicted end against the actual end (seconds from the start):
        `error` is (predicted − actual) ÷ actual; `max_abs_error` the worst of them."""
        out: dict[str, Any] = {}
        errors = []
        for label, check in self.eta_checks.items():
            predicted = check["predicted_end_s"]
            err = (predicted - actual_end_s) / actual_end_s if predicted and actual_end_s else None
            out[label] = {**check, "actual_end_s": actual_end_s, "error": err}
            if err is not None:
                errors.append(abs(err))
        out["max_abs_error"] = max(errors) if errors else None
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
