"""Validation of a batch input file, as OpenAI's Batch API does it: every line checked, each
problem reported with its line number, nothing run when there is one.

`check_input(path, endpoint=...)` reads an uploaded file once and returns either the work
items or the errors, shaped like OpenAI's `BatchError` (`code`, `message`, `param`, `line`).
Each line is parsed once; the parsed lines become work items through the function `harness run`
uses (`items_from_batch`), so a line runs exactly as `harness run` would run it. The per-line
checks include every check of the engine's reader (`read_batch_jsonl`: JSON object, non-empty
unique `custom_id`, `body`, `body.messages` of string `role` / `content`, the chat URL), so
both tools accept the same files (tests/test_api.py checks it). The pass collects up to
`MAX_ERRORS` problems. Messages never name a path on the server (file ids are opaque).

Lines end at `\n` alone and a line of whitespace is not a request: `count_lines` applies the
same rule to an upload as it streams in, so an upload's `lines` is the batch's request count.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, InputError
from harness.workload import WorkItem, items_from_batch

__all__ = [
    "MAX_ERRORS",
    "SUPPORTED_ENDPOINTS",
    "BatchError",
    "Checked",
    "LineCounter",
    "check_input",
]

SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)
"""Endpoints a batch may target (the engine runs chat completions)."""
MAX_ERRORS = 100
"""Problems reported per file at most (OpenAI also stops listing after a while)."""
_INT_PARAMS = ("max_tokens", "max_completion_tokens", "seed")


@dataclass(frozen=True, slots=True)
class BatchError:
    """One validation problem, in the shape of OpenAI's `BatchError`."""

    code: str
    """Machine-readable: `invalid_json_line`, `duplicate_custom_id`, `invalid_url`, ..."""
    message: str
    line: int | None = None
    """1-based line of the input file; None for a problem of the whole file."""
    param: str | None = None
    """The field at fault (`custom_id`, `body.messages`, ...), when there is one."""

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(slots=True)
class Checked:
    """The outcome of `check_input`: items when the file is valid, else errors."""

    items: list[WorkItem] = field(default_factory=list)
    errors: list[BatchError] = field(default_factory=list)
    lines: int = 0
    """Request lines in the file (blank lines not counted)."""
    model: str | None = None
    """The model the lines name (`body.model`), when they name one."""

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_body(body: Any, n: int) -> list[BatchError]:
    if not isinstance(body, Mapping):
        return [BatchError("invalid_request", "`body` must be a JSON object.", n, "body")]
    out: list[BatchError] = []
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        out.append(
            BatchError(
                "missing_required_parameter" if msgs is None else "invalid_request",
                "`body.messages` must be a non-empty list of messages.",
                n,
                "body.messages",
            )
        )
    else:
        for i, m in enumerate(msgs):
            if not (
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                out.append(
                    BatchError(
                        "invalid_request",
                        f"`body.messages[{i}]` must be an object with a string `role` and a "
                        "string `content`.",
                        n,
                        f"body.messages[{i}]",
                    )
                )
                break
    for key in _INT_PARAMS:
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            out.append(
                BatchError("invalid_request", f"`body.{key}` must be an integer.", n, f"body.{key}")
            )
        elif key != "seed" and isinstance(value, int) and value < 1:
            out.append(
                BatchError("invalid_request", f"`body.{key}` must be at least 1.", n, f"body.{key}")
            )
    temp = body.get("temperature")
    if temp is not None and (not isinstance(temp, int | float) or isinstance(temp, bool)):
        out.append(
            BatchError(
                "invalid_request", "`body.temperature` must be a number.", n, "body.temperature"
            )
        )
    if body.get("stream") is True:
        out.append(
            BatchError(
                "invalid_request", "Streaming is not supported in a batch.", n, "body.stream"
            )
        )
    return out


def _check_line(obj: Any, n: int, endpoint: str, seen: dict[str, int]) -> list[BatchError]:
    if not isinstance(obj, Mapping):
        return [BatchError("invalid_request", "A batch line must be a JSON object.", n)]
    out: list[BatchError] = []
    cid = obj.get("custom_id")
    if cid is None:
        out.append(BatchError("missing_required_parameter", "Missing `custom_id`.", n, "custom_id"))
    elif not isinstance(cid, str) or not cid.strip():
        out.append(
            BatchError("invalid_request", "`custom_id` must be a non-empty string.", n, "custom_id")
        )
    elif cid in seen:
        out.append(
            BatchError(
                "duplicate_custom_id",
                f"The custom_id {cid!r} is a duplicate of line {seen[cid]}; each request in a "
                "batch needs its own custom_id.",
                n,
                "custom_id",
            )
        )
    else:
        seen[cid] = n
    method = obj.get("method")
    if method is None:
        out.append(BatchError("missing_required_parameter", "Missing `method`.", n, "method"))
    elif method != "POST":
        out.append(BatchError("invalid_request", "`method` must be `POST`.", n, "method"))
    url = obj.get("url")
    if url is None:
        out.append(BatchError("missing_required_parameter", "Missing `url`.", n, "url"))
    elif url != endpoint:
        out.append(
            BatchError(
                "invalid_url",
                f"The url {url!r} does not match the batch's endpoint {endpoint!r}.",
                n,
                "url",
            )
        )
    if "body" not in obj:
        out.append(BatchError("missing_required_parameter", "Missing `body`.", n, "body"))
    else:
        out.extend(_check_body(obj["body"], n))
    return out


def _decode(raw: bytes) -> tuple[str | None, BatchError | None]:
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, BatchError(
            "invalid_file_format",
            f"The file is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}).",
            line,
        )


def _engine_error(exc: InputError | ConfigError, path: Path) -> BatchError:
    """The engine's message without the server-side path it may start with."""
    text = str(exc)
    line = exc.line if isinstance(exc, InputError) else None
    for prefix in (f"{path}:{line}: ", f"{path}: "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    return BatchError("invalid_request", text.replace(str(path), "<input file>"), line)


def _is_request(raw: str) -> bool:
    """Whether a line (split at `\n`) is a request line: not blank."""
    return bool(raw.removesuffix("\r").strip())


class LineCounter:
    """Request lines of a file fed in chunks of bytes, counted as `check_input` counts them
    (UTF-8 with an optional BOM, lines split at `\n` alone, blank lines not counted)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._tail = ""
        self.lines = 0

    def feed(self, chunk: bytes) -> int:
        """Count the lines `chunk` completes; returns the count so far."""
        parts = (self._tail + self._decoder.decode(chunk)).split("\n")
        self._tail = parts.pop()
        self.lines += sum(1 for raw in parts if _is_request(raw))
        return self.lines

    def finish(self) -> int:
        """The count with the last line (one without a final newline) included."""
        self._tail += self._decoder.decode(b"", final=True)
        if _is_request(self._tail):
            self.lines += 1
        self._tail = ""
        return self.lines


def check_input(
    path: Path, *, endpoint: str = SUPPORTED_ENDPOINTS[0], max_lines: int | None = None
) -> Checked:
    """Validate the batch input file at `path` (see the module docstring)."""
    result = Checked()
    text, problem = _decode(path.read_bytes())
    if problem is not None or text is None:
        result.errors.append(problem or BatchError("invalid_file_format", "Unreadable file."))
        return result
    seen: dict[str, int] = {}
    first_model: tuple[str, int] | None = None
    parsed: list[Mapping[str, Any]] = []
    contents: dict[str, str] = {}
    """One string object per distinct message content: the rubric, the same on every line,
    is then held once, not once per request."""
    # Lines end at \n alone: JSON strings may hold U+2028, U+0085 or form feeds raw (pasted
    # CVs do), which str.splitlines() would also split on.
    for n, raw in enumerate(text.split("\n"), start=1):
        if not _is_request(raw):
            continue
        result.lines += 1
        try:
            obj = json.loads(raw.removesuffix("\r"))
        except json.JSONDecodeError as exc:
            obj = None
            found = [
                BatchError(
                    "invalid_json_line",
                    f"This line is not parseable as valid JSON ({exc.msg} at column {exc.colno}).",
                    n,
                )
            ]
        else:
            found = _check_line(obj, n, endpoint, seen)
        model = obj["body"].get("model") if not found and isinstance(obj, Mapping) else None
        if not found and isinstance(obj, Mapping) and not result.errors:
            for m in obj["body"]["messages"]:
                m["content"] = contents.setdefault(m["content"], m["content"])
            parsed.append(obj)
        if isinstance(model, str):
            if first_model is None:
                first_model = (model, n)
            elif model != first_model[0]:
                found.append(
                    BatchError(
                        "mismatched_model",
                        f"The model {model!r} differs from {first_model[0]!r} (line "
                        f"{first_model[1]}); a batch uses one model.",
                        n,
                        "body.model",
                    )
                )
        result.errors.extend(found)
        if len(result.errors) >= MAX_ERRORS:
            del result.errors[MAX_ERRORS:]
            return result
    if result.lines == 0:
        result.errors.append(BatchError("empty_file", "The batch input file has no requests."))
    if max_lines is not None and result.lines > max_lines:
        result.errors.append(
            BatchError(
                "too_many_requests",
                f"The file has {result.lines} requests; this service takes at most {max_lines} "
                "per batch (--max-lines).",
            )
        )
    if result.errors:
        return result
    if first_model is not None:
        result.model = first_model[0]
    try:
        result.items = items_from_batch(parsed)
    except (InputError, ConfigError) as exc:  # e.g. a response_format the engine cannot run
        result.errors.append(_engine_error(exc, path))
    return result
