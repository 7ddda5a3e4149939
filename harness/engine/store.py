"""The exactly-once results store: append-only JSONL keyed by `custom_id`, with resume.

Each finished request (result or error) is one line in the OpenAI Batch output format (plus a
`harness` object of measurements), written and flushed as soon as it arrives, so a crash loses
at most the requests in flight. Opening an existing file resumes: the ids already there are
done and are skipped; a last line cut short by a crash is dropped (that request runs again).
The store refuses to write an id twice, so every input id ends exactly once in the file.

With `retry_failed`, ids whose last line is an error are not done: they run again, and their
new line (marked `harness.retry_of_error`) is appended after the error. An id then has more
than one line, and its last line is final (`read_final` gives one line per id); an id whose
earlier line succeeded can never get another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from harness.errors import OutputError
from harness.records import RequestRecord

__all__ = ["ResultsStore", "read_final", "read_results"]


def read_results(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a results file (a cut-short last line is skipped).

    Read as bytes, as `ResultsStore` recovers: a write cut short by a crash or a full disk can
    end inside a multi-byte character, which a text-mode read fails to decode before the line
    is seen to be incomplete."""
    p = Path(path)
    if not p.exists():
        return
    with p.open("rb") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                return  # cut short by a crash
            if not line.strip():
                continue
            try:
                yield json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise OutputError(f"{p}:{n}: results line is corrupt ({exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise OutputError(f"{p}:{n}: results line is corrupt ({exc.msg})") from None


def read_final(path: str | Path) -> dict[str, dict[str, Any]]:
    """The final line of each id (its last: a retried error is superseded), in file order."""
    out: dict[str, dict[str, Any]] = {}
    for line in read_results(path):
        cid = line.get("custom_id")
        if isinstance(cid, str):
            out.pop(cid, None)
            out[cid] = line
    return out


class ResultsStore:
    """Append-only results file. Use as a context manager, or `open()` / `close()`."""

    def __init__(
        self, path: str | Path, *, fsync_interval_s: float = 2.0, retry_failed: bool = False
    ) -> None:
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.retry_failed = retry_failed
        self.retrying: set[str] = set()
        """Ids whose last line is an error, to run again (with `retry_failed`)."""
        self.done: set[str] = set()
        self.previous_ok = 0
        self.previous_errors = 0
        self.written = 0
        self._fh: IO[bytes] | None = None
        self._last_sync = 0.0
        self._flush_pending = False
        self._deferred_error: OutputError | None = None
        self._handed_over = 0
        """Results known to have reached the OS (the others may sit in the write buffer)."""
        self._seq = 0

    def open(self) -> ResultsStore:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._recover()
            self._fh = self.path.open("ab")
        except OSError as exc:
            raise OutputError(
                f"cannot open results file {self.path}: {exc.strerror or exc}"
            ) from exc
        return self

    def _recover(self) -> None:
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        good = 0
        last_error: dict[str, bool] = {}
        """Whether each id's latest line so far is an error (only those may repeat)."""
        lines = 0
        with self.path.open("rb") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    break
                good += len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    cid = obj["custom_id"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise OutputError(
                        f"{self.path}:{n}: results line is corrupt ({exc}); move the file aside "
                        "or fix that line to resume"
                    ) from None
                failed = obj.get("error") is not None
                if cid in last_error and not last_error[cid]:
                    # Only an error may be followed by another line of its id (its retry).
                    raise OutputError(f"{self.path}:{n}: custom_id {cid!r} appears twice")
                if cid in last_error:  # a retried error: this later line supersedes it
                    self.previous_errors -= 1
                last_error[cid] = failed
                lines += 1
                self.previous_ok += not failed
                self.previous_errors += failed
                if not (failed and self.retry_failed):
                    self.done.add(cid)
        if good < size:
            # The crash cut the last line short: drop it; that request will run again.
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        self.retrying = {cid for cid, failed in last_error.items() if failed and self.retry_failed}
        if self.retry_failed:
            self.previous_errors -= len(self.retrying)  # they run again
        self._seq = lines
        self._handed_over = len(self.done)

    def __contains__(self, custom_id: object) -> bool:
        return custom_id in self.done

    def write(self, record: RequestRecord) -> None:
        """Append one finished request; it reaches the OS at once, or (under an event loop)
        when control returns to the loop, before the runner waits on the network again."""
        if self._fh is None:
            raise OutputError(f"results file {self.path} is not open")
        self.raise_deferred()
        if record.custom_id in self.done:
            raise OutputError(f"refusing to write custom_id {record.custom_id!r} twice")
        self._seq += 1
        data = record.to_batch_line(self._seq)
        if record.custom_id in self.retrying:
            data["harness"]["retry_of_error"] = True  # supersedes the error line before it
        line = orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE)
        try:
            self._fh.write(line)
        except OSError as exc:
            raise OutputError(
                f"cannot append to results file {self.path}: {exc.strerror or exc}; the "
                f"{self._handed_over} results written before it are intact, run again to resume"
            ) from exc
        self.done.add(record.custom_id)
        self.written += 1
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Under an event loop, flush once control returns to it: before the runner waits on the
        # network again, so nothing finished sits in the buffer while requests are in flight
        # (records finished in one loop turn share one write). Without a loop, flush now.
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_pending = True
        loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        try:
            self.flush()
        except OutputError as exc:  # raised to the runner by its next write, or by close_checked
            self._deferred_error = exc

    def raise_deferred(self) -> None:
        """Raise a write error that happened in a deferred flush."""
        if self._deferred_error is not None:
            exc, self._deferred_error = self._deferred_error, None
            raise exc

    def flush(self) -> None:
        """Hand buffered lines to the OS (a crash of this process no longer loses them), and
        fsync every `fsync_interval_s` (a crash of the machine loses at most that much)."""
        self._flush_pending = False
        if self._fh is None:
            return
        try:
            self._fh.flush()
            self._handed_over = len(self.done)
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval_s:
                os.fsync(self._fh.fileno())
                self._last_sync = now
        except OSError as exc:
            raise OutputError(
                f"cannot append to results file {self.path}: {exc.strerror or exc}; the "
                f"{self._handed_over} results written before it are intact, run again to resume"
            ) from exc

    def close(self, *, raise_errors: bool = True) -> None:
        """Flush, fsync and close. A write error is raised (unless another error is already
        on its way: then it must not be masked)."""
        error: OutputError | None = self._deferred_error
        self._deferred_error = None
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as exc:
                error = error or OutputError(
                    f"cannot finish writing results file {self.path}: {exc.strerror or exc}"
                )
            finally:
                with contextlib.suppress(OSError):
                    self._fh.close()
                self._fh = None
        if error is not None and raise_errors:
            raise error

    def __enter__(self) -> ResultsStore:
        return self.open()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(raise_errors=exc_type is None)
