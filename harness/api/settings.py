"""What `harness api` was asked to do: one frozen settings object, checked before anything starts.

The model-server settings are `harness run`'s (`BatchOptions`, resolved by `batch_config`: the
command line, then harness.yaml's measured values, then defaults): the same options give the
same runs. The API key is held here only
in memory (`repr=False`): it is never written to disk or to a log.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import DEFAULT_CONFIG_PATH
from harness.errors import ConfigError
from harness.run.options import BatchOptions, batch_config
from harness.run.settings import RunConfig

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_DATA_DIR",
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_LINES",
    "DEFAULT_MAX_QUEUED_BATCHES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_STORED_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_PORT",
    "DEFAULT_VALIDATION_TIMEOUT_S",
    "LOCK_NAME",
    "ApiSettings",
    "is_loopback",
]

API_KEY_ENV = "HARNESS_API_KEY"
DEFAULT_PORT = 4080
"""The port of the roadmap's OpenAI-compatible server."""
DEFAULT_DATA_DIR = Path("harness-api-data")
DEFAULT_MAX_UPLOAD_BYTES = 200 * 1000 * 1000
"""OpenAI's limit for a batch input file (200 MB)."""
DEFAULT_MAX_REQUEST_BYTES = 16 * 1000 * 1000
"""Any other request body (a chat completion, a batch): 16 MB, room for a 1M-token prompt."""
DEFAULT_MAX_LINES = 200_000
"""Requests per file; OpenAI takes 50,000, the production job has 170,000."""
DEFAULT_MAX_STORED_BYTES = 20 * 1000 * 1000 * 1000
"""Bytes of every file kept together (uploads and batch outputs): 20 GB."""
DEFAULT_MAX_FILES = 1000
"""Files kept (uploads and batch outputs)."""
DEFAULT_MAX_QUEUED_BATCHES = 100
"""Batches not yet ended (validating, in progress, finalizing, cancelling) at one time."""
DEFAULT_VALIDATION_TIMEOUT_S = 600.0
"""A batch still validating this long after its creation fails (restarts included)."""
LOCK_NAME = "harness-api.lock"
"""The lock in the data dir that makes one service its one writer (`harness.lock`)."""


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The service's settings (the CLI's options, one field each; the ones shared with
    `harness run` are declared in `harness.run.given` and carry `BatchOptions`' names)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    """0 picks a free port (printed at start)."""
    data_dir: Path = DEFAULT_DATA_DIR
    """SQLite state and file contents."""
    backend: str = "embedded"
    model: str | None = None
    base_url: str | None = None
    ctx: int | None = None
    """Context window of one request in tokens (None: harness.yaml's, else 8192)."""
    concurrency: int | None = None
    """Requests in flight (None: harness.yaml's, else 1)."""
    strategy: str | None = None
    """`stateless` or `conversation` (None: harness.yaml's, else stateless)."""
    threads: int | None = None
    servers: int = 1
    """Embedded servers to start (each with `threads` threads and `concurrency` slots): more
    than one runs every batch over all of them (a pool), as `harness run --servers`; each is
    noted (`harness.api.servers`) so that a restart after a SIGKILL stops them all."""
    request_path: str | None = None
    """llama.cpp servers: `tokens`, `text` or `chat` (None: tokens for the embedded server,
    chat for openai), as `harness run --request-path`."""
    server_flags: str | None = None
    """The embedded server's launch flags, `ollama` or `harness` (None: harness.yaml's
    SERVER_FLAGS, else ollama), as `harness run --server-flags`."""
    config: Path = DEFAULT_CONFIG_PATH
    profile: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Limit of every request body but an upload's (refused with 413 as it streams in)."""
    max_lines: int = DEFAULT_MAX_LINES
    max_stored_bytes: int = DEFAULT_MAX_STORED_BYTES
    """Quota: bytes of all files kept together; an upload past it is refused (413)."""
    max_files: int = DEFAULT_MAX_FILES
    """Quota: files kept; an upload past it is refused (400)."""
    max_queued_batches: int = DEFAULT_MAX_QUEUED_BATCHES
    """Quota: batches not yet ended; a batch past it is refused (400)."""
    serve_any_model: bool = False
    """Run a batch whose lines name another model on the served one (the batch's metadata
    notes the name asked for); off: such a batch fails validation with `model_not_found`."""
    validation_timeout_s: float = DEFAULT_VALIDATION_TIMEOUT_S
    """A batch still validating this long after its creation fails (restarts included)."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token every route but /health requires (None: no check). Also on loopback,
    where the page then asks for it (HTTP Basic: any user name, the key as password)."""
    stop_on_cache_miss: bool = False
    """Fail a batch at its first reuse alarm (its server stopped reusing the rubric); its
    finished rows are kept in the output file, the rest get the batch_failed error line."""

    @property
    def lock_path(self) -> Path:
        """The data dir's lock (`LOCK_NAME`)."""
        return self.data_dir / LOCK_NAME

    def batch_options(self) -> BatchOptions:
        """The `harness run` options the batches run with."""
        return BatchOptions(
            Path("<harness api>"),
            backend=self.backend,
            model=self.model,
            base_url=self.base_url,
            concurrency=self.concurrency,
            strategy=self.strategy,
            ctx=self.ctx,
            threads=self.threads,
            servers=self.servers,
            request_path=self.request_path,
            server_flags=self.server_flags,
            progress=False,
            config=self.config,
            profile=self.profile,
        )

    def validate(self) -> RunConfig:
        """Raise ConfigError naming the option for a setting that cannot work. Returns the run
        configuration, resolved (`batch_config`) to check it: pass it on, not to resolve it
        again."""
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"--host {self.host} is not a loopback address: binding it needs an API key "
                f"(--api-key, or the environment variable {API_KEY_ENV})"
            )
        if self.api_key is not None and (not self.api_key.strip() or len(self.api_key) < 8):
            raise ConfigError("the API key must be at least 8 characters")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} must be between 0 and 65535")
        for flag, value in (
            ("--max-upload-bytes", self.max_upload_bytes),
            ("--max-request-bytes", self.max_request_bytes),
            ("--max-lines", self.max_lines),
            ("--max-stored-bytes", self.max_stored_bytes),
            ("--max-files", self.max_files),
            ("--max-queued-batches", self.max_queued_batches),
        ):
            if value < 1:
                raise ConfigError(f"{flag} {value} must be at least 1")
        if self.validation_timeout_s <= 0:
            raise ConfigError(f"the validation timeout {self.validation_timeout_s} s must be > 0")
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ConfigError(f"--data-dir {self.data_dir} is a file; give a directory")
        options = self.batch_options()
        options.validate()
        return batch_config(options)  # reads harness.yaml: a bad one fails here
