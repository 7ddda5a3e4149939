"""Who may call `harness api`: the ASGI layers in front of every route, and the JSON rule.

A service on loopback is still reachable from a web page in the user's own browser: a page may
send requests to 127.0.0.1 without asking (a "simple" form POST needs no CORS preflight), and
through DNS rebinding (a hostname that the attacker's DNS answers with 127.0.0.1) its script is
even same-origin with the service and could read every file. Hence, outermost first:

- `CallerCheck`: bound to a loopback address, the service answers only requests whose `Host`
  names a loopback address or `localhost` with the service's own port (a rebound hostname is
  refused); on any address, a request carrying an `Origin` other than the service's own (the
  scheme and the `Host` it was called by) is refused: a browser sends `Origin` with every
  cross-site request that can change anything, and the page itself needs no script.
- `KeyCheck`: with a key (`--api-key` / `HARNESS_API_KEY`, on loopback too), every route but
  `/health` needs `Authorization: Bearer <key>`; the page's routes also take it as HTTP Basic
  credentials (any user name, the key as password), so a browser can show the page: it asks
  for them once. The key is compared in constant time and never logged.
- `require_json`: routes that read a JSON body take only a JSON `Content-Type` (a form or
  `text/plain` body, which a page can send without a preflight, is refused with 415).

Refusals are OpenAI-shaped errors (`{"error": {message, type, param, code}}`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from harness.api.schemas import ApiError, error_body

__all__ = ["OPEN_PATHS", "PAGE_PATHS", "CallerCheck", "KeyCheck", "require_json", "send_json"]

OPEN_PATHS = frozenset({"/health"})
"""Routes that need no key."""
PAGE_PATHS = re.compile(r"^/(batches/[^/]+/throughput\.png)?$")
"""The page's routes (GET): they also take the key as HTTP Basic credentials."""
BASIC_REALM = 'Basic realm="harness api", charset="UTF-8"'
_PAGE_401 = (
    "<!DOCTYPE html><html lang=en><meta charset=utf-8><title>harness api: key needed</title>"
    "<p>This service needs its API key. Reload the page and give it as the password when the "
    "browser asks (any user name). Programs pass it as a Bearer token: "
    '<code>OpenAI(base_url="http://HOST:PORT/v1", api_key=os.environ["HARNESS_API_KEY"])'
    "</code>.</p></html>"
)


async def send_json(send: Send, status: int, body: dict[str, Any], **headers: str) -> None:
    """Answer a request with a JSON body (from an ASGI layer, before any route)."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


def _split_host(host: str) -> tuple[str, int | None]:
    """`127.0.0.1:4080` → ("127.0.0.1", 4080); `[::1]:4080` → ("::1", 4080); no port: None."""
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


def _is_loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class CallerCheck:
    """ASGI layer: the `Host` and `Origin` rules of the module docstring. `loopback`: the
    service is bound to a loopback address (the `Host` rule applies)."""

    def __init__(self, app: ASGIApp, *, loopback: bool, on_refused: Callable[[], None]) -> None:
        self.app = app
        self.loopback = loopback
        self.on_refused = on_refused
        """Called for each refused request (the /metrics counter)."""

    def problem(self, scope: Scope) -> str | None:
        """Why a request is refused, or None."""
        host = (_header(scope, b"host") or b"").decode("latin-1").strip()
        if self.loopback:
            name, port = _split_host(host)
            server = scope.get("server") or (None, None)
            if not host or not _is_loopback_name(name) or port != server[1]:
                return (
                    f"The Host header {host!r} does not name this service: on a loopback "
                    f"address it answers only 127.0.0.1:{server[1]} or localhost:{server[1]} "
                    "(a request through another hostname, such as a DNS-rebinding page's, is "
                    "refused)."
                )
        origin = _header(scope, b"origin")
        if origin is not None:
            mine = f"{scope.get('scheme', 'http')}://{host}".lower()
            if origin.decode("latin-1").strip().lower() != mine:
                return (
                    f"Requests from the web origin {origin.decode('latin-1')!r} are refused: "
                    "this service answers its own page and programs, not other sites."
                )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        why = self.problem(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        self.on_refused()
        await send_json(send, 403, error_body(why, code="caller_not_allowed"))


def _basic_password(header: bytes) -> bytes | None:
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(b":")[2]


class KeyCheck:
    """ASGI layer: the key rule of the module docstring (only when a key is set)."""

    def __init__(self, app: ASGIApp, *, key: str | None, on_refused: Callable[[], None]) -> None:
        self.app = app
        self._key = key.encode() if key else None
        self.on_refused = on_refused
        """Called for each request refused for want of the key (the /metrics counter)."""

    def _ok(self, given: bytes, page: bool) -> bool:
        assert self._key is not None
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            return True
        password = _basic_password(given) if page else None
        return password is not None and hmac.compare_digest(password, self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        page = scope["method"] in ("GET", "HEAD") and bool(PAGE_PATHS.match(scope["path"]))
        given = _header(scope, b"authorization") or b""
        if self._ok(given, page):
            await self.app(scope, receive, send)
            return
        self.on_refused()
        if page:
            data = _PAGE_401.encode()
            headers = [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(data)).encode()),
                (b"www-authenticate", BASIC_REALM.encode()),
            ]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return
        message = (
            "Incorrect API key provided."
            if given
            else "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        await send_json(
            send, 401, error_body(message, code="invalid_api_key"), **{"www-authenticate": "Bearer"}
        )


def require_json(request: Request) -> None:
    """Refuse (415) a body whose Content-Type is not JSON (`application/json`, or a
    `+json` type): a page can send a form or text body without a preflight, never JSON."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (
        kind.startswith("application/") and kind.endswith("+json")
    ):
        raise ApiError(
            415,
            f"This route takes a JSON body: send it with Content-Type: application/json "
            f"(got {kind or 'none'!r}).",
            code="unsupported_media_type",
        )
