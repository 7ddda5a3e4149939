"""An upload received straight into the data dir: a multipart body parsed as it streams in.

`receive_upload` feeds the request body to a streaming multipart parser (`python-multipart`, the
parser Starlette's own form reading uses) and writes the file part's bytes to a temporary file
in the data dir as they arrive, in pieces of at most `_FLUSH_BYTES` (written in a thread: a
200 MB write must not stall the event loop that drives the running batch). Nothing is spooled
elsewhere first and copied after: an upload costs its size on disk once, and a bounded amount
of memory whatever its size. After every piece, `check(bytes so far, request lines so far)`
may refuse the upload (a limit or a quota: it raises), which stops the transfer there; the
caller removes the temporary file. Lines are counted as validation counts them
(`LineCounter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from harness.api.schemas import ApiError
from harness.api.validate import LineCounter

__all__ = ["Received", "receive_upload"]

_FLUSH_BYTES = 1 << 20
"""File bytes gathered before they are written out."""
_MAX_FIELD_BYTES = 4096
"""A form field other than the file (`purpose`) is short."""
_MAX_PARTS = 16


@dataclass(slots=True)
class Received:
    """What an upload carried: its fields, and the file's name, size and request lines."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    has_file: bool = False
    size: int = 0
    lines: int = 0


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(slots=True)
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


class _Receiver:
    """The parser's callbacks: fields kept in memory (small), file bytes queued for writing."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.got = Received()
        self.counter = LineCounter()
        self.pending = bytearray()
        self.fh: IO[bytes] | None = None
        self.part = _Part()
        self.parts = 0
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > _MAX_PARTS:
            raise _bad(f"The form has more than {_MAX_PARTS} parts.")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise _bad('A form part has no name (Content-Disposition "name").')
        self.part.name = name.decode("utf-8", "replace")
        if b"filename" in options:
            if self.got.has_file:
                raise _bad("Upload one file at a time.", "file")
            if self.part.name != "file":
                raise _bad(f"The file must be the form field 'file', not {self.part.name!r}.")
            self.part.is_file = True
            self.got.has_file = True
            self.got.filename = options[b"filename"].decode("utf-8", "replace")
            self.fh = self.tmp.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self.part.is_file:
            self.pending += piece
            self.got.size += len(piece)
            self.got.lines = self.counter.feed(piece)
        else:
            self.part.data += piece
            if len(self.part.data) > _MAX_FIELD_BYTES:
                raise _bad(f"The form field {self.part.name!r} is too long.", self.part.name)

    def on_part_end(self) -> None:
        if not self.part.is_file:
            self.got.fields[self.part.name] = self.part.data.decode("utf-8", "replace")


def _sync(fh: IO[bytes]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


async def receive_upload(
    content_type: str,
    body: AsyncIterator[bytes],
    tmp: Path,
    *,
    check: Callable[[int, int], None],
) -> Received:
    """Parse a `multipart/form-data` body (`content_type` carries its boundary) into `tmp`
    (the file part, synced to disk) and the other fields; `check(size, lines)` is called as the
    file grows and once at the end (`lines` then counts a last line without a newline). Raises
    ApiError for a malformed body, OSError for a failed write; `tmp` may then exist (the caller
    removes it)."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise _bad("The upload must be a multipart/form-data body with a 'file' and a 'purpose'.")
    receiver = _Receiver(tmp)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )

    async def flush(final: bool = False) -> None:
        check(receiver.got.size, receiver.got.lines)
        if receiver.fh is not None and (final or len(receiver.pending) >= _FLUSH_BYTES):
            data, receiver.pending = bytes(receiver.pending), bytearray()
            await asyncio.to_thread(receiver.fh.write, data)

    try:
        async for chunk in body:
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise _bad(f"Could not parse the multipart form: {exc}") from None
            await flush()
        try:
            parser.finalize()
        except FormParserError as exc:
            raise _bad(f"Could not parse the multipart form: {exc}") from None
        receiver.got.lines = receiver.counter.finish()
        await flush(final=True)
        if receiver.fh is not None:
            await asyncio.to_thread(_sync, receiver.fh)
    finally:
        if receiver.fh is not None:
            with contextlib.suppress(OSError):
                receiver.fh.close()
    return receiver.got
