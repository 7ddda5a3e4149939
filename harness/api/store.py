"""The service's state: one SQLite file (the standard library's `sqlite3`) plus file contents.

Layout of `--data-dir`::

    harness-api.sqlite3        files, batches, their progress, a few service notes
    harness-api.lock           held by the one service using the dir (`harness.lock`)
    files/<file id>            the bytes of each file (uploads and batch outputs)
    batches/<batch id>/        a batch's engine results file (`results.jsonl`, append-only)

Ids are random (`file-` / `batch_` and 24 hex digits) and opaque: a path is never taken from
a request; a file's bytes are reached only through its row. Each state change of a batch is
one transaction, so a service killed at any point restarts from a consistent state (see
`harness.api.runner` for how each status resumes). Blobs are written atomically before the
transaction that names them; blobs no row names (a crash in between) are removed at start.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import OutputError

__all__ = [
    "DB_NAME",
    "OPEN_STATUSES",
    "TERMINAL_STATUSES",
    "BatchRow",
    "FileRow",
    "Page",
    "Store",
    "UnknownCursor",
    "new_batch_id",
    "new_file_id",
    "now",
]

DB_NAME = "harness-api.sqlite3"
OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses of a batch the service still has to work on (resumed after a restart)."""
TERMINAL_STATUSES = ("completed", "failed", "cancelled", "expired")
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL,
    model TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    expires_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_ADDED_COLUMNS = {
    "cached_known": "INTEGER NOT NULL DEFAULT 0",
    "cached_prompt_tokens": "INTEGER NOT NULL DEFAULT 0",
    "cached_source": "TEXT",
    "reasoning_tokens": "INTEGER",
}
"""Batch columns added after the first schema (added to an older database when it opens)."""


class UnknownCursor(LookupError):
    """A list's `after` names no row: paging on would restart at the first page."""

    def __init__(self, after: str) -> None:
        super().__init__(after)
        self.after = after


def now() -> int:
    """Unix time in whole seconds (what OpenAI's timestamps are)."""
    return int(time.time())


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class FileRow:
    """A stored file."""

    id: str
    filename: str
    purpose: str
    bytes: int
    """Size in bytes."""
    lines: int
    """Non-blank lines (requests, for a batch input file)."""
    created_at: int
    """Unix seconds."""
    seq: int = 0


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A batch as stored; `harness.api.schemas.batch_object` shapes it for the API."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: str
    created_at: int
    """Unix seconds, like every `*_at` field."""
    metadata: dict[str, str] | None = None
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    """Requests in the input file."""
    completed: int = 0
    """Requests finished with a reply."""
    failed: int = 0
    """Requests finished with an error."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server served from its prefix cache, summed over the completed
    requests whose server reported them (`cached_known` of them)."""
    completion_tokens: int = 0
    cached_known: int = 0
    """Completed requests whose server reported cached tokens (the others: unknown)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens of those requests (the denominator of the prefix-cache savings)."""
    cached_source: str | None = None
    """Where the cached-token figures came from (`server`, `llama.cpp timings`, `unknown`,
    ...: the most common among the completed requests), as `harness.metrics` counts it."""
    reasoning_tokens: int | None = None
    """Reasoning tokens, when the replies reported them (None: not reported)."""
    seq: int = 0


_BATCH_COLUMNS = frozenset(f.name for f in dataclasses.fields(BatchRow)) - {"seq", "id"}
_JSON_COLUMNS = frozenset({"metadata", "errors"})


def _batch_from(row: sqlite3.Row) -> BatchRow:
    values = dict(row)
    for key in _JSON_COLUMNS:
        if values.get(key) is not None:
            values[key] = json.loads(values[key])
    return BatchRow(**values)


def _encode(key: str, value: Any) -> Any:
    return json.dumps(value) if key in _JSON_COLUMNS and value is not None else value


@dataclass(slots=True)
class Page:
    """One page of a list: rows and whether more follow."""

    rows: list[Any] = field(default_factory=list)
    has_more: bool = False


class Store:
    """SQLite state and file blobs under one data dir (see the module docstring)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.batches_dir = self.data_dir / "batches"
        try:
            self.files_dir.mkdir(parents=True, exist_ok=True)
            self.batches_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.data_dir / DB_NAME, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutputError(f"cannot open the data dir {self.data_dir}: {exc}") from exc
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            have = {r["name"] for r in self._db.execute("PRAGMA table_info(batches)")}
            for name, decl in _ADDED_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE batches ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: everything inside commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # -- files -------------------------------------------------------------------------------

    def blob_path(self, file_id: str) -> Path:
        """Where a file's bytes live; only for ids this service made."""
        if not _FILE_ID.match(file_id):
            raise ValueError(f"not a file id of this service: {file_id!r}")
        return self.files_dir / file_id

    def batch_dir(self, batch_id: str) -> Path:
        if not _BATCH_ID.match(batch_id):
            raise ValueError(f"not a batch id of this service: {batch_id!r}")
        return self.batches_dir / batch_id

    def add_file(self, row: FileRow, conn: sqlite3.Connection | None = None) -> FileRow:
        sql = (
            "INSERT INTO files (id, filename, purpose, bytes, lines, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        args = (row.id, row.filename, row.purpose, row.bytes, row.lines, row.created_at)
        if conn is not None:
            conn.execute(sql, args)
        else:
            with self._lock:
                self._db.execute(sql, args)
        return row

    def get_file(self, file_id: str) -> FileRow | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRow(**dict(rows[0])) if rows else None

    def list_files(self, *, purpose: str | None, after: str | None, limit: int, order: str) -> Page:
        """Files in upload order (`order`). Raises UnknownCursor for an unknown `after`."""
        desc = order != "asc"
        where: list[str] = []
        args: list[Any] = []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            ref = self._query("SELECT seq FROM files WHERE id = ?", (after,))
            if not ref:
                raise UnknownCursor(after)
            where.append("seq < ?" if desc else "seq > ?")
            args.append(ref[0]["seq"])
        sql = "SELECT * FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?"
        rows = self._query(sql, [*args, limit + 1])
        return Page([FileRow(**dict(r)) for r in rows[:limit]], len(rows) > limit)

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        if cur.rowcount:
            self.blob_path(file_id).unlink(missing_ok=True)
        return bool(cur.rowcount)

    def count_files(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM files")[0][0])

    def stored_bytes(self) -> int:
        """Bytes of every file kept (uploads and batch outputs)."""
        return int(self._query("SELECT COALESCE(SUM(bytes), 0) FROM files")[0][0])

    def sweep_blobs(self) -> int:
        """Remove blobs no row names (a crash between writing one and committing it) and
        temporary files of interrupted writes. Returns how many were removed."""
        known = {r["id"] for r in self._query("SELECT id FROM files")}
        removed = 0
        for p in self.files_dir.iterdir():
            if p.name not in known and (_FILE_ID.match(p.name) or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- batches -----------------------------------------------------------------------------

    def add_batch(self, row: BatchRow) -> BatchRow:
        cols = ["id", *sorted(_BATCH_COLUMNS)]
        values = [_encode(c, getattr(row, c)) for c in cols]
        with self._lock:
            self._db.execute(
                f"INSERT INTO batches ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                values,
            )
        got = self.get_batch(row.id)
        assert got is not None
        return got

    def get_batch(self, batch_id: str) -> BatchRow | None:
        rows = self._query("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch_from(rows[0]) if rows else None

    def update_batch(
        self, batch_id: str, conn: sqlite3.Connection | None = None, **changes: Any
    ) -> None:
        """Set columns of a batch (names checked against `BatchRow`)."""
        unknown = set(changes) - _BATCH_COLUMNS
        if unknown:
            raise ValueError(f"unknown batch column(s): {', '.join(sorted(unknown))}")
        sets = ", ".join(f"{k} = ?" for k in changes)
        args = [_encode(k, v) for k, v in changes.items()]
        sql = f"UPDATE batches SET {sets} WHERE id = ?"
        if conn is not None:
            conn.execute(sql, [*args, batch_id])
        else:
            with self._lock:
                self._db.execute(sql, [*args, batch_id])

    def set_status_if(self, batch_id: str, allowed: Sequence[str], **changes: Any) -> bool:
        """Apply `changes` only while the batch's status is one of `allowed` (atomic)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["status"] not in allowed:
                return False
            self.update_batch(batch_id, conn, **changes)
        return True

    def finalize_batch(
        self,
        batch_id: str,
        allowed: Sequence[str],
        files: Sequence[FileRow],
        **changes: Any,
    ) -> bool:
        """Name a batch's output files and apply `changes` (its final status) in one
        transaction, only while its status is one of `allowed`; False (nothing changed) when
        it is not (a cancel came first)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["status"] not in allowed:
                return False
            for f in files:
                self.add_file(f, conn)
            self.update_batch(batch_id, conn, **changes)
        return True

    def list_batches(self, *, after: str | None, limit: int) -> Page:
        """Newest first, as OpenAI lists them. Raises UnknownCursor for an unknown `after`."""
        args: list[Any] = []
        sql = "SELECT * FROM batches"
        if after:
            ref = self._query("SELECT seq FROM batches WHERE id = ?", (after,))
            if not ref:
                raise UnknownCursor(after)
            sql += " WHERE seq < ?"
            args.append(ref[0]["seq"])
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._query(sql, [*args, limit + 1])
        return Page([_batch_from(r) for r in rows[:limit]], len(rows) > limit)

    def batches_with_status(self, statuses: Sequence[str]) -> list[BatchRow]:
        """Batches in these statuses, oldest first."""
        marks = ", ".join("?" * len(statuses))
        rows = self._query(
            f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq ASC", statuses
        )
        return [_batch_from(r) for r in rows]

    def open_batches_of_file(self, file_id: str) -> list[str]:
        marks = ", ".join("?" * len(OPEN_STATUSES))
        rows = self._query(
            f"SELECT id FROM batches WHERE input_file_id = ? AND status IN ({marks})",
            [file_id, *OPEN_STATUSES],
        )
        return [r["id"] for r in rows]

    def status_counts(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    # -- notes -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Mapping[str, Any] | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else None

    def set_meta(self, key: str, value: Mapping[str, Any] | None) -> None:
        with self._lock:
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(dict(value))),
                )
