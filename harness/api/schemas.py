"""The OpenAI objects the service returns, field for field (openai/openai-openapi): `OpenAIFile`,
`Batch`, the list envelope, the error body, and the per-line `BatchRequestOutput`.

The engine's results lines are OpenAI's output lines plus a `harness` object of measurements;
`output_line` keeps exactly OpenAI's fields (`id`, `custom_id`, `response`, `error`), with ids
unique across batches.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.api.store import BatchRow, FileRow

__all__ = [
    "OUTPUT_LINE_KEYS",
    "ApiError",
    "batch_object",
    "cached_details",
    "disk_full",
    "error_body",
    "file_object",
    "is_disk_full",
    "list_object",
    "output_line",
]

OUTPUT_LINE_KEYS = ("id", "custom_id", "response", "error")
"""The keys of a line of a batch's output and error files (BatchRequestOutput)."""


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""No space left, quota exceeded, file size limit (RLIMIT_FSIZE): the disk is full to us."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, says the disk (or this process's
    share of it) is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if isinstance(exc, sqlite3.Error) and "full" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def disk_full(data_dir: Path, exc: BaseException) -> ApiError:
    """The OpenAI-shaped answer to a full disk: 507, naming the data dir."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ApiError(
        507,
        f"The data dir {data_dir} is full ({reason}): nothing was kept of this request. Free "
        "space there (delete files this service keeps: DELETE /v1/files/{id}) and try again.",
        type="server_error",
        code="insufficient_storage",
    )


def file_object(row: FileRow) -> dict[str, Any]:
    """An `OpenAIFile`."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "expires_at": None,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(
    row: BatchRow, *, completed: int | None = None, failed: int | None = None
) -> dict[str, Any]:
    """A `Batch`; `completed` / `failed` override the stored counts with live ones."""
    done = row.completed if completed is None else completed
    bad = row.failed if failed is None else failed
    usage = None
    if row.prompt_tokens or row.completion_tokens:
        usage = {
            "input_tokens": row.prompt_tokens,
            "input_tokens_details": cached_details(row, done),
            "output_tokens": row.completion_tokens,
            # Reasoning tokens only when the replies reported them: never a 0 not measured.
            "output_tokens_details": (
                {"reasoning_tokens": row.reasoning_tokens}
                if row.reasoning_tokens is not None
                else {}
            ),
            "total_tokens": row.prompt_tokens + row.completion_tokens,
        }
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "model": row.model,
        "errors": {"object": "list", "data": list(row.errors)} if row.errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": row.expired_at,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.total, "completed": done, "failed": bad},
        "usage": usage,
        "metadata": row.metadata,
    }


def cached_details(row: BatchRow, completed: int | None = None) -> dict[str, Any]:
    """`usage.input_tokens_details`: `cached_tokens` is the sum only when every completed
    request's server reported it, else null (unknown, never counted as 0); the extra fields
    say how many reported it (`cached_tokens_coverage`, a share of the completed requests),
    what they reported (`cached_tokens_reported`) and where it came from
    (`cached_tokens_source`, as `harness.metrics` names it)."""
    done = row.completed if completed is None else completed
    every = done > 0 and row.cached_known >= done
    details: dict[str, Any] = {
        "cached_tokens": row.cached_tokens if every else None,
        "cached_tokens_source": row.cached_source or "unknown",
        "cached_tokens_coverage": round(row.cached_known / done, 4) if done else None,
    }
    if row.cached_known and not every:
        details["cached_tokens_reported"] = row.cached_tokens
    return details


def list_object(data: Sequence[Mapping[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor-paged list envelope (`after` = the last id of a page)."""
    return {
        "object": "list",
        "data": list(data),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def output_line(line: Mapping[str, Any], batch_id: str, n: int) -> dict[str, Any]:
    """A results line as OpenAI's `BatchRequestOutput`: its `n`-th line of the batch, with
    `id` and `request_id` unique across batches and the harness's measurements left out."""
    tag = f"{batch_id.removeprefix('batch_')}_{n}"
    response = line.get("response")
    if isinstance(response, Mapping):
        response = {
            "status_code": response.get("status_code", 200),
            "request_id": f"req_{tag}",
            "body": response.get("body"),
        }
    error = line.get("error")
    if isinstance(error, Mapping):
        error = {"code": error.get("code"), "message": error.get("message")}
    return {
        "id": f"batch_req_{tag}",
        "custom_id": line.get("custom_id"),
        "response": response if error is None else None,
        "error": error,
    }
