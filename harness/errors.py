"""One tree of errors for the whole harness.

Low-level failures (httpx, the ollama client, a child process, a YAML parser) are translated once,
at the edge where they happen, into one of these classes, with a message that says what went
wrong *and what to do about it*::

    HarnessError
    ├── InputError              a user file is wrong (names the file, line or row)
    ├── ConfigError             a scenario or config file is wrong (names the file and key)
    ├── OutputError             a result or report cannot be written (names the path)
    ├── LockHeld                another process writes the same file (names its pid, command)
    └── BackendError            talking to a model server failed
        ├── BackendUnreachable      nothing answers at the URL          (retryable)
        ├── RequestTimeout          the server took too long            (retryable)
        ├── TransientServerError    429 / 5xx / reset / truncated body  (retryable)
        ├── ProtocolError           the reply is not what the API promises
        │   └── NoAPI                   no such API at the URL (a wrong path)
        ├── ModelNotFound           the server does not have the model
        ├── ContextOverflow         the prompt is longer than the context window
        └── LoadFailure             the server could not start or load the model
            └── OutOfMemory             ... because memory ran out

`retryable` tells the engine's runner which failures are worth another try.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnreachable",
    "ConfigError",
    "ContextOverflow",
    "HarnessError",
    "InputError",
    "LoadFailure",
    "LockHeld",
    "ModelNotFound",
    "NoAPI",
    "OutOfMemory",
    "OutputError",
    "ProtocolError",
    "RequestTimeout",
    "TransientServerError",
]


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""

    retryable: bool = False


class InputError(HarnessError):
    """A user-supplied input file is malformed. The message names the file and line or row."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ConfigError(HarnessError):
    """A scenario, profile or config file is invalid. The message names the file and key."""


class OutputError(HarnessError):
    """A result, report or config file could not be written. The message names the path."""


class LockHeld(HarnessError):
    """Another process holds the lock on what this one would write (`harness.lock`): a second
    `harness run` on the same results, a second `harness api` on the same data dir. The message
    names the holder's pid and command."""


class BackendError(HarnessError):
    """Talking to a model server failed."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class BackendUnreachable(BackendError):
    """Nothing answers at the server's URL (connection refused, no such host)."""

    retryable = True


class RequestTimeout(BackendError):
    """The server accepted the request but did not answer within the timeout."""

    retryable = True


class TransientServerError(BackendError):
    """A failure that may pass: HTTP 429 or 5xx, a reset connection, a truncated body."""

    retryable = True

    def __init__(
        self, message: str, *, url: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message, url=url)
        self.status_code = status_code


class ProtocolError(BackendError):
    """The server answered, but not in the shape its API promises."""


class NoAPI(ProtocolError):
    """The URL answers, but not with the API asked for (a plain `404 page not found`: a base
    URL with a wrong path, such as one ending in `/v1` for Ollama's native API)."""


class ModelNotFound(BackendError):
    """The server does not know the requested model."""


class ContextOverflow(BackendError):
    """The prompt (plus room for the reply) does not fit the server's context window."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        prompt_tokens: int | None = None,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(message, url=url)
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class LoadFailure(BackendError):
    """The server could not be started, or could not load the model."""


class OutOfMemory(LoadFailure):
    """Loading the model or allocating its KV cache ran out of memory."""
