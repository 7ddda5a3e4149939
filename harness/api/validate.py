"""Validation of a batch input file, as OpenAI's Batch API does it: every line checked, each
problem reported with its line number, nothing run when there is one.

`check_input(path, endpoint=...)` streams an uploaded file once, one line at a time
(`harness.inputs`: a line over the size cap, bytes that are not UTF-8, UTF-16, a NUL byte, a
line nested too deep to parse are each that line's error, never an exception), and returns the
problems, shaped like OpenAI's `BatchError` (`code`, `message`, `param`, `line`), or none. It
keeps each `custom_id` (for duplicates) and the problems, not the requests: a queued batch
holds no parsed lines in memory; `read_items` reads the file again when the batch runs. Each
line also goes through the function `harness run` builds work items with (`items_from_batch`),
so a line runs exactly as `harness run` would run it. The per-line checks include every check
of the engine's reader (`read_batch_jsonl`: JSON object, non-empty unique `custom_id`, `body`,
`body.messages` of string `role` / `content`, the chat URL), so both tools accept the same
files (tests/test_api.py checks it). A line naming a model the service does not serve fails
with `model_not_found` (unless the service runs any name on its model). The pass collects up
to `MAX_ERRORS` problems and stops at a deadline. Messages never name a path on the server
(file ids are opaque).

Lines end at `\n` alone and a line of whitespace is not a request: `LineCounter` applies the
same rule to an upload as it streams in, so an upload's `lines` is the batch's request count.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, InputError
from harness.inputs import MAX_LINE_BYTES, parse_line, request_lines
from harness.workload import WorkItem, items_from_batch

__all__ = [
    "MAX_ERRORS",
    "SUPPORTED_ENDPOINTS",
    "BatchError",
    "Checked",
    "LineCounter",
    "check_input",
    "read_custom_ids",
    "read_items",
    "served_names",
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
    """The outcome of `check_input`: the problems found (none: the file is valid)."""

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


def served_names(model: str) -> frozenset[str]:
    """The names under which `model` is served: itself, and for an Ollama name without a tag
    the same name with `:latest` (Ollama's own default tag), and the other way round."""
    names = {model}
    if ":" not in model:
        names.add(f"{model}:latest")
    elif model.endswith(":latest"):
        names.add(model.removesuffix(":latest"))
    return frozenset(names)


def _not_served(model: str, served: Collection[str], n: int) -> BatchError:
    shown = " or ".join(repr(m) for m in sorted(served))
    return BatchError(
        "model_not_found",
        f"The model {model!r} does not exist on this service, which serves {shown}: name "
        "that model in `body.model`, leave `body.model` out, or start harness api with "
        "--serve-any-model to run every batch on the served model whatever its lines name.",
        n,
        "body.model",
    )


def check_input(
    path: Path,
    *,
    endpoint: str = SUPPORTED_ENDPOINTS[0],
    max_lines: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    served: Collection[str] | None = None,
    deadline: float | None = None,
) -> Checked:
    """Validate the batch input file at `path` (see the module docstring), streamed one line at
    a time: what it keeps is each `custom_id` and the problems found, never the requests.

    `served`: the model names the service runs (a line naming another fails with
    `model_not_found`); None: any name is run on the served model. `deadline`: a
    `time.monotonic()` past which validation stops with `validation_timeout`."""
    result = Checked()
    seen: dict[str, int] = {}
    first_model: tuple[str, int] | None = None
    reported_models: set[str] = set()

    def add(found: list[BatchError]) -> bool:
        result.errors.extend(found)
        if len(result.errors) >= MAX_ERRORS:
            del result.errors[MAX_ERRORS:]
            return True
        return False

    for line in request_lines(path, max_line_bytes=max_line_bytes):
        n = line.number
        result.lines += 1
        if deadline is not None and result.lines % 256 == 0 and time.monotonic() > deadline:
            add([_timeout(n)])
            return result
        if line.text is None:
            code = "line_too_long" if line.kind == "too_long" else "invalid_file_format"
            if add([BatchError(code, _sentence(line.problem), n)]):
                return result
            if line.fatal:
                return result
            continue
        obj, problem = parse_line(line.text)
        if problem is not None:
            found = [
                BatchError(
                    "invalid_json_line",
                    f"This line is not parseable as valid JSON: {problem}.",
                    n,
                )
            ]
        else:
            found = _check_line(obj, n, endpoint, seen)
        if not found:
            found = _runnable(obj, n)
        model = obj["body"].get("model") if not found else None
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
            if served is not None and model not in served and model not in reported_models:
                reported_models.add(model)
                found.append(_not_served(model, served, n))
        if add(found):
            return result
    if deadline is not None and time.monotonic() > deadline:
        add([_timeout(None)])
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
    if first_model is not None:
        result.model = first_model[0]
    return result


def _sentence(text: str | None) -> str:
    text = (text or "unreadable line").strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _timeout(n: int | None) -> BatchError:
    return BatchError(
        "validation_timeout",
        "Validation did not finish before its deadline"
        + (f" (it had reached line {n})" if n is not None else "")
        + "; split the file into smaller batches.",
        n,
    )


def _runnable(obj: Mapping[str, Any], n: int) -> list[BatchError]:
    """The line through the function `harness run` builds its work item with: a line the
    engine cannot run (a response_format it cannot use) is that line's error."""
    try:
        items_from_batch([obj])
    except (InputError, ConfigError) as exc:
        return [BatchError("invalid_request", _engine_message(exc), n, "body")]
    except Exception as exc:  # nothing a hostile line holds may escape validation
        return [BatchError("invalid_request", f"The line cannot be run ({type(exc).__name__}).", n)]
    return []


def _engine_message(exc: InputError | ConfigError) -> str:
    """The engine's message without a server-side path (file ids are opaque)."""
    text = str(exc)
    if isinstance(exc, InputError) and exc.path is not None:
        prefix = f"{exc.path}:{exc.line}: " if exc.line is not None else f"{exc.path}: "
        text = text.removeprefix(prefix)
    return text


def read_items(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[WorkItem]:
    """The work items of a file `check_input` passed, built as `harness run` builds them
    (`items_from_batch`), for the batch's run: read again then, not kept since validation.
    Each distinct message content is one string object (the rubric, the same on every line,
    is held once, not once per request). Raises InputError when the file no longer reads."""
    contents: dict[str, str] = {}
    lines: list[Mapping[str, Any]] = []
    for line in request_lines(path, max_line_bytes=max_line_bytes):
        obj, problem = parse_line(line.text) if line.text is not None else (None, line.problem)
        if problem is not None or not isinstance(obj, dict):
            raise InputError(f"the input no longer reads ({problem})", line=line.number)
        for m in obj["body"]["messages"]:
            m["content"] = contents.setdefault(m["content"], m["content"])
        lines.append(obj)
    return items_from_batch(lines)


def read_custom_ids(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """The custom_ids of a file `check_input` passed, in file order."""
    ids: list[str] = []
    for line in request_lines(path, max_line_bytes=max_line_bytes):
        obj, _ = parse_line(line.text) if line.text is not None else (None, None)
        if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
            ids.append(obj["custom_id"])
    return ids
