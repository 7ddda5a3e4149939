"""The scores CSV of a batch run: the user's file, written as the run goes.

    <id column>, <kept input columns>, score, <other output-schema fields>,
    [score_expected, score_p,] status, error, prompt_tokens, cached_tokens, completion_tokens,
    latency_ms

The id column keeps the input's name (`custom_id` for a batch JSONL); `--keep-columns` carries
input columns over (a name the harness writes is refused); `score_expected` and `score_p` are
there with `--score-mode logprobs` only.

How it is written, so that it can be opened at any time and is whole after a SIGKILL:

- when a run starts on an existing results file, the file is rebuilt from it once, in input
  order (`write_scores`);
- every row the run finishes is appended as one complete line, with one `write` to a file
  opened for appending (`ScoresAppender`), in the order the rows finish; the whole file is never
  rewritten while the run goes;
- when the run ends (also after Ctrl-C, SIGTERM or a server failure) it is rebuilt in input
  order and replaces the file atomically.

The results file stays the record: a row retried with `--retry-failed` can be in the file twice
while the run goes (its last line is final), never after. A line is written within one 4 KiB
page (one that would cross a page boundary starts on the next, after blank lines, which CSV
readers skip), and a write within one page is copied whole or not at all when the process is
killed: a SIGKILL leaves no line cut short, but for a line over 4 KiB (long kept columns),
which the next run's rebuild repairs. Memory: the rebuild keeps one offset per id of the
results file (`index_results`), never the lines.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from harness.errors import ConfigError, OutputError
from harness.fileio import atomic_writer
from harness.records import RequestRecord
from harness.workload import parse_reply

__all__ = [
    "METRIC_COLUMNS",
    "SCORE_COLUMNS",
    "ScoreCounts",
    "ScoresAppender",
    "ScoresLayout",
    "index_results",
    "kept_columns",
    "write_review",
    "write_scores",
]


METRIC_COLUMNS = (
    "status",
    "error",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "latency_ms",
)
"""The scores CSV's last columns."""

SCORE_COLUMNS = ("score_expected", "score_p")
"""`--score-mode logprobs`: the expected score (sum of p·value over the allowed values) and the
probability of `score`, from the model's probabilities; empty for rows the model decoded."""


def kept_columns(
    asked: str | None, columns: Sequence[str], id_column: str, fields: Sequence[str]
) -> tuple[str, ...]:
    """The input columns `--keep-columns` names (`all`: every one but the id, in file order).
    Raises ConfigError naming a column the input does not have, or one whose name the harness
    writes itself."""
    if not asked:
        return ()
    if asked.strip() == "all":
        names = [c for c in columns if c != id_column]
    else:
        names = [n.strip() for n in asked.split(",") if n.strip()]
        missing = [n for n in names if n not in columns]
        if missing:
            raise ConfigError(
                f"--keep-columns: {', '.join(map(repr, missing))} is not a column of the input; "
                f"its columns are: {', '.join(columns)}"
            )
        names = [n for n in dict.fromkeys(names) if n != id_column]
    ours = {*(fields or ("score",)), *SCORE_COLUMNS, *METRIC_COLUMNS}
    taken = [n for n in names if n in ours]
    if taken:
        raise ConfigError(
            f"--keep-columns: the input's column {taken[0]!r} has the name of a column the "
            f"harness writes ({', '.join(sorted(ours))}); rename it in the input, or leave it "
            "out of --keep-columns"
        )
    return tuple(names)


@dataclass(frozen=True, slots=True)
class ScoresLayout:
    """The scores CSV's columns for one job."""

    id_name: str = "custom_id"
    kept: tuple[str, ...] = ()
    fields: tuple[str, ...] = ("score",)
    logprobs: bool = False
    """`score_expected` and `score_p` are columns (`--score-mode logprobs`)."""

    @property
    def header(self) -> list[str]:
        return [
            self.id_name,
            *self.kept,
            *(self.fields or ("score",)),
            *(SCORE_COLUMNS if self.logprobs else ()),
            *METRIC_COLUMNS,
        ]

    def line(self, result: Mapping[str, Any], kept: Sequence[str]) -> tuple[str, bool, bool]:
        """A results line's CSV line (with its newline), whether it is ok, and whether it has
        an integer score."""
        h: Mapping[str, Any] = result.get("harness") or {}
        err = result.get("error")
        ok = err is None
        obj = _reply_object(h) if ok else None
        score = _score_of(obj)
        message = ""
        if isinstance(err, Mapping):
            message = f"{err.get('code') or 'Error'}: {err.get('message') or ''}"
        values: dict[str, Any] = {
            "score": score,
            "status": "ok" if ok else "error",
            "error": message,
            "prompt_tokens": h.get("prompt_tokens"),
            "cached_tokens": h.get("cached_tokens"),
            "completion_tokens": h.get("completion_tokens"),
            "latency_ms": h.get("latency_ms"),
        }
        for name in self.fields:
            if name != "score":
                values[name] = obj.get(name) if obj is not None else None
        scoring = h.get("scoring")
        if ok and isinstance(scoring, Mapping) and scoring.get("mode") == "logprobs":
            values["score_expected"] = _rounded(scoring.get("expected"))
            values["score_p"] = _rounded(scoring.get("p"))
        cells = [str(result.get("custom_id", "")), *kept]
        cells += [_cell(values.get(c)) for c in self.header[1 + len(self.kept) :]]
        return _csv_line(cells), ok, score is not None


def _csv_line(cells: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def _reply_object(harness: Mapping[str, Any]) -> Mapping[str, Any] | None:
    parsed = harness.get("parsed")
    if isinstance(parsed, Mapping):
        return parsed
    content = harness.get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    try:
        return parse_reply(content, None)
    except ValueError:
        return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return orjson.dumps(value).decode("utf-8")


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _score_of(obj: Mapping[str, Any] | None) -> int | None:
    value = obj.get("score") if obj is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def index_results(path: str | Path) -> dict[str, tuple[int, bool]]:
    """Each id of a results file: the offset of its final (last) line and whether that line is
    an error. Only the offsets are kept, never the lines (a 170,000-line file holds every reply
    body); a last line cut short by a crash is left out, as `read_results` leaves it."""
    out: dict[str, tuple[int, bool]] = {}
    p = Path(path)
    if not p.exists():
        return out
    with p.open("rb") as fh:
        offset = 0
        for n, raw in enumerate(fh, start=1):
            at, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):
                break  # cut short by a crash
            if not raw.strip():
                continue
            line = _decode(p, f"line {n}", raw)
            cid = line.get("custom_id")
            if isinstance(cid, str):
                out.pop(cid, None)  # keep the order of final lines (`read_final`'s)
                out[cid] = (at, line.get("error") is not None)
    return out


def _decode(path: Path, where: str, raw: bytes) -> dict[str, Any]:
    try:
        line = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise OutputError(f"{path} ({where}): results line is corrupt ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path} ({where}): results line is corrupt ({exc.msg})") from None
    return line if isinstance(line, dict) else {}


@dataclass(slots=True)
class ScoreCounts:
    done: int = 0
    failed: int = 0
    scored: int = 0
    foreign: int = 0
    """Ids in the results file that are not rows of this input (left out of the scores)."""


def write_scores(
    rows: Iterable[tuple[str, Sequence[str]]],
    layout: ScoresLayout,
    results: Path,
    scores: Path,
) -> ScoreCounts:
    """Rebuild the scores CSV from the results file: one line per row with a result, in the
    order of `rows` ((id, kept values) in input order), streamed, replacing the file
    atomically. Counts over the final lines of the rows."""
    index = index_results(results)
    counts = ScoreCounts()
    matched = 0
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(results.open("rb")) if index else None
        out = stack.enter_context(atomic_writer(scores))
        out.write(_csv_line(layout.header).encode("utf-8"))
        for cid, kept in rows:
            at = index.get(cid)
            if at is None or src is None:
                continue
            matched += 1
            src.seek(at[0])
            text, ok, scored = layout.line(_decode(results, f"byte {at[0]}", src.readline()), kept)
            counts.done += ok
            counts.failed += not ok
            counts.scored += scored
            out.write(text.encode("utf-8"))
    counts.foreign = len(index) - matched
    return counts


class ScoresAppender:
    """Appends each finished row to the scores CSV as it arrives (an engine sink): one complete
    line per `write`, to a file opened for appending; the header first when the file is new or
    empty. `kept(id)` gives the row's kept values."""

    def __init__(
        self, path: Path, layout: ScoresLayout, kept: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.path = path
        self.layout = layout
        self.kept = kept or {}
        self._fd: int | None = None
        self._end = 0
        """Where the next write lands (this process is the file's one writer)."""
        self.lines = 0

    def add(self, rec: RequestRecord) -> None:
        text, _, _ = self.layout.line(rec.to_batch_line(0), self.kept.get(rec.custom_id, ()))
        data = text.encode("utf-8")
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                self._end = os.fstat(self._fd).st_size
                if self._end == 0:
                    data = _csv_line(self.layout.header).encode("utf-8") + data
            # A write that stays within one page is copied whole or not at all when the process
            # is killed (the kernel checks for a fatal signal between pages): a line that would
            # cross a page boundary starts on the next page, after blank lines (no CSV row).
            # A line longer than a page can still be cut: the next run rebuilds the file.
            at = self._end % PAGE
            if at and at + len(data) > PAGE and len(data) <= PAGE:
                _write_all(self._fd, b"\n" * (PAGE - at))
                self._end += PAGE - at
            _write_all(self._fd, data)
            self._end += len(data)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.lines += 1

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


PAGE = 4096
"""The page a line is kept within while the run appends (see `ScoresAppender.add`)."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


REVIEW_MARGIN = 0.05
"""A row whose two most probable scores are this close (p of the first minus the second) is a
near-tie: which it got can turn on what the server's cache held (the quality phase's margin)."""

REVIEW_P = 0.5
"""A row whose score has a probability under this is not confident."""

REVIEW_COLUMNS = ("score", "score_p", "runner_up", "runner_up_p", "margin", "score_expected", "why")


def write_review(
    rows: Iterable[tuple[str, Sequence[str]]],
    id_name: str,
    results: Path,
    path: Path,
) -> tuple[int, int]:
    """`<stem>_review.csv` of a logprobs run: the rows to read by hand, least confident first
    (a near-tie within `REVIEW_MARGIN`, or a score with p under `REVIEW_P`), each with its score,
    p, the runner-up and its p, the margin and the expected score. Returns (rows written, rows
    with a distribution read). Replaced atomically; streamed over the results' offsets."""
    index = index_results(results)
    picked: list[tuple[float, list[str]]] = []
    read = 0
    if index:
        with results.open("rb") as src:
            for cid, _ in rows:
                at = index.get(cid)
                if at is None or at[1]:
                    continue
                src.seek(at[0])
                h = _decode(results, f"byte {at[0]}", src.readline()).get("harness") or {}
                scoring = h.get("scoring")
                dist = scoring.get("distribution") if isinstance(scoring, Mapping) else None
                if not isinstance(dist, Mapping) or not dist:
                    continue
                read += 1
                ranked = sorted(
                    ((str(k), float(v)) for k, v in dist.items()), key=lambda kv: -kv[1]
                )
                (top, p1), (second, p2) = ranked[0], ranked[1] if len(ranked) > 1 else ("", 0.0)
                margin = p1 - p2
                why = [
                    *(["near-tie"] if margin <= REVIEW_MARGIN else []),
                    *(["low p"] if p1 < REVIEW_P else []),
                ]
                if why:
                    expected = scoring.get("expected") if isinstance(scoring, Mapping) else None
                    cells = [cid, top, f"{p1:.4f}", second, f"{p2:.4f}", f"{margin:.4f}",
                             _cell(_rounded(expected)), " and ".join(why)]  # fmt: skip
                    picked.append((p1, cells))
    picked.sort(key=lambda pc: pc[0])
    with atomic_writer(path) as out:
        out.write(_csv_line([id_name, *REVIEW_COLUMNS]).encode("utf-8"))
        for _, cells in picked:
            out.write(_csv_line(cells).encode("utf-8"))
    return len(picked), read
