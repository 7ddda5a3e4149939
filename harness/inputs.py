"""Reading a user's input file safely: streamed line by line, each problem named by its line.

`request_lines(path)` reads a JSONL file one line at a time and never holds more than one line
(at most `max_line_bytes`) in memory: a line longer than that is skipped unread and reported,
so a 2 GB line costs no 2 GB of memory. Lines end at `\\n` alone (JSON strings may hold U+2028,
U+0085 or form feeds raw, as pasted CVs do), a UTF-8 byte-order mark is dropped, and a line of
whitespace is no request. A line that is not UTF-8, or holds a NUL byte (binary data, UTF-16),
is reported with its number; a file that opens with a UTF-16 byte-order mark is reported once.

`parse_line(text)` parses one line as JSON and turns every failure into a message: invalid JSON,
but also a line nested too deep for the parser (`RecursionError`) or too big for memory
(`MemoryError`): no exception from a hostile line escapes.

`harness run` (`workload.read_batch_jsonl`) and `harness api` (`api.validate.check_input`) read
batch files through these two functions, so the same file fails both the same way.

`input_sha256(path)`: the hash of a file's bytes, read in chunks, that `harness run` keeps in a
job's fingerprint (so another input under the same output is never taken for this one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_LINE_BYTES",
    "Line",
    "input_sha256",
    "parse_line",
    "request_lines",
]

MAX_LINE_BYTES = 16 * 1000 * 1000
"""The longest line (one request) read: 16 MB, room for a 1M-token prompt."""
_CHUNK = 1 << 20
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True, slots=True)
class Line:
    """One request line of a file, or why it cannot be read."""

    number: int
    """1-based, counting every line (blank ones too), as an editor numbers them."""
    text: str | None
    """The line, decoded, without its line end; None when `problem` says why not."""
    problem: str | None = None
    kind: str = ""
    """What the problem is: `too_long` (over the cap), `encoding` (not UTF-8, a NUL byte) or
    `utf16` (the whole file: no later line is read)."""

    @property
    def fatal(self) -> bool:
        """The problem concerns the whole file: no later line can be read either."""
        return self.kind == "utf16"


def _decode(raw: bytes, first: bool) -> tuple[str | None, str | None]:
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    nul = raw.find(b"\0")
    if nul >= 0:
        return None, (
            f"a NUL byte at column {nul + 1}: binary data, or text that is not UTF-8 "
            "(UTF-16?); save the file as UTF-8"
        )
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, (
            f"bytes that are not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        )


def request_lines(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Line]:
    """The request lines of `path` (see the module docstring); OSError when it cannot be
    opened."""
    with path.open("rb") as fh:
        n = 0
        while raw := fh.readline(max_line_bytes + 1):
            n += 1
            if n == 1 and raw.startswith(_UTF16_BOMS):
                yield Line(
                    1,
                    None,
                    "the file is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; "
                    "save it as UTF-8",
                    "utf16",
                )
                return
            if not raw.endswith(b"\n") and len(raw) > max_line_bytes:
                while (more := fh.readline(_CHUNK)) and not more.endswith(b"\n"):
                    pass  # the rest of the line, read in chunks and dropped
                yield Line(
                    n,
                    None,
                    f"the line is longer than {max_line_bytes} bytes, the most one request "
                    "may have",
                    "too_long",
                )
                continue
            text, problem = _decode(raw.removesuffix(b"\n").removesuffix(b"\r"), n == 1)
            if problem is not None:
                yield Line(n, None, problem, "encoding")
            elif text is not None and text.strip():
                yield Line(n, text)


def parse_line(text: str) -> tuple[Any, str | None]:
    """(the parsed JSON, None), or (None, why not) for any failure (see the module docstring)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to parse"
    except MemoryError:
        return None, "too large to parse in the memory available"
    except Exception as exc:  # a hostile line must never escape as a traceback
        return None, f"cannot parse ({type(exc).__name__})"


def input_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
