"""The ASGI app: OpenAI's Files and Batches routes, the pass-through, the page, /metrics, /health.

Routes (every one but `/health` needs `Authorization: Bearer <key>` when a key is set)::

    POST   /v1/files                 multipart: file, purpose=batch
    GET    /v1/files                 ?purpose= &after= &limit= &order=
    GET    /v1/files/{id}            DELETE /v1/files/{id}       GET /v1/files/{id}/content
    POST   /v1/batches               {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches               ?after= &limit=   (newest first, has_more)
    GET    /v1/batches/{id}          POST /v1/batches/{id}/cancel
    POST   /v1/chat/completions      GET /v1/models    (passed through to the model server)
    GET    /                         the batches page     GET /batches/{id}/throughput.png
    GET    /metrics                  Prometheus text      GET /health

Errors are answered in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
unknown routes, malformed requests and a full disk (507, naming the data dir) included. Three
ASGI layers sit in front of the routes (`harness.api.guards`): the Host and Origin check (a web
page in the user's browser is not a caller), the key check (before anything is read), then the
body limit (an upload over `--max-upload-bytes`, any other request body over
`--max-request-bytes`, is cut off while it streams in, not after it was read or stored).
Uploads stream straight into the data dir (`harness.api.uploads`); routes that read JSON take
only a JSON Content-Type.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from harness.api.guards import CallerCheck, KeyCheck, require_json, send_json
from harness.api.metrics import CONTENT_TYPE, render_metrics
from harness.api.page import BatchView, render_page
from harness.api.runner import NO_SEAMS, RESULTS_NAME, Seams
from harness.api.schemas import (
    ApiError,
    batch_object,
    disk_full,
    error_body,
    file_object,
    is_disk_full,
    list_object,
)
from harness.api.service import Service
from harness.api.settings import ApiSettings, is_loopback
from harness.api.store import TERMINAL_STATUSES, BatchRow
from harness.backends.base import Backend
from harness.run.settings import RunConfig

__all__ = ["ServiceDep", "create_app", "router", "service_of"]

log = logging.getLogger("harness.api")

PAGE_BATCHES = 100
"""Batches the page and /metrics show (the newest)."""
_MULTIPART_SLACK = 64 * 1024
"""Bytes a multipart body may carry beyond the file itself (boundaries, the purpose field)."""


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI layer: a request body over its limit is refused (413) as it streams in: an upload
    (POST /v1/files) over --max-upload-bytes, any other body over --max-request-bytes."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.upload_limit = service.settings.max_upload_bytes + _MULTIPART_SLACK
        self.request_limit = service.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"] == "/v1/files"
        limit = self.upload_limit if upload else self.request_limit
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(send, upload)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(send, upload)

    async def _refuse(self, send: Send, upload: bool) -> None:
        settings = self.service.settings
        if upload:
            self.service.counters.uploads_refused += 1
            body = error_body(
                f"The file is larger than this service's limit of {settings.max_upload_bytes} "
                "bytes (--max-upload-bytes).",
                param="file",
                code="file_too_large",
            )
        else:
            self.service.counters.bodies_refused += 1
            body = error_body(
                f"The request body is larger than this service's limit of "
                f"{settings.max_request_bytes} bytes (--max-request-bytes).",
                code="request_too_large",
            )
        await send_json(send, 413, body, connection="close")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"Invalid '{name}': {raw!r} is not an integer.", param=name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"Invalid '{name}': must be between {lo} and {hi}.", param=name)
    return value


# -- the service, as the routes' dependency ---------------------------------------------------


async def service_of(request: Request) -> Service:
    """The app's service (`create_app` keeps it on `app.state`): every route's dependency.
    A coroutine, so FastAPI calls it on the event loop, not in a worker thread."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(service_of)]


def current(service: Service, row: BatchRow) -> BatchRow:
    """The row with the running batch's live counts."""
    live = service.live
    if live is not None and live.batch_id == row.id and row.status == "in_progress":
        return dataclasses.replace(row, **live.counts())
    return row


def view(service: Service, row: BatchRow) -> BatchView:
    """A batch as the page and /metrics show it: live counts, rate and ETA while it runs."""
    row = current(service, row)
    live = service.live
    if live is not None and live.batch_id == row.id and row.status == "in_progress":
        return BatchView(
            row,
            row.completed,
            row.failed,
            rate_rps=live.progress.rate(),
            eta_s=live.progress.eta_s(),
            running=True,
        )
    rate = None
    end = row.completed_at or row.cancelled_at or row.expired_at or row.failed_at
    if end and row.in_progress_at and end > row.in_progress_at:
        rate = (row.completed + row.failed) / (end - row.in_progress_at)
    return BatchView(row, row.completed, row.failed, rate_rps=rate)


def views(service: Service) -> list[BatchView]:
    return [view(service, r) for r in service.db.list_batches(after=None, limit=PAGE_BATCHES).rows]


def access_note(request: Request, api_key: str | None) -> str:
    """The page's line on who may call the service and how a program does."""
    url = f"{request.url.scheme}://{request.headers.get('host', '')}/v1"
    if api_key:
        return (
            "This service needs its API key: programs pass it as a Bearer token, "
            f'e.g. OpenAI(base_url="{url}", api_key=os.environ["HARNESS_API_KEY"]); '
            "this page took it as your browser's password (any user name)."
        )
    return (
        "No API key: any program on this machine may call this service (start it with "
        f'HARNESS_API_KEY set to require one). Programs: OpenAI(base_url="{url}", '
        'api_key="unused").'
    )


# -- errors in OpenAI's shape ----------------------------------------------------------------


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = (
        f"Invalid URL ({request.method} {request.url.path})"
        if exc.status_code in (404, 405)
        else str(exc.detail)
    )
    return JSONResponse(error_body(message), status_code=exc.status_code)


async def storage_error(request: Request, exc: Exception) -> JSONResponse:
    """A full disk is a 507 naming the data dir; any other storage error is raised on."""
    if not is_disk_full(exc):
        raise exc
    service: Service = request.app.state.service
    error = disk_full(service.settings.data_dir, exc)
    return JSONResponse(error.body(), status_code=error.status_code)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSONResponse(
        error_body(str(first.get("msg", "Invalid request.")), param=param), status_code=400
    )


ERROR_HANDLERS: tuple[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]], ...] = (
    (ApiError, api_error),
    (StarletteHTTPException, http_error),
    (sqlite3.Error, storage_error),
    (OSError, storage_error),
    (RequestValidationError, invalid),
)
"""Each error the routes can meet, answered in OpenAI's shape (`create_app` registers them)."""


# -- the routes --------------------------------------------------------------------------------

router = APIRouter()
"""Every route; `create_app` includes it, each handler gets the service as `ServiceDep`."""


@router.post("/v1/files")
async def upload(request: Request, service: ServiceDep) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    return JSONResponse(file_object(await service.add_upload(content_type, request.stream())))


@router.get("/v1/files")
async def list_files(request: Request, service: ServiceDep) -> JSONResponse:
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "Invalid 'order': use 'asc' or 'desc'.", param="order")
    page = service.list_files(
        purpose=request.query_params.get("purpose"),
        after=request.query_params.get("after"),
        limit=_int_param(request, "limit", 10_000, 1, 10_000),
        order=order,
    )
    return JSONResponse(list_object([file_object(r) for r in page.rows], page.has_more))


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, service: ServiceDep) -> JSONResponse:
    return JSONResponse(file_object(service.get_file(file_id)))


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, service: ServiceDep) -> JSONResponse:
    row = service.delete_file(file_id)
    return JSONResponse({"id": row.id, "object": "file", "deleted": True})


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, service: ServiceDep) -> FileResponse:
    row = service.get_file(file_id)
    return FileResponse(
        service.db.blob_path(row.id),
        media_type="application/octet-stream",
        filename=row.filename,
    )


@router.post("/v1/batches")
async def create_batch(request: Request, service: ServiceDep) -> JSONResponse:
    require_json(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return JSONResponse(batch_object(service.create_batch(body)))


@router.get("/v1/batches")
async def list_batches(request: Request, service: ServiceDep) -> JSONResponse:
    page = service.list_batches(
        after=request.query_params.get("after"),
        limit=_int_param(request, "limit", 20, 1, 100),
    )
    data = [batch_object(current(service, r)) for r in page.rows]
    return JSONResponse(list_object(data, page.has_more))


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, service: ServiceDep) -> JSONResponse:
    return JSONResponse(batch_object(current(service, service.get_batch(batch_id))))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, service: ServiceDep) -> JSONResponse:
    return JSONResponse(batch_object(current(service, service.cancel_batch(batch_id))))


async def passthrough(service: Service, method: str, path: str, body: bytes | None) -> Response:
    """The model server's reply, streamed back with its status, Content-Type and Cache-Control."""
    upstream = await service.forward(method, path, body)
    headers = {
        k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")
    }
    # aiter_bytes: decoded as the upstream's Content-Encoding says, which is not passed on.
    return StreamingResponse(
        upstream.aiter_bytes(),
        status_code=upstream.status_code,
        headers=headers,
        background=BackgroundTask(upstream.aclose),
    )


@router.post("/v1/chat/completions")
async def chat(request: Request, service: ServiceDep) -> Response:
    require_json(request)
    return await passthrough(service, "POST", "/v1/chat/completions", await request.body())


@router.get("/v1/models")
async def models(service: ServiceDep) -> Response:
    return await passthrough(service, "GET", "/v1/models", None)


@router.get("/", response_class=HTMLResponse)
async def page(request: Request, service: ServiceDep) -> HTMLResponse:
    info = service.backend.info
    server = f"{info.backend} · {info.model} · {info.server}"
    note = access_note(request, service.settings.api_key)
    return HTMLResponse(render_page(views(service), server=server, access=note))


@router.get("/batches/{batch_id}/throughput.png")
async def throughput_plot(request: Request, batch_id: str, service: ServiceDep) -> FileResponse:
    row = service.get_batch(batch_id)
    if row.status not in TERMINAL_STATUSES:
        raise ApiError(404, f"Batch {batch_id} has no report until it ends.")
    out = service.db.batch_dir(row.id) / "throughput.png"
    if not out.exists():
        plot_lock: asyncio.Lock = request.app.state.plot_lock
        async with plot_lock:  # one drawing at a time; the first request draws it
            if not out.exists():
                results = service.db.batch_dir(row.id) / RESULTS_NAME
                await asyncio.to_thread(_draw_throughput, results, out, row.id)
    return FileResponse(out, media_type="image/png")


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    db = service.db
    text = render_metrics(views(service), db.status_counts(), db.count_files(), service.counters)
    return Response(text, media_type=CONTENT_TYPE)


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    ok = service.store is not None and await service.backend.health()
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


# -- the app -----------------------------------------------------------------------------------


def lifespan_of(
    service: Service, on_ready: Callable[[str], None] | None
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: the service started (stopped again if starting fails), `on_ready`
    told, the service stopped when the app ends."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await service.start()
        except BaseException as exc:
            log.error("could not start: %s", exc)
            await service.stop()
            raise
        if on_ready is not None:
            info = service.backend.info
            on_ready(f"{info.backend} {info.model} at {info.base_url}")
        try:
            yield
        finally:
            await service.stop()

    return lifespan


def create_app(
    settings: ApiSettings,
    *,
    backend: Backend | None = None,
    on_ready: Callable[[str], None] | None = None,
    config: RunConfig | None = None,
    seams: Seams = NO_SEAMS,
    lock: contextlib.AbstractContextManager[None] | None = None,
) -> FastAPI:
    """The app for these settings. `backend`: one to use instead of the one the settings name
    (not started; tests pass the in-process double); `on_ready(description)` is called once the
    model server and the worker are up; `config`: the run configuration already resolved from
    the settings (`settings.validate()`), else resolved here, once; `seams`: test seams
    (`harness.testing.seams`); `lock`: the data dir's lock, taken by the caller (else the
    service takes it when it starts)."""
    service = Service(settings, backend=backend, config=config, seams=seams, lock=lock)
    app = FastAPI(
        title="harness api",
        summary="OpenAI's Files and Batches API over the harness engine",
        lifespan=lifespan_of(service, on_ready),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.state.plot_lock = asyncio.Lock()
    for kind, handler in ERROR_HANDLERS:
        app.exception_handler(kind)(handler)
    app.include_router(router)

    # The last added is the outermost: who calls is checked first, then the key, both before
    # the body is read.
    def unauthorized() -> None:
        service.counters.unauthorized += 1

    def foreign() -> None:
        service.counters.callers_refused += 1

    app.add_middleware(BodyLimit, service=service)
    app.add_middleware(KeyCheck, key=settings.api_key, on_refused=unauthorized)
    app.add_middleware(CallerCheck, loopback=is_loopback(settings.host), on_refused=foreign)
    return app


def _draw_throughput(results: Path, out: Path, batch_id: str) -> None:
    from harness.engine import read_results
    from harness.plots import plot_throughput_over_run

    finish: list[float | None] = []
    latency: list[float | None] = []
    for line in read_results(results):
        h = line.get("harness") or {}
        finish.append(h.get("finished"))
        latency.append(h.get("latency_ms") if line.get("error") is None else None)
    start = min((t for t in finish if t is not None), default=0.0)
    # Drawn under a name of its own, then renamed: a request never reads half a PNG.
    tmp = out.with_name(f".{out.stem}-{secrets.token_hex(6)}.png")
    try:
        plot_throughput_over_run(finish, latency, tmp, start_s=start, title=f"Batch {batch_id}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
