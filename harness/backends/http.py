"""The one HTTP error edge of the HTTP backends: httpx failures and non-2xx replies become the
harness's error tree (harness.errors) here, once, with a message that says what to do."""

from __future__ import annotations

from typing import Any

import httpx

from harness.errors import (
    BackendError,
    BackendUnreachable,
    ContextOverflow,
    ModelNotFound,
    RequestTimeout,
    TransientServerError,
)

__all__ = ["RETRYABLE_STATUS", "map_transport_error", "raise_for_response"]

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def map_transport_error(exc: httpx.TransportError, url: str) -> BackendError:
    """Translate an httpx transport failure into the harness's error tree."""
    if isinstance(exc, httpx.ConnectError):
        return BackendUnreachable(
            f"cannot connect to {url} ({exc or 'connection refused'}); "
            "is the server running, and is the URL right?",
            url=url,
        )
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(
            f"{url} did not answer in time ({type(exc).__name__}); raise the timeout or lower "
            "the load",
            url=url,
        )
    # Resets, truncated bodies, protocol violations mid-stream: worth another try.
    return TransientServerError(
        f"connection to {url} failed mid-request ({type(exc).__name__}: {exc})", url=url
    )


def _error_message(resp: httpx.Response) -> tuple[str, dict[str, Any]]:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300], {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    if isinstance(err, dict):
        return str(err.get("message", err))[:300], err
    return str(err)[:300], {}


def raise_for_response(resp: httpx.Response, url: str) -> None:
    """Raise the harness error matching a non-2xx response; return for 2xx."""
    if resp.is_success:
        return
    message, err = _error_message(resp)
    code = resp.status_code
    lowered = message.lower()
    if err.get("type") == "exceed_context_size_error" or (
        code == 400 and "context" in lowered and ("exceed" in lowered or "too long" in lowered)
    ):
        raise ContextOverflow(
            f"prompt does not fit the context window at {url}: {message}",
            url=url,
            prompt_tokens=err.get("n_prompt_tokens"),
            n_ctx=err.get("n_ctx"),
        )
    if code == 404 and "model" in lowered:
        raise ModelNotFound(f"{url}: {message}", url=url)
    if code in (401, 403):
        raise BackendError(
            f"{url} refused the credentials (HTTP {code}); check the API key variable", url=url
        )
    if code in RETRYABLE_STATUS:
        raise TransientServerError(
            f"{url} answered HTTP {code}: {message}", url=url, status_code=code
        )
    raise BackendError(f"{url} answered HTTP {code}: {message}", url=url)
