"""A fault-injecting HTTP reverse proxy for loopback tests.

`FaultProxy` sits between the harness's httpx client and a real server (llama.cpp, or a test
stub) and, for requests on chosen paths, injects the failures a batch job meets in practice::

    http_500   answer HTTP 500 with a JSON error body (the server is not asked)
    http_503   answer HTTP 503 with a JSON error body, like llama.cpp while it loads a model
    reset      read the request, then abort the connection with a TCP RST, without replying
    stall      read the request, then say nothing for `stall_s` seconds (longer than the
               client's timeout), then close; ends early if the client hangs up first
    truncate   forward the request, then send the reply's headers with the full
               Content-Length but only part of the body, then close
    delay      wait `delay_s` seconds before handling the request (combines with the others;
               on its own the request still succeeds)
    slow       (not drawn: every forwarded request on a fault path) hold the upstream's reply
               for `slow - 1` times as long as the upstream took, so the server looks `slow`
               times slower (5: a server five times slower than it is), whatever its speed

What the client sees (httpx) and what the harness maps it to (`harness.backends.openai`):
500/503 -> HTTP status -> TransientServerError; reset -> `httpx.ReadError` or
`httpx.RemoteProtocolError` -> TransientServerError; stall -> `httpx.ReadTimeout` ->
RequestTimeout; truncate -> `httpx.RemoteProtocolError` (incomplete body) ->
TransientServerError. `pause(refuse=True)` closes the listening socket, so new connections get
`httpx.ConnectError` -> BackendUnreachable.

Faults are drawn per request from `random.Random(config.seed)` in the order requests arrive:
every request on a fault path takes exactly two draws (one picks at most one of the exclusive
faults, one decides the delay), so a sequential run with the same seed replays exactly, and
changing one rate changes only the requests that rate touches. Requests on other paths
(health checks, /tokenize, /props) are forwarded untouched and take no draws.

The proxy runs its own asyncio event loop in a background thread, so it serves sync and async
callers alike, and listens on loopback only. It speaks HTTP/1.1 with keep-alive to the client
and opens one upstream connection per request (`Connection: close`). Upstream bodies, with
Content-Length, chunked or close-delimited framing, are read in full and relayed with a
Content-Length; a streamed (SSE) reply therefore reaches the client all at once.

Accounting is exact and updated before the client sees the outcome: `stats.requests` equals
`forwarded + http_500 + http_503 + reset + stall` (a truncated reply was forwarded, so it is
counted in `forwarded` and in `truncate`; `delay` overlaps the others).

Example::

    with FaultProxy("http://127.0.0.1:8080", FaultConfig(http_503=0.1, seed=7)) as proxy:
        run_batch(base_url=proxy.url)
        assert proxy.stats.http_503 == errors_seen_by_the_runner
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import random
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlsplit

__all__ = [
    "FAULT_KINDS",
    "FaultConfig",
    "FaultEvent",
    "FaultKind",
    "FaultProxy",
    "FaultStats",
]

log = logging.getLogger(__name__)

FaultKind = Literal["http_500", "http_503", "reset", "stall", "truncate"]
"""The exclusive faults: at most one of them happens to a request."""

FAULT_KINDS: tuple[FaultKind, ...] = ("http_500", "http_503", "reset", "stall", "truncate")

_LIMIT = 1 << 20  # longest request/status line + headers the proxy accepts
_MAX_BODY = 1 << 28  # 256 MiB, for request and reply bodies alike
_MAX_EVENTS = 100_000
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

Headers = list[tuple[str, str]]


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultConfig:
    """Fault rates (probabilities per request on a fault path) and their parameters.

    The exclusive rates (`http_500`, `http_503`, `reset`, `stall`, `truncate`) must sum to at
    most 1; `delay` is drawn separately. `fault_paths` entries match a request's path (without
    its query) exactly, or as a prefix when they end with ``*``; ``("*",)`` faults everything.
    """

    http_500: float = 0.0
    http_503: float = 0.0
    reset: float = 0.0
    delay: float = 0.0
    stall: float = 0.0
    truncate: float = 0.0
    seed: int = 0
    delay_s: float = 0.5
    stall_s: float = 30.0
    truncate_fraction: float = 0.5
    slow: float = 1.0
    """Every forwarded reply on a fault path is held `slow - 1` times the upstream's own time
    (1: not slowed). Takes no draws, so it changes no other fault's decisions."""
    fault_paths: tuple[str, ...] = ("/v1/chat/completions",)

    def __post_init__(self) -> None:
        for name in ("http_500", "http_503", "reset", "delay", "stall", "truncate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be a rate in [0, 1], got {value!r}")
        total = sum(self.rates().values())
        if total > 1.0 + 1e-9:
            raise ValueError(
                "FaultConfig: the exclusive fault rates http_500 + http_503 + reset + stall + "
                f"truncate must sum to at most 1, got {total:g}"
            )
        for name in ("delay_s", "stall_s"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < math.inf:
                raise ValueError(f"FaultConfig.{name} must be seconds >= 0, got {value!r}")
        if not _is_number(self.slow) or not 1.0 <= self.slow < math.inf:
            raise ValueError(f"FaultConfig.slow must be a factor >= 1, got {self.slow!r}")
        if not _is_number(self.truncate_fraction) or not 0.0 <= self.truncate_fraction < 1.0:
            raise ValueError(
                f"FaultConfig.truncate_fraction must be in [0, 1), got {self.truncate_fraction!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"FaultConfig.seed must be an int, got {self.seed!r}")
        paths: object = self.fault_paths
        if not isinstance(paths, tuple | list) or not all(
            isinstance(p, str) and (p.startswith("/") or p == "*") for p in paths
        ):
            raise ValueError(
                "FaultConfig.fault_paths must be a sequence of paths starting with '/' "
                f"(or '*'), got {paths!r}"
            )
        object.__setattr__(self, "fault_paths", tuple(paths))

    def rates(self) -> dict[FaultKind, float]:
        """The exclusive fault rates, in the order the draw walks them."""
        return {
            "http_500": self.http_500,
            "http_503": self.http_503,
            "reset": self.reset,
            "stall": self.stall,
            "truncate": self.truncate,
        }

    def matches(self, path: str) -> bool:
        """Whether requests on `path` (no query string) are subject to faults."""
        for pattern in self.fault_paths:
            if pattern.endswith("*"):
                if path.startswith(pattern[:-1]):
                    return True
            elif path == pattern:
                return True
        return False


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class FaultStats:
    """A snapshot of the proxy's counters.

    `requests` counts every well-formed request read; `faultable` those on a fault path;
    `forwarded` those sent to the upstream server (including truncated ones); one counter per
    fault kind counts injections; `upstream_errors` counts forwarded requests the upstream
    could not answer (the client got 502/504); `refused` counts connections and requests turned
    away while paused; `bad_requests` counts unparseable requests (answered 400).
    """

    connections: int = 0
    requests: int = 0
    faultable: int = 0
    forwarded: int = 0
    http_500: int = 0
    http_503: int = 0
    reset: int = 0
    delay: int = 0
    stall: int = 0
    truncate: int = 0
    upstream_errors: int = 0
    refused: int = 0
    bad_requests: int = 0
    slowed: int = 0
    """Forwarded replies held back by `FaultConfig.slow`."""

    @property
    def injected(self) -> int:
        """Requests that got one of the exclusive faults."""
        return self.http_500 + self.http_503 + self.reset + self.stall + self.truncate


_STAT_NAMES = tuple(f.name for f in fields(FaultStats))


@dataclass(frozen=True)
class FaultEvent:
    """What the proxy decided for one request: `seq` counts requests from 0 in arrival order."""

    seq: int
    method: str
    path: str
    fault: FaultKind | None
    delayed: bool


# -- HTTP plumbing -------------------------------------------------------------------------


class _BadMessage(Exception):
    """A request or upstream reply that does not parse as HTTP/1.x."""


@dataclass
class _Request:
    method: str
    target: str
    path: str
    headers: Headers
    body: bytes
    keep_alive: bool


@dataclass
class _Response:
    status: int
    reason: str
    headers: Headers
    body: bytes
    length: int | None  # Content-Length to announce; None for 204/304 (no framing at all)


def _parse_head(data: bytes) -> tuple[list[str], Headers]:
    text = data.decode("latin-1").lstrip("\r\n")
    lines = text.split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise _BadMessage(f"malformed start line {lines[0][:100]!r}")
    headers: Headers = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise _BadMessage("obsolete header line folding is not supported")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadMessage(f"malformed header line {line[:100]!r}")
        headers.append((name, value.strip()))
    return start, headers


def _header(headers: Headers, name: str) -> str | None:
    values = [v for k, v in headers if k.lower() == name]
    return ", ".join(values) if values else None


def _tokens(headers: Headers, name: str) -> set[str]:
    value = _header(headers, name) or ""
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def _content_length(headers: Headers) -> int | None:
    values = {v.strip() for k, v in headers if k.lower() == "content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise _BadMessage(f"conflicting Content-Length headers {sorted(values)}")
    (value,) = values
    if not value.isdigit():
        raise _BadMessage(f"bad Content-Length {value!r}")
    length = int(value)
    if length > _MAX_BODY:
        raise _BadMessage(f"body of {length} bytes is too large")
    return length


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadMessage(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > _MAX_BODY:
            raise _BadMessage("chunked body is too large")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _BadMessage("chunk not followed by CRLF")


async def _read_body(reader: asyncio.StreamReader, headers: Headers) -> bytes | None:
    """The body framed by `headers`; None when they frame none (read to EOF, for replies)."""
    if "chunked" in _tokens(headers, "transfer-encoding"):
        return await _read_chunked(reader)
    length = _content_length(headers)
    if length is None:
        return None
    return await reader.readexactly(length)


def _render_head(
    status: int, reason: str, headers: Headers, length: int | None, keep_alive: bool
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}".rstrip()]
    lines += [f"{k}: {v}" for k, v in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(status: int, message: str, kind: str, extra: Headers | None = None) -> _Response:
    body = json.dumps(
        {"error": {"code": status, "message": message, "type": kind}}, separators=(",", ":")
    ).encode()
    headers: Headers = [("Content-Type", "application/json"), *(extra or [])]
    return _Response(status, _REASONS.get(status, ""), headers, body, len(body))


def _loopback(host: str) -> str:
    """`host` as an address to bind, or ValueError unless it is a loopback address."""
    if host.strip().lower() == "localhost":
        return "127.0.0.1"  # one address, so port 0 yields one port
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"FaultProxy host {host!r} is not a loopback address; the proxy only listens on "
            "127.0.0.0/8, ::1 or localhost"
        )
    return str(address)


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Close at once, dropping buffered data; with `rst`, the peer gets a TCP reset."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush and close gracefully (FIN)."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# -- the proxy -----------------------------------------------------------------------------


class FaultProxy:
    """A loopback HTTP/1.1 reverse proxy to `upstream_url` that injects faults per `config`.

    Use it as a (sync or async) context manager, or call `start()` / `stop()`. `url` is the
    address to give the client. `stats`, `events`, `set_config`, `reset_stats`, `pause` and
    `resume` may be called from any thread.
    """

    def __init__(
        self,
        upstream_url: str,
        config: FaultConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        upstream_timeout_s: float | None = 600.0,
    ) -> None:
        self.host = _loopback(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"FaultProxy port must be in [0, 65535], got {port}")
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"FaultProxy upstream_url must be http://host[:port][/prefix], got {upstream_url!r}"
            )
        self.upstream_url = upstream_url.rstrip("/")
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._up_netloc = parts.netloc
        self._up_prefix = parts.path.rstrip("/")
        self._upstream_timeout_s = upstream_timeout_s
        self.port = port
        self.url = ""

        self._lock = threading.Lock()
        self._config = config if config is not None else FaultConfig()
        self._rng = random.Random(self._config.seed)
        self._counts = dict.fromkeys(_STAT_NAMES, 0)
        self._events: deque[FaultEvent] = deque(maxlen=_MAX_EVENTS)
        self._seq = 0
        self._paused = False

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._closing = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._busy: set[asyncio.StreamWriter] = set()  # connections handling a request

    def __repr__(self) -> str:
        return f"FaultProxy({self.url or 'not started'} -> {self.upstream_url}, {self._config})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start listening (in a background thread); sets `port` and `url`. Returns self."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._closing = False
        errors: list[Exception] = []
        thread = threading.Thread(
            target=self._run, args=(errors,), name=f"FaultProxy-{id(self):x}", daemon=True
        )
        thread.start()
        self._ready.wait()
        if errors:
            thread.join()
            raise errors[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and end the thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("FaultProxy.stop() cannot be called from the proxy's own thread")
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self, errors: list[Exception]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._listen(self.port))
            except Exception as exc:
                errors.append(exc)
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _listen(self, port: int) -> None:
        server = await asyncio.start_server(self._on_connect, self.host, port, limit=_LIMIT)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"

    async def _shutdown(self) -> None:
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        me = asyncio.current_task()
        for _ in range(10):
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports close their sockets

    # -- control (any thread) --------------------------------------------------------------

    @property
    def config(self) -> FaultConfig:
        with self._lock:
            return self._config

    def set_config(self, config: FaultConfig) -> None:
        """Use `config` from the next request on, and restart the draws from `config.seed`."""
        with self._lock:
            self._config = config
            self._rng = random.Random(config.seed)

    @property
    def stats(self) -> FaultStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return FaultStats(**self._counts)

    @property
    def events(self) -> tuple[FaultEvent, ...]:
        """The decisions taken since the last `reset_stats()` (the last 100 000 at most)."""
        with self._lock:
            return tuple(self._events)

    def reset_stats(self) -> None:
        """Zero the counters and forget the events (the draws go on; see `set_config`)."""
        with self._lock:
            self._counts = dict.fromkeys(_STAT_NAMES, 0)
            self._events.clear()
            self._seq = 0

    @property
    def paused(self) -> bool:
        return self._is_paused()

    def _is_paused(self) -> bool:
        with self._lock:
            return self._paused

    def pause(self, *, refuse: bool = False) -> None:
        """Act like a server that is down, until `resume()`.

        New connections are accepted and reset at once, and requests arriving on open
        keep-alive connections are answered with a reset; both count as `refused`. Requests
        already being handled finish normally. With `refuse=True` the listening socket is also
        closed, so connecting fails with ECONNREFUSED, and idle keep-alive connections are
        closed (neither is counted).
        """
        with self._lock:
            self._paused = True
        if refuse and self._loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result(30)

    def resume(self) -> None:
        """Serve again, on the same port (OSError if something else took it meanwhile)."""
        if self._loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._relisten(), self._loop).result(30)
        with self._lock:
            self._paused = False

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._writers - self._busy:  # idle keep-alive connections go too
            writer.transport.abort()
        await asyncio.sleep(0)  # let the sockets close before pause() returns

    async def _relisten(self) -> None:
        if self._server is None and not self._closing:
            await self._listen(self.port)

    # -- bookkeeping -----------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _decide(self, req: _Request) -> tuple[FaultKind | None, bool, FaultConfig]:
        with self._lock:
            config = self._config
            counts = self._counts
            counts["requests"] += 1
            fault: FaultKind | None = None
            delayed = False
            if config.matches(req.path):
                counts["faultable"] += 1
                pick, late = self._rng.random(), self._rng.random()
                bound = 0.0
                for kind, rate in config.rates().items():
                    bound += rate
                    if pick < bound:
                        fault = kind
                        break
                delayed = late < config.delay
            if fault is not None:
                counts[fault] += 1
            if delayed:
                counts["delay"] += 1
            if fault is None or fault == "truncate":
                counts["forwarded"] += 1
            self._events.append(FaultEvent(self._seq, req.method, req.path, fault, delayed))
            self._seq += 1
        return fault, delayed, config

    # -- serving (the proxy's loop) --------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            # stop() cancels the handlers; end normally, because Python 3.11's stream protocol
            # calls task.exception() on this task, which raises for a cancelled one.
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            _abort(writer, rst=True)
            return
        if self._is_paused():
            self._count("refused")
            _abort(writer, rst=True)
            return
        self._count("connections")
        self._writers.add(writer)
        try:
            while True:
                try:
                    req = await self._read_request(reader, writer)
                except _BadMessage as exc:
                    self._count("bad_requests")
                    resp = _json_response(400, f"bad request: {exc}", "invalid_request_error")
                    await self._send(writer, resp, keep_alive=False)
                    break
                if req is None:
                    break
                if self._is_paused():
                    self._count("refused")
                    _abort(writer, rst=True)
                    break
                self._busy.add(writer)
                try:
                    keep = await self._serve(req, reader, writer)
                finally:
                    self._busy.discard(writer)
                if not keep:
                    break
        except (OSError, EOFError, asyncio.LimitOverrunError):
            pass  # the client went away, or sent more header than we accept
        except Exception:
            log.exception("FaultProxy: unexpected error on a client connection")
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _BadMessage("connection closed in the middle of the headers") from None
            return None
        except asyncio.LimitOverrunError:
            raise _BadMessage("request headers are too long") from None
        start, headers = _parse_head(head)
        if len(start) != 3 or not start[2].startswith("HTTP/1."):
            raise _BadMessage(f"unsupported request line {' '.join(start)[:100]!r}")
        method, target, version = start
        if "100-continue" in _tokens(headers, "expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        try:
            body = await _read_body(reader, headers)
        except asyncio.IncompleteReadError:
            raise _BadMessage("connection closed in the middle of the body") from None
        except asyncio.LimitOverrunError:
            raise _BadMessage("chunk header too long") from None
        if target.startswith(("http://", "https://")):
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = _tokens(headers, "connection")
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        return _Request(
            method=method.upper(),
            target=target,
            path=target.split("?", 1)[0],
            headers=headers,
            body=body or b"",
            keep_alive=keep_alive,
        )

    async def _serve(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; True to keep the connection for the next one."""
        fault, delayed, config = self._decide(req)
        if delayed:
            await asyncio.sleep(config.delay_s)
        if fault == "reset":
            _abort(writer, rst=True)
            return False
        if fault == "stall":
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(config.stall_s):
                    while await reader.read(65536):  # until the client hangs up
                        pass
            await _close(writer)
            return False
        if fault in ("http_500", "http_503"):
            code = 500 if fault == "http_500" else 503
            message = "injected fault" if code == 500 else "Loading model (injected fault)"
            kind = "server_error" if code == 500 else "unavailable_error"
            resp = _json_response(code, message, kind, [("X-Fault-Injected", fault)])
            await self._send(writer, resp, keep_alive=req.keep_alive)
            return req.keep_alive
        began = time.monotonic()
        resp = await self._forward(req)
        if config.slow > 1.0 and config.matches(req.path):
            self._count("slowed")
            await asyncio.sleep((config.slow - 1.0) * (time.monotonic() - began))
        if fault == "truncate":
            full = len(resp.body)
            declared = full if full > 0 else 1  # an empty body is "truncated" by announcing 1
            sent = min(int(full * config.truncate_fraction), max(full - 1, 0))
            writer.write(_render_head(resp.status, resp.reason, resp.headers, declared, False))
            writer.write(resp.body[:sent])
            await writer.drain()
            await _close(writer)
            return False
        await self._send(writer, resp, keep_alive=req.keep_alive)
        return req.keep_alive

    async def _send(
        self, writer: asyncio.StreamWriter, resp: _Response, *, keep_alive: bool
    ) -> None:
        writer.write(_render_head(resp.status, resp.reason, resp.headers, resp.length, keep_alive))
        if resp.body:
            writer.write(resp.body)
        await writer.drain()
        if not keep_alive:
            await _close(writer)

    async def _forward(self, req: _Request) -> _Response:
        """Relay `req` upstream; a 502/504 JSON reply if the upstream fails."""
        try:
            async with asyncio.timeout(self._upstream_timeout_s):
                return await self._exchange(req)
        except TimeoutError:
            self._count("upstream_errors")
            return _json_response(
                504,
                f"upstream {self.upstream_url} did not answer in {self._upstream_timeout_s} s",
                "upstream_timeout",
            )
        except (OSError, EOFError, asyncio.LimitOverrunError, _BadMessage) as exc:
            self._count("upstream_errors")
            return _json_response(
                502,
                f"upstream {self.upstream_url} failed: {type(exc).__name__}: {exc}",
                "upstream_error",
            )

    async def _exchange(self, req: _Request) -> _Response:
        drop = _HOP_BY_HOP | _tokens(req.headers, "connection") | {"host", "expect"}
        headers = [(k, v) for k, v in req.headers if k.lower() not in drop]
        lines = [f"{req.method} {self._up_prefix}{req.target} HTTP/1.1", f"Host: {self._up_netloc}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if req.body or req.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(req.body)}")
        lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body

        reader, writer = await asyncio.open_connection(self._up_host, self._up_port, limit=_LIMIT)
        try:
            writer.write(data)
            await writer.drain()
            while True:
                start, reply_headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                if not start[0].startswith("HTTP/1.") or not start[1].isdigit():
                    raise _BadMessage(f"malformed status line {' '.join(start)[:100]!r}")
                status = int(start[1])
                if status == 101 or not 100 <= status < 200:
                    break  # skip interim 1xx replies
            if status == 101:
                raise _BadMessage("protocol upgrades are not supported")
            reason = start[2] if len(start) > 2 else ""
            no_body = req.method == "HEAD" or status in (204, 304)
            body = b"" if no_body else await _read_body(reader, reply_headers)
            if body is None:  # close-delimited
                parts: list[bytes] = []
                size = 0
                while chunk := await reader.read(1 << 16):
                    parts.append(chunk)
                    size += len(chunk)
                    if size > _MAX_BODY:
                        raise _BadMessage("upstream reply body is too large")
                body = b"".join(parts)
        except BaseException:
            writer.transport.abort()
            raise
        writer.close()  # nothing left to flush: the socket closes on the loop's next turn
        drop = _HOP_BY_HOP | _tokens(reply_headers, "connection")
        relayed = [(k, v) for k, v in reply_headers if k.lower() not in drop]
        length: int | None = len(body)
        if status in (204, 304):
            length = None
        elif req.method == "HEAD":
            length = _content_length(reply_headers) or 0
        return _Response(status, reason, relayed, body, length)
