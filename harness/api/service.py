"""The service behind the routes: state, the model server, the batch worker, and what each
route does with them (the routes in `harness.api.app` only translate HTTP).

`Service.start()` opens the data dir, removes blobs a crash left unnamed, stops the llama.cpp
servers that a SIGKILLed earlier run of the service left behind (`harness.api.servers`: their
pids and start times are noted in SQLite, again after every relaunch; the embedded server runs
in its own session, so it outlives a SIGKILLed parent), starts the backend and the worker.
`Service.stop()` stops them; a batch that was running stays `in_progress` and resumes at the
next start.

The run configuration (`batch_config`: the command line, then harness.yaml, then defaults) is
resolved once, when the service is made (or given, already resolved by the command line's
check), and reused by every batch.

The pass-through sends requests to the model server as they came. When the backend reaches
it with credentials (the openai backend with `OPENAI_API_KEY` set), a caller would spend them:
the pass-through then needs this service's own API key, and is refused without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from harness.api.runner import NO_SEAMS, BatchWorker, Live, Seams
from harness.api.schemas import ApiError, disk_full, is_disk_full
from harness.api.servers import (
    ServerNotes,
    needs_env_credentials,
    reap,
    scrubbed_env,
    server_pids,
)
from harness.api.settings import ApiSettings
from harness.api.store import (
    OPEN_STATUSES,
    BatchRow,
    FileRow,
    Page,
    Store,
    UnknownCursor,
    new_batch_id,
    new_file_id,
    now,
)
from harness.api.uploads import receive_upload
from harness.api.validate import SUPPORTED_ENDPOINTS
from harness.backends.base import Backend
from harness.backends.openai import OpenAIBackend
from harness.errors import BackendError
from harness.lock import hold
from harness.run.factory import open_backend
from harness.run.options import batch_config
from harness.run.preflight import fitted
from harness.run.settings import RunConfig

__all__ = ["COMPLETION_WINDOWS", "Counters", "Service", "data_dir_lock"]

log = logging.getLogger("harness.api")

COMPLETION_WINDOWS = {"24h": 24 * 3600}
"""OpenAI takes `24h` only."""
_METADATA_MAX = (16, 64, 512)
"""Metadata: at most 16 pairs, keys up to 64 characters, values up to 512 (OpenAI's limits)."""
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


@dataclass(slots=True)
class Counters:
    """Service-wide counters for /metrics."""

    passthrough_requests: int = 0
    passthrough_errors: int = 0
    passthrough_refused: int = 0
    """Pass-through requests refused: the upstream's credentials need this service's key."""
    uploads: int = 0
    uploads_refused: int = 0
    bodies_refused: int = 0
    """Request bodies (not uploads) over --max-request-bytes."""
    unauthorized: int = 0
    callers_refused: int = 0
    """Requests refused for their Host or Origin (`harness.api.guards.CallerCheck`)."""


def _bad_cursor(kind: str, after: str) -> ApiError:
    return ApiError(
        400,
        f"Invalid 'after': no {kind} with id {after!r} (the cursor is the id of the last "
        "object of the previous page).",
        param="after",
        code="invalid_cursor",
    )


def _clean_filename(name: str | None) -> str:
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    return _SAFE_NAME.sub("_", base)[:200] or "upload.jsonl"


class Service:
    """See the module docstring."""

    def __init__(
        self,
        settings: ApiSettings,
        *,
        backend: Backend | None = None,
        config: RunConfig | None = None,
        seams: Seams = NO_SEAMS,
        lock: contextlib.AbstractContextManager[None] | None = None,
    ) -> None:
        self.settings = settings
        self.seams = seams
        self._lock = lock
        """The data dir's lock, when the caller took it (the command line does, to exit 2);
        else `start` takes it."""
        self._locks = contextlib.ExitStack()
        self._receiving: dict[str, int] = {}
        """Uploads under way: bytes received so far (counted against the storage quota)."""
        self.options = settings.batch_options()
        self.config = config if config is not None else batch_config(self.options)
        """The run configuration, resolved once (see the module docstring)."""
        self.backend = backend if backend is not None else open_backend(self.config)
        self.store: Store | None = None
        self.notes: ServerNotes | None = None
        self.worker: BatchWorker | None = None
        self.counters = Counters()
        self._worker_task: asyncio.Task[None] | None = None
        self._passthrough: httpx.AsyncClient | None = None
        self._passthrough_url: str | None = None
        self.started_at = now()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        # One service per data dir: taken before anything in it is read, and before `reap`
        # stops the model servers noted there (a running service's own).
        self._locks.enter_context(self._lock or data_dir_lock(self.settings))
        store = self.store = Store(self.settings.data_dir)
        swept = store.sweep_blobs()
        if swept:
            log.info("removed %d file(s) an interrupted finalization left unnamed", swept)
        reap(store)
        notes = self.notes = ServerNotes(store)
        await self.start_backend()
        cfg = fitted(self.config, self.backend)
        log.info(
            "batches run with strategy %s (%s), concurrency %s (%s), context %s (%s)",
            cfg.strategy.value, cfg.strategy.source, cfg.concurrency.value,
            cfg.concurrency.source, cfg.max_context_tokens.value, cfg.max_context_tokens.source,
        )  # fmt: skip
        self.worker = BatchWorker(
            store,
            self.backend,
            self.config,
            max_lines=self.settings.max_lines,
            start_backend=self.start_backend,
            note_helper=lambda pid: notes.note("tokenizer", pid),
            any_model=self.settings.serve_any_model,
            max_line_bytes=self.max_line_bytes,
            validation_timeout_s=self.settings.validation_timeout_s,
            seams=self.seams,
            stop_on_cache_miss=self.settings.stop_on_cache_miss,
        )
        self._worker_task = asyncio.create_task(self.worker.run_forever(), name="batch-worker")

    async def start_backend(self) -> None:
        """Start (or relaunch) the backend and note the server it runs now (a relaunched
        llama.cpp server has a new pid and port). A server it launches gets an environment
        without the service's secrets (`scrubbed_env`)."""
        if needs_env_credentials(self.backend):
            await self.backend.start()
        else:
            with scrubbed_env():
                await self.backend.start()
        if self.notes is not None:  # every server: a pool (--servers N) has several
            self.notes.note_all("model", server_pids(self.backend))

    async def stop(self) -> None:
        if self._worker_task is not None:
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker_task
        if self.worker is not None:
            await self.worker.close()
        if self._passthrough is not None:
            await self._passthrough.aclose()
        await self.backend.stop()
        if self.store is not None:
            if self.notes is not None:
                self.notes.clear()
            self.store.close()
        self._locks.close()

    @property
    def max_line_bytes(self) -> int:
        """The longest line of a batch file: one request, so --max-request-bytes (16 MB by
        default, as `harness run`'s `harness.inputs.MAX_LINE_BYTES`)."""
        return self.settings.max_request_bytes

    @property
    def db(self) -> Store:
        if self.store is None:
            raise ApiError(503, "The service is starting.", type="server_error")
        return self.store

    @property
    def live(self) -> Live | None:
        return self.worker.live if self.worker is not None else None

    # -- files -------------------------------------------------------------------------------

    async def add_upload(self, content_type: str, body: AsyncIterator[bytes]) -> FileRow:
        """Store an upload as it streams in (`harness.api.uploads`), refusing it as soon as it
        passes a limit or a quota (nothing kept then); a full disk is a 507 naming the data
        dir, nothing half-written."""
        db = self.db
        self._check_file_quota()
        file_id = new_file_id()
        final = db.blob_path(file_id)
        tmp = final.with_name(f".{final.name}.tmp")
        self._receiving[file_id] = 0
        try:
            stored = db.stored_bytes()

            def check(size: int, lines: int) -> None:
                self._receiving[file_id] = size
                self._check_upload(size, lines, stored)

            got = await receive_upload(content_type, body, tmp, check=check)
            purpose = got.fields.get("purpose")
            if not got.has_file:
                raise ApiError(
                    400, "Missing required parameter: 'file'.", param="file",
                    code="missing_required_parameter",
                )  # fmt: skip
            if not purpose:
                raise ApiError(
                    400, "Missing required parameter: 'purpose'.", param="purpose",
                    code="missing_required_parameter",
                )  # fmt: skip
            if purpose != "batch":
                raise ApiError(
                    400,
                    f"Invalid purpose {purpose!r}: this service stores batch input files "
                    "(purpose `batch`).",
                    param="purpose",
                )
            if got.size == 0:
                raise ApiError(400, "The file is empty.", param="file", code="empty_file")
            os.replace(tmp, final)
            name = _clean_filename(got.filename)
            row = FileRow(file_id, name, purpose, got.size, got.lines, now())
            try:
                db.add_file(row)
            except BaseException:
                final.unlink(missing_ok=True)
                raise
        except (OSError, sqlite3.Error) as exc:
            if is_disk_full(exc):
                self.counters.uploads_refused += 1
                raise disk_full(self.settings.data_dir, exc) from None
            raise
        finally:
            self._receiving.pop(file_id, None)
            tmp.unlink(missing_ok=True)
        self.counters.uploads += 1
        return row

    def _check_file_quota(self) -> None:
        kept = self.db.count_files() + len(self._receiving)
        limit = self.settings.max_files
        if kept >= limit:
            self.counters.uploads_refused += 1
            raise ApiError(
                400,
                f"This service keeps at most {limit} files (--max-files) and has {kept}: "
                "delete files you no longer need (DELETE /v1/files/{id}), or restart harness "
                "api with a larger --max-files.",
                param="file",
                code="files_quota_exceeded",
            )

    def _check_upload(self, size: int, lines: int, stored: int) -> None:
        """Refuse an upload of `size` bytes so far past the size limit, the storage quota or
        the line limit (OpenAI-shaped, naming the option that raises it)."""
        settings = self.settings
        if size > settings.max_upload_bytes:
            self.counters.uploads_refused += 1
            raise ApiError(
                413,
                f"The file is larger than this service's limit of {settings.max_upload_bytes} "
                "bytes (--max-upload-bytes).",
                param="file",
                code="file_too_large",
            )
        others = sum(n for n in self._receiving.values()) - size
        if stored + others + size > settings.max_stored_bytes:
            self.counters.uploads_refused += 1
            raise ApiError(
                413,
                f"Storing this file would pass this service's quota of "
                f"{settings.max_stored_bytes} bytes of files kept (--max-stored-bytes; "
                f"{stored} kept now): delete files you no longer need (DELETE "
                "/v1/files/{id}), or restart harness api with a larger --max-stored-bytes.",
                param="file",
                code="storage_quota_exceeded",
            )
        if lines > settings.max_lines:
            self.counters.uploads_refused += 1
            raise ApiError(
                400,
                f"The file has more than {settings.max_lines} request lines, this service's "
                "limit (--max-lines); blank lines are not counted.",
                param="file",
                code="too_many_lines",
            )

    def list_files(self, *, purpose: str | None, after: str | None, limit: int, order: str) -> Page:
        try:
            return self.db.list_files(purpose=purpose, after=after, limit=limit, order=order)
        except UnknownCursor as exc:
            raise _bad_cursor("file", exc.after) from None

    def get_file(self, file_id: str) -> FileRow:
        row = self.db.get_file(file_id)
        if row is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code=None)
        return row

    def delete_file(self, file_id: str) -> FileRow:
        row = self.get_file(file_id)
        using = self.db.open_batches_of_file(file_id)
        if using:
            raise ApiError(
                409,
                f"File {file_id} is the input of batch {using[0]}, which is still running; "
                "cancel it first.",
                param="file_id",
            )
        self.db.delete_file(file_id)
        return row

    # -- batches -----------------------------------------------------------------------------

    def create_batch(self, body: Mapping[str, Any]) -> BatchRow:
        """Check the request like OpenAI does; the input lines are validated in the background."""
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        metadata = body.get("metadata")
        for name, value in (
            ("input_file_id", input_file_id),
            ("endpoint", endpoint),
            ("completion_window", window),
        ):
            if not isinstance(value, str) or not value:
                raise ApiError(
                    400,
                    f"Missing required parameter: '{name}'.",
                    param=name,
                    code="missing_required_parameter",
                )
        assert isinstance(input_file_id, str) and isinstance(endpoint, str)
        assert isinstance(window, str)
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid endpoint {endpoint!r}: this service runs "
                f"{', '.join(SUPPORTED_ENDPOINTS)}.",
                param="endpoint",
            )
        if window not in COMPLETION_WINDOWS:
            raise ApiError(
                400,
                f"Invalid completion_window {window!r}: supported: "
                f"{', '.join(COMPLETION_WINDOWS)}.",
                param="completion_window",
            )
        meta = self._check_metadata(metadata)
        self._check_batch_quota()
        file = self.db.get_file(input_file_id)
        if file is None:
            raise ApiError(404, f"No such File object: {input_file_id}", param="input_file_id")
        if file.purpose != "batch":
            raise ApiError(
                400,
                f"File {input_file_id} has purpose {file.purpose!r}; a batch needs a file "
                "uploaded with purpose `batch`.",
                param="input_file_id",
            )
        created = now()
        row = self.db.add_batch(
            BatchRow(
                id=new_batch_id(),
                input_file_id=input_file_id,
                endpoint=endpoint,
                completion_window=window,
                status="validating",
                created_at=created,
                expires_at=created + COMPLETION_WINDOWS[window],
                metadata=meta,
            )
        )
        assert self.worker is not None
        self.worker.validate_soon(row.id)
        return row

    def _check_batch_quota(self) -> None:
        waiting = sum(self.db.status_counts().get(s, 0) for s in OPEN_STATUSES)
        limit = self.settings.max_queued_batches
        if waiting >= limit:
            raise ApiError(
                400,
                f"This service holds at most {limit} batches that have not ended "
                f"(--max-queued-batches) and has {waiting}: wait for some to end, cancel "
                "some, or restart harness api with a larger --max-queued-batches.",
                code="batch_quota_exceeded",
            )

    @staticmethod
    def _check_metadata(metadata: Any) -> dict[str, str] | None:
        if metadata is None:
            return None
        pairs, key_len, value_len = _METADATA_MAX
        if not isinstance(metadata, Mapping) or len(metadata) > pairs:
            raise ApiError(
                400, f"metadata must be an object of at most {pairs} pairs.", param="metadata"
            )
        for k, v in metadata.items():
            if not isinstance(k, str) or len(k) > key_len:
                raise ApiError(
                    400, f"metadata keys are strings of at most {key_len} characters.",
                    param="metadata",
                )  # fmt: skip
            if not isinstance(v, str) or len(v) > value_len:
                raise ApiError(
                    400, f"metadata values are strings of at most {value_len} characters.",
                    param="metadata",
                )  # fmt: skip
        return dict(metadata)

    def list_batches(self, *, after: str | None, limit: int) -> Page:
        try:
            return self.db.list_batches(after=after, limit=limit)
        except UnknownCursor as exc:
            raise _bad_cursor("batch", exc.after) from None

    def get_batch(self, batch_id: str) -> BatchRow:
        row = self.db.get_batch(batch_id)
        if row is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return row

    def cancel_batch(self, batch_id: str) -> BatchRow:
        row = self.get_batch(batch_id)
        if row.status == "cancelling":
            return row
        if not self.db.set_status_if(
            batch_id, ["validating", "in_progress"], status="cancelling", cancelling_at=now()
        ):
            current = self.get_batch(batch_id)
            raise ApiError(
                409,
                f"Cannot cancel a batch with status '{current.status}'.",
                param="batch_id",
            )
        assert self.worker is not None
        self.worker.cancel(batch_id)
        return self.get_batch(batch_id)

    # -- pass-through ------------------------------------------------------------------------

    def upstream_has_credentials(self) -> bool:
        """Whether the backend reaches the model server with credentials (an Authorization
        header: the openai backend's OPENAI_API_KEY)."""
        backend = self.backend
        if not isinstance(backend, OpenAIBackend):
            return False
        try:
            return bool(backend.client.headers.get("authorization"))
        except BackendError:
            return False

    async def _upstream(self) -> httpx.AsyncClient:
        backend = self.backend
        if isinstance(backend, OpenAIBackend):
            try:
                return backend.client  # carries the upstream key, if any; current after starts
            except BackendError as exc:
                raise ApiError(
                    503, "The model server is not started.", type="server_error"
                ) from exc
        url = backend.info.base_url
        if self._passthrough is not None and self._passthrough_url != url:
            # The server was relaunched (a new port): a client of the old address is useless.
            old, self._passthrough = self._passthrough, None
            await old.aclose()
        if self._passthrough is None:
            self._passthrough = httpx.AsyncClient(
                base_url=url, timeout=httpx.Timeout(600.0, connect=10.0)
            )
            self._passthrough_url = url
        return self._passthrough

    async def forward(self, method: str, path: str, body: bytes | None) -> httpx.Response:
        """Send a request to the model server as it came; returns the streamed response (the
        caller closes it)."""
        if self.upstream_has_credentials() and not self.settings.api_key:
            self.counters.passthrough_refused += 1
            raise ApiError(
                403,
                "The pass-through to the model server is off: this service reaches it with "
                "credentials (OPENAI_API_KEY), which any local caller would spend, and has no "
                "API key of its own. Start harness api with --api-key or HARNESS_API_KEY to "
                "use it; batches are not affected.",
                code="passthrough_needs_api_key",
            )
        self.counters.passthrough_requests += 1
        client = await self._upstream()
        request = client.build_request(
            method,
            path,
            content=body,
            headers={"Content-Type": "application/json"} if body is not None else None,
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            self.counters.passthrough_errors += 1
            raise ApiError(
                502,
                f"The model server did not answer ({type(exc).__name__}).",
                type="server_error",
            ) from exc
        if response.status_code >= 400:
            self.counters.passthrough_errors += 1
        return response


def data_dir_lock(settings: ApiSettings) -> contextlib.AbstractContextManager[None]:
    """The lock that makes one service the data dir's one writer (`harness.lock`): a second
    `harness api` on it exits 2 naming the first, before it reads or stops anything there."""
    return hold(
        settings.lock_path,
        what=f"the data dir {settings.data_dir}",
        advice="one harness api per data dir: stop that one, or give this one another --data-dir",
    )
