"""A candidates CSV read as a stream of records, each with the byte offset where it starts.

`CsvFile(path, id_column)` opens the file, sniffs its dialect, reads and checks its header
(every mistake an `InputError` naming the file and line); `rows(on_bad, bad)` yields each good
row (its offset, its line, its cells by column name) and collects the bad ones (`Rejected`:
wrong number of fields, empty or repeated id); `row_at(offset)` reads one row again. The file
is never held whole: `harness run` keeps an offset per row and reads a row again when it is
sent (`batchfiles.RowItems`), so its memory does not grow with the rows' text.

Lines end in LF, CRLF or CR alone (Excel's "CSV (Macintosh)"); the text is UTF-8, a
byte-order mark skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from harness.errors import InputError

__all__ = ["CsvFile", "Cursor", "Rejected"]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A bad row set aside by `on_bad="skip"`: where it starts, its id (when it has one), why."""

    line: int
    id: str
    reason: str


def _looks_like_value(text: str) -> bool:
    t = text.strip()
    return not t or t.replace(".", "", 1).isdigit() or "@" in t or len(t) > 64


class _Lines:
    """The file's lines, decoded, with the offset of the next one (`pos`). Lines end at `sep`:
    LF (which CRLF ends in too), or CR alone for a file written that way."""

    def __init__(self, fh: IO[bytes], pos: int, path: Path, sep: bytes = b"\n") -> None:
        self.fh = fh
        self.pos = pos
        self.path = path
        self.sep = sep
        self._buf = b""
        fh.seek(pos)

    def __iter__(self) -> _Lines:
        return self

    def _readline(self) -> bytes:
        if self.sep == b"\n":
            return self.fh.readline()
        parts = []
        while True:
            if not self._buf:
                self._buf = self.fh.read(65536)
                if not self._buf:
                    break
            i = self._buf.find(self.sep)
            if i >= 0:
                parts.append(self._buf[: i + 1])
                self._buf = self._buf[i + 1 :]
                break
            parts.append(self._buf)
            self._buf = b""
        return b"".join(parts)

    def __next__(self) -> str:
        raw = self._readline()
        if not raw:
            raise StopIteration
        at = self.pos
        self.pos += len(raw)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = at + exc.start
            raise InputError(
                f"bytes that are not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {where}); "
                "save the file as UTF-8",
                path=str(self.path),
                line=_line_of(self.path, where),
            ) from None


def _line_of(path: Path, offset: int) -> int:
    with path.open("rb") as fh:
        return fh.read(offset).count(b"\n") + 1


class CsvFile:
    """A candidates CSV: its dialect, checked header, and rows read by offset."""

    def __init__(self, path: str | Path, id_column: str = "id") -> None:
        self.path = Path(path)
        self.id_column = id_column
        p = self.path
        try:
            with p.open("rb") as fh:
                head = fh.read(65536)
        except FileNotFoundError:
            raise InputError("input file not found", path=str(p)) from None
        except IsADirectoryError:
            raise InputError("input path is a directory, not a file", path=str(p)) from None
        except PermissionError:
            raise InputError("input file cannot be read (permission denied)", path=str(p)) from None
        if not head.strip():
            raise InputError("input file is empty", path=str(p))
        self.start = 3 if head.startswith(b"\xef\xbb\xbf") else 0
        cr = head.find(b"\r")
        # Lines that end in CR alone (Excel's "CSV (Macintosh)", classic Mac OS) are read as
        # such; LF and CRLF files end their lines at LF.
        self.sep = b"\r" if cr >= 0 and b"\n" not in head[: cr + 2] else b"\n"
        text = head[self.start :].decode("utf-8", errors="replace")[:4096]
        try:
            self.dialect: Any = csv.Sniffer().sniff(text, delimiters=",;\t")
        except csv.Error:
            self.dialect = csv.excel
        # The csv module refuses fields over 131,072 characters; a long field (a pasted résumé)
        # is that row's business (a prompt too long for the context is the row's error).
        csv.field_size_limit(max(csv.field_size_limit(), p.stat().st_size + 1))
        self.columns, self.data_start = self._header()

    def _header(self) -> tuple[tuple[str, ...], int]:
        p, id_column = self.path, self.id_column
        with p.open("rb") as fh:
            lines = _Lines(fh, self.start, p, self.sep)
            reader = csv.reader(lines, self.dialect)
            try:
                header = next(reader)
            except StopIteration:
                raise InputError("input file is empty", path=str(p)) from None
            except csv.Error as exc:
                raise InputError(f"cannot parse the header: {exc}", path=str(p), line=1) from None
            data_start = lines.pos
        header = [h.strip() for h in header]
        if not any(header):
            raise InputError("no header row (the first line is blank)", path=str(p), line=1)
        if id_column not in header:
            # A bare number, an e-mail address or a long text is no column name: the first
            # line is a data row (a header has no such cells, and one such cell is enough).
            if len(header) == 1 or any(h and _looks_like_value(h) for h in header):
                raise InputError(
                    f"no header: the first line looks like data ({', '.join(header)[:80]}); add "
                    f"a header line naming the columns (with an {id_column!r} column)",
                    path=str(p),
                    line=1,
                )
            raise InputError(
                f"id column {id_column!r} is missing; the columns are: {', '.join(header)} "
                "(choose one with --id-column)",
                path=str(p),
                line=1,
            )
        blank = [i + 1 for i, h in enumerate(header) if not h]
        if blank:
            raise InputError(
                f"header has an empty column name at position {blank[0]}", path=str(p), line=1
            )
        dup = {h for h in header if header.count(h) > 1}
        if dup:
            raise InputError(
                f"header repeats column(s): {', '.join(sorted(dup))}", path=str(p), line=1
            )
        return tuple(header), data_start

    def rows(self, bad: list[Rejected]) -> Iterator[tuple[int, int, dict[str, str]]]:
        """Every good row: (offset where it starts, its line, its cells by column, stripped).
        Bad rows are appended to `bad` (line, id, why) and not yielded."""
        p, header = self.path, self.columns
        id_idx = header.index(self.id_column)
        seen: dict[str, int] = {}
        with p.open("rb") as fh:
            lines = _Lines(fh, self.data_start, p, self.sep)
            reader = csv.reader(lines, self.dialect)
            line_no = 1
            while True:
                at = lines.pos
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise InputError(
                        f"cannot parse: {exc}", path=str(p), line=1 + reader.line_num
                    ) from None
                start, line_no = line_no + 1, 1 + reader.line_num
                if not record or all(not c.strip() for c in record):
                    continue  # blank line
                cid = record[id_idx].strip() if id_idx < len(record) else ""
                if len(record) != len(header):
                    why = f"row has {len(record)} fields, the header has {len(header)}"
                    bad.append(Rejected(start, cid, why))
                    continue
                if not cid:
                    bad.append(Rejected(start, cid, f"empty {self.id_column!r}"))
                    continue
                if cid in seen:
                    why = f"duplicate {self.id_column} {cid!r} (first on line {seen[cid]})"
                    bad.append(Rejected(start, cid, why))
                    continue
                seen[cid] = start
                yield at, start, {h: v.strip() for h, v in zip(header, record, strict=True)}

    def open_cursor(self, offset: int) -> Cursor:
        """A reader of rows from `offset` (the start of a row `rows` yielded)."""
        return Cursor(self, offset)


class Cursor:
    """Rows read one after the other from an offset: `pos` is where the next one starts."""

    def __init__(self, csvfile: CsvFile, offset: int) -> None:
        self.csvfile = csvfile
        self._fh = csvfile.path.open("rb")
        self._lines = _Lines(self._fh, offset, csvfile.path, csvfile.sep)
        self._reader = csv.reader(self._lines, csvfile.dialect)

    @property
    def pos(self) -> int:
        return self._lines.pos

    def next_row(self) -> dict[str, str] | None:
        """The row at `pos` (None at the end, or for a line that is no row of the header's
        width)."""
        try:
            record = next(self._reader)
        except (StopIteration, csv.Error):
            return None
        header = self.csvfile.columns
        if len(record) != len(header):
            return None
        return {h: v.strip() for h, v in zip(header, record, strict=True)}

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
