"""`harness api`: the command line of the service (argparse), and `serve` (uvicorn).

Exit codes: 0 stopped by Ctrl-C or SIGTERM; 1 the service could not start (port taken, model
server failed); 2 bad usage or settings (one line on stderr, nothing started), among them a
non-loopback `--host` without an API key, and a data dir another `harness api` uses (the line
names its pid and command; nothing in the dir is read or touched).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.api.runner import NO_SEAMS, Seams
from harness.api.settings import (
    API_KEY_ENV,
    DEFAULT_DATA_DIR,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_LINES,
    DEFAULT_MAX_QUEUED_BATCHES,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STORED_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PORT,
    ApiSettings,
)
from harness.errors import HarnessError, LockHeld
from harness.lock import keep_secret, secret
from harness.run.given import Formatter, Parser, add_options, count, given
from harness.run.settings import RunConfig

__all__ = ["READY_PREFIX", "build_parser", "main", "serve"]

READY_PREFIX = "harness api: listening on "
"""The line printed on stdout once the service answers (then the URL)."""

_DESCRIPTION = """\
Serve OpenAI's Files and Batches API over the harness engine, so the official openai client
(or any tool that speaks the Batch API) runs batch jobs on a local model:

  client = OpenAI(base_url="http://127.0.0.1:4080/v1", api_key="unused")
  f = client.files.create(file=open("batch.jsonl", "rb"), purpose="batch")
  b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                            completion_window="24h")

Batches run one at a time on the engine (every custom_id exactly once, resumable), with the
settings `harness run` resolves: these options, then harness.yaml's measured values (strategy,
concurrency, context, trim policy), then defaults. State lives in --data-dir (SQLite); killed
and restarted, the service resumes open batches. The page at / shows progress, /metrics is
Prometheus text, /health needs no key.

Security: loopback by default. There it answers only requests addressed to 127.0.0.1:PORT or
localhost:PORT (the Host header: a web page reaching it through another hostname, DNS
rebinding, is refused), and from any web origin but its own none (the Origin header); routes
that read JSON take only Content-Type: application/json. An API key (--api-key, or better the
environment variable HARNESS_API_KEY: a command line is visible to other users) is checked as a
Bearer token on every route but /health, on loopback too; the page then takes it as your
browser's password (any user name). Any other --host needs one. The key is never written to
disk or to a log. With --backend openai and OPENAI_API_KEY set, the pass-through
(/v1/chat/completions, /v1/models) would let any caller spend that key: it needs an API key of
this service, and is refused without one. Servers the service starts see neither key.

One service per --data-dir (a lock: a second one exits 2 naming the first). Quotas, each
refused with an OpenAI-shaped error naming the option that raises it: --max-stored-bytes,
--max-files, --max-queued-batches. A batch whose lines name a model this service does not
serve fails validation (model_not_found), unless --serve-any-model runs it on the served model
(its metadata then says which model the lines asked for)."""


_SHARED_AFTER = (
    "config", "profile", "stop_on_cache_miss", "strategy", "concurrency", "ctx", "threads",
    "request_path", "server_flags", "servers",
)  # fmt: skip
"""The options `harness api` shares with `harness run` (`harness.run.given`), declared after
the service's own ones (the first three, --backend, --model and --base-url, come before them)."""


def build_parser(prog: str = "harness api") -> argparse.ArgumentParser:
    """The parser of `harness api`'s options."""
    d = ApiSettings()
    p = Parser(prog=prog, description=_DESCRIPTION, formatter_class=Formatter)
    p.add_argument("--host", default=d.host, help="address to listen on (loopback by default)")
    p.add_argument(
        "--port", type=count, default=DEFAULT_PORT, help="port to listen on; 0 picks a free one"
    )
    add_options(p, "api", "backend", "model", "base_url")
    p.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        metavar="DIR",
        help="where the state (SQLite) and the files are kept",
    )
    p.add_argument(
        "--api-key",
        default=None,
        type=secret,  # noted as a secret whichever way it is spelled: never in a file or message
        metavar="KEY",
        help=f"Bearer token every route but /health requires (default: ${API_KEY_ENV}; "
        "required for a non-loopback --host)",
    )
    p.add_argument(
        "--max-upload-bytes",
        type=count,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        metavar="N",
        help="largest file an upload may be",
    )
    p.add_argument(
        "--max-request-bytes",
        type=count,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest body any other request (a chat completion, a batch) may have",
    )
    p.add_argument(
        "--max-lines",
        type=count,
        default=DEFAULT_MAX_LINES,
        metavar="N",
        help="most lines (requests) an uploaded file may have",
    )
    p.add_argument(
        "--max-stored-bytes",
        type=count,
        default=DEFAULT_MAX_STORED_BYTES,
        metavar="N",
        help="quota: bytes of all files kept together (uploads and batch outputs)",
    )
    p.add_argument(
        "--max-files",
        type=count,
        default=DEFAULT_MAX_FILES,
        metavar="N",
        help="quota: files kept (uploads and batch outputs)",
    )
    p.add_argument(
        "--max-queued-batches",
        type=count,
        default=DEFAULT_MAX_QUEUED_BATCHES,
        metavar="N",
        help="quota: batches not yet ended (validating, in progress, finalizing)",
    )
    p.add_argument(
        "--serve-any-model",
        action="store_true",
        help="run a batch whose lines name another model on the served one (its metadata "
        "notes the model asked for); without it such a batch fails with model_not_found",
    )
    add_options(p, "api", *_SHARED_AFTER)
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="what the service logs on stderr",
    )
    return p


def settings_from(args: argparse.Namespace) -> ApiSettings:
    """Settings from parsed options; the key from --api-key or $HARNESS_API_KEY (noted as a
    secret: `harness.lock` redacts it wherever it would be written or shown)."""
    keep_secret(os.environ.get(API_KEY_ENV))
    return ApiSettings(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir),
        max_upload_bytes=args.max_upload_bytes,
        max_request_bytes=args.max_request_bytes,
        max_lines=args.max_lines,
        max_stored_bytes=args.max_stored_bytes,
        max_files=args.max_files,
        max_queued_batches=args.max_queued_batches,
        serve_any_model=args.serve_any_model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        **given(args, "api"),  # the options shared with `harness run`
    )


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    return f"http://[{host}]:{port}" if v6 else f"http://{host}:{port}"


def serve(
    settings: ApiSettings,
    *,
    log_level: str = "info",
    config: RunConfig | None = None,
    seams: Seams = NO_SEAMS,
    lock: contextlib.AbstractContextManager[None] | None = None,
) -> int:
    """Run the service until Ctrl-C or SIGTERM. Prints `READY_PREFIX + URL` once it answers.
    `config`: the run configuration `settings.validate()` resolved (None: resolved here);
    `seams`: test seams (`harness.testing.seams`); `lock`: the data dir's lock, held by the
    caller (None: the service takes it as it starts)."""
    import uvicorn

    from harness.api.app import create_app

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("harness api: %(message)s"))
    logger = logging.getLogger("harness.api")
    logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    logger.propagate = False
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        print(
            f"harness api: error: cannot listen on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    url = _url(sock)

    def ready(backend: str) -> None:
        print(f"{READY_PREFIX}{url} ({backend}; data in {settings.data_dir})", flush=True)

    app = create_app(settings, on_ready=ready, config=config, seams=seams, lock=lock)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the signal again under the
    # handlers it found: these, so that a requested stop ends with exit 0, not a signal death.
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, before in previous.items():
            signal.signal(sig, before)
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None, *, seams: Seams = NO_SEAMS) -> int:
    """`harness api`: parse, check the settings (exit 2, one line), take the data dir's lock
    (exit 2, one line naming the holder, when another service has it), serve. `seams`: test
    seams (tests/api_seamed.py passes `harness.testing.seams.ApiSeams`)."""
    from harness.api.service import data_dir_lock

    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    try:
        config = settings.validate()
    except HarnessError as exc:
        print(f"harness api: error: {exc}", file=sys.stderr)
        return 2
    if args.api_key:
        print(
            f"harness api: note: --api-key is visible to other users in the process list; "
            f"prefer the environment variable {API_KEY_ENV}",
            file=sys.stderr,
        )
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(data_dir_lock(settings))
        except LockHeld as exc:
            print(f"harness api: error: {exc}", file=sys.stderr)
            return 2
        return serve(
            settings,
            log_level=args.log_level,
            config=config,
            seams=seams,
            lock=contextlib.nullcontext(),
        )
