"""The fault-injecting proxy, end to end: a real stdlib upstream, the proxy, and an httpx client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from harness.backends.base import ChatRequest
from harness.backends.openai import OpenAIBackend
from harness.errors import (
    BackendError,
    BackendUnreachable,
    RequestTimeout,
    TransientServerError,
)
from harness.testing.faults import FAULT_KINDS, FaultConfig, FaultProxy

CHAT = "/v1/chat/completions"
CHUNKS = [b"first chunk|", b"second|", b"x" * 5000, b"|last"]


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", "stub")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in CHUNKS:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/missing":
            self._json(404, {"error": {"message": "no such thing"}})
        else:
            self._json(200, {"method": "GET", "path": self.path, "x_test": self.headers["X-Test"]})

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "17")
        self.end_headers()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        data = json.loads(raw) if raw else None
        reply: dict[str, Any] = {"method": "POST", "path": self.path, "json": data}
        if self.path == CHAT:  # enough of OpenAI's shape for OpenAIBackend.parse_reply
            reply["choices"] = [{"message": {"content": "ok"}, "finish_reason": "stop"}]
            reply["usage"] = {"prompt_tokens": 3, "completion_tokens": 1}
        self._json(200, reply)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


ProxyFactory = Callable[..., FaultProxy]


@pytest.fixture
def make_proxy(upstream: str) -> Iterator[ProxyFactory]:
    proxies: list[FaultProxy] = []

    def make(config: FaultConfig | None = None, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(upstream, config, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def client(proxy: FaultProxy, timeout: float | httpx.Timeout = 5.0, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, timeout=timeout, trust_env=False, **kwargs)


def chat(c: httpx.Client, n: int = 0) -> httpx.Response:
    return c.post(CHAT, json={"messages": [{"role": "user", "content": f"hi {n}"}]})


# -- clean forwarding ----------------------------------------------------------------------


def test_forwards_get_and_post_cleanly(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()
    assert proxy.url.startswith("http://127.0.0.1:")
    with client(proxy) as c:
        got = c.get("/v1/models?x=1", headers={"X-Test": "yes"})
        assert got.status_code == 200
        assert got.headers["X-Upstream"] == "stub"
        assert got.headers["Content-Type"] == "application/json"
        assert got.json() == {"method": "GET", "path": "/v1/models?x=1", "x_test": "yes"}

        body = {"messages": [{"role": "user", "content": "héllo"}], "n": list(range(20000))}
        posted = c.post(CHAT, json=body)
        assert posted.status_code == 200
        assert posted.json()["json"] == body

        missing = c.get("/missing")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "no such thing"

        head = c.head("/anything")
        assert head.status_code == 200
        assert head.headers["Content-Length"] == "17"
        assert head.content == b""

        for _ in range(10):
            assert c.get("/health").status_code == 200
    stats = proxy.stats
    assert stats.requests == stats.forwarded == 14
    assert stats.connections == 1  # keep-alive: one connection for all of them
    assert stats.injected == stats.upstream_errors == stats.bad_requests == 0


def test_relays_chunked_upstream_reply(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()
    with client(proxy) as c:
        resp = c.get("/chunked")
    assert resp.status_code == 200
    assert resp.content == b"".join(CHUNKS)
    assert resp.headers["Content-Length"] == str(len(resp.content))
    assert "Transfer-Encoding" not in resp.headers


def test_many_concurrent_requests(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()

    def one(i: int) -> None:
        resp = chat(c, i) if i % 2 else c.get(f"/item/{i}")
        assert resp.status_code == 200
        if i % 2:
            assert resp.json()["json"]["messages"][0]["content"] == f"hi {i}"
        else:
            assert resp.json()["path"] == f"/item/{i}"

    with client(proxy) as c, ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(one, range(50)))
    assert proxy.stats.requests == proxy.stats.forwarded == 50
    assert proxy.stats.connections <= 10


def test_works_from_async_code(upstream: str) -> None:
    async def main() -> list[int]:
        async with (
            FaultProxy(upstream, FaultConfig(http_503=1.0)) as proxy,
            httpx.AsyncClient(base_url=proxy.url, trust_env=False) as c,
        ):
            replies = await asyncio.gather(*(c.post(CHAT, json={"i": i}) for i in range(5)))
            replies.append(await c.get("/health"))
            assert proxy.stats.http_503 == 5
            return [r.status_code for r in replies]

    assert asyncio.run(main()) == [503] * 5 + [200]


def test_upstream_down_gives_502(make_proxy: ProxyFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with FaultProxy(dead) as proxy, client(proxy) as c:
        resp = c.get("/health")
        assert resp.status_code == 502
        assert "upstream" in resp.json()["error"]["message"]
        assert proxy.stats.upstream_errors == 1
        assert proxy.stats.forwarded == 1


def test_malformed_request_gets_400(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert proxy.stats.bad_requests == 1
    assert proxy.stats.requests == 0


# -- each fault at rate 1 ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["http_500", "http_503"])
def test_http_error_faults(make_proxy: ProxyFactory, kind: str) -> None:
    code = 500 if kind == "http_500" else 503
    proxy = make_proxy(FaultConfig(http_500=1.0) if code == 500 else FaultConfig(http_503=1.0))
    with client(proxy) as c:
        for i in range(3):
            resp = chat(c, i)
            assert resp.status_code == code
            assert resp.json()["error"]["code"] == code
            assert resp.headers["X-Fault-Injected"] == kind
    stats = proxy.stats
    assert getattr(stats, kind) == stats.requests == stats.injected == 3
    assert stats.forwarded == 0
    assert stats.connections == 1  # error replies keep the connection alive


def test_reset_fault(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(reset=1.0))
    with client(proxy) as c:
        for i in range(3):
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)):
                chat(c, i)
        assert c.get("/health").status_code == 200
    assert proxy.stats.reset == 3
    assert proxy.stats.forwarded == 1


def test_stall_fault(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(stall=1.0, stall_s=2.0))
    with client(proxy, timeout=0.3) as c:
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            chat(c)
        assert time.perf_counter() - started < 1.5
    assert proxy.stats.stall == 1
    assert proxy.stats.forwarded == 0


def test_stop_during_a_stall_returns_promptly(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(stall=1.0, stall_s=30.0))
    errors: list[BaseException] = []

    def stalled() -> None:
        with client(proxy, timeout=10.0) as c:
            try:
                chat(c)
            except httpx.TransportError as exc:
                errors.append(exc)

    thread = threading.Thread(target=stalled)
    thread.start()
    deadline = time.monotonic() + 5
    while proxy.stats.stall == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.perf_counter()
    proxy.stop()
    thread.join(5)
    assert time.perf_counter() - started < 2.0
    assert len(errors) == 1
    assert not isinstance(errors[0], httpx.TimeoutException)


def test_truncate_fault(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(truncate=1.0, truncate_fraction=0.5))
    with client(proxy) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            chat(c)
        with c.stream("POST", CHAT, json={"x": "y" * 100}) as resp:
            assert resp.status_code == 200  # the headers are intact ...
            with pytest.raises(httpx.RemoteProtocolError):
                resp.read()  # ... the body is not
    assert proxy.stats.truncate == 2
    assert proxy.stats.forwarded == 2


def test_delay_fault(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(delay=1.0, delay_s=0.3))
    with client(proxy) as c:
        started = time.perf_counter()
        resp = chat(c)
        elapsed = time.perf_counter() - started
        assert resp.status_code == 200
        assert elapsed >= 0.3
        started = time.perf_counter()
        assert c.get("/health").status_code == 200  # not a fault path: no delay
        assert time.perf_counter() - started < 0.3
    stats = proxy.stats
    assert stats.delay == 1
    assert stats.forwarded == 2
    assert stats.injected == 0


# -- mixed rates: exact accounting and replay ----------------------------------------------

MIXED = FaultConfig(
    http_500=0.05,
    http_503=0.05,
    reset=0.05,
    stall=0.01,
    truncate=0.05,
    delay=0.05,
    delay_s=0.01,
    stall_s=5.0,
    seed=4,  # 300 requests draw every fault kind, and only one stall (each costs a timeout)
)


def outcome(c: httpx.Client, i: int) -> str:
    try:
        resp = chat(c, i)
    except httpx.ReadTimeout:
        return "stall"
    except httpx.RemoteProtocolError as exc:
        return "truncate" if "complete message body" in str(exc) else "reset"
    except (httpx.ReadError, httpx.WriteError):
        return "reset"
    if resp.status_code == 200:
        assert resp.json()["json"]["messages"][0]["content"] == f"hi {i}"
        return "ok"
    return f"http_{resp.status_code}"


def run_mixed(proxy: FaultProxy, n: int) -> list[str]:
    with client(proxy, timeout=httpx.Timeout(5.0, read=0.5)) as c:
        return [outcome(c, i) for i in range(n)]


def test_mixed_faults_accounting_and_replay(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(MIXED)
    first = run_mixed(proxy, 300)
    seen = Counter(first)
    stats = proxy.stats
    for kind in FAULT_KINDS:
        assert seen[kind] > 0, kind
        assert getattr(stats, kind) == seen[kind], kind
    assert stats.requests == stats.faultable == 300
    assert stats.forwarded == seen["ok"] + seen["truncate"]
    assert [e.fault or "ok" for e in proxy.events] == first
    assert stats.delay == sum(e.delayed for e in proxy.events) > 0

    again = make_proxy(MIXED)
    assert run_mixed(again, 300) == first
    assert again.stats == stats

    proxy.set_config(MIXED)  # restarts the draws from the seed
    proxy.reset_stats()
    assert run_mixed(proxy, 100) == first[:100]
    assert proxy.stats.requests == 100


def test_concurrent_faults_are_counted_exactly(make_proxy: ProxyFactory) -> None:
    config = FaultConfig(http_500=0.2, http_503=0.2, reset=0.1, truncate=0.1, seed=5)
    proxy = make_proxy(config)
    with client(proxy) as c, ThreadPoolExecutor(max_workers=8) as pool:
        seen = Counter(pool.map(lambda i: outcome(c, i), range(100)))
    stats = proxy.stats
    assert stats.requests == 100
    for kind in ("http_500", "http_503", "reset", "truncate"):
        assert getattr(stats, kind) == seen[kind], kind
    assert stats.forwarded == seen["ok"] + seen["truncate"]


# -- paths, config, host, pause ------------------------------------------------------------


def test_only_fault_paths_get_faults(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(http_500=1.0, delay=1.0, delay_s=0.5))
    with client(proxy) as c:
        started = time.perf_counter()
        assert c.get("/health").status_code == 200
        assert c.post("/tokenize", json={"content": "x"}).status_code == 200
        assert c.get("/v1/chat/completions/other").status_code == 200
        assert time.perf_counter() - started < 0.5
        assert chat(c).status_code == 500
    stats = proxy.stats
    assert (stats.requests, stats.faultable, stats.http_500, stats.delay) == (4, 1, 1, 1)
    assert [e.fault for e in proxy.events] == [None, None, None, "http_500"]

    proxy.set_config(FaultConfig(http_503=1.0, fault_paths=("/v1/*",)))
    with client(proxy) as c:
        assert c.get("/v1/models").status_code == 503
        assert c.get("/health").status_code == 200


def test_set_config_turns_faults_off(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy(FaultConfig(http_500=1.0))
    with client(proxy) as c:
        assert chat(c).status_code == 500
        proxy.set_config(FaultConfig())
        assert proxy.config == FaultConfig()
        assert chat(c).status_code == 200
    assert (proxy.stats.http_500, proxy.stats.forwarded) == (1, 1)
    proxy.reset_stats()
    assert proxy.stats.requests == 0
    assert proxy.events == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"http_500": 1.5}, "http_500"),
        ({"http_503": -0.1}, "http_503"),
        ({"reset": float("nan")}, "reset"),
        ({"delay": 2}, "delay"),
        ({"stall": True}, "stall"),
        ({"truncate": "0.5"}, "truncate"),
        ({"http_500": 0.5, "reset": 0.3, "truncate": 0.3}, "http_500 \\+ http_503"),
        ({"delay_s": -1}, "delay_s"),
        ({"stall_s": float("inf")}, "stall_s"),
        ({"truncate_fraction": 1.0}, "truncate_fraction"),
        ({"fault_paths": "/v1/chat/completions"}, "fault_paths"),
        ({"fault_paths": ("v1",)}, "fault_paths"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FaultConfig(**kwargs)


def test_config_accepts_edges() -> None:
    FaultConfig(http_500=0.2, http_503=0.2, reset=0.2, stall=0.2, truncate=0.2, delay=1.0)
    assert FaultConfig(fault_paths=["/a"]).fault_paths == ("/a",)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com", ""])
def test_non_loopback_host_refused(upstream: str, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(upstream, host=host)


def test_localhost_and_bad_upstream(upstream: str) -> None:
    with FaultProxy(upstream, host="localhost") as proxy:
        assert proxy.url.startswith("http://127.0.0.1:")
    with pytest.raises(ValueError, match="upstream_url"):
        FaultProxy("https://127.0.0.1:1")


def test_pause_and_resume(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()
    with client(proxy) as c:
        assert c.get("/health").status_code == 200
        proxy.pause()
        for _ in range(2):  # first on the kept-alive connection, then on a new one
            with pytest.raises(httpx.TransportError) as info:
                c.get("/health")
            assert not isinstance(info.value, httpx.TimeoutException)
        assert (proxy.paused, proxy.stats.refused) == (True, 2)
        proxy.resume()
        assert not proxy.paused
        assert c.get("/health").status_code == 200

        proxy.pause(refuse=True)  # the listener itself goes away: connection refused
        with pytest.raises(httpx.ConnectError):
            c.get("/health")
        proxy.resume()
        assert c.get("/health").status_code == 200
    assert proxy.stats.requests == 3


# -- what the harness's own client makes of each fault -------------------------------------


def test_openai_backend_maps_each_fault(make_proxy: ProxyFactory) -> None:
    proxy = make_proxy()
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], timeout_s=0.3)
    cases: list[tuple[FaultConfig, type[BackendError]]] = [
        (FaultConfig(http_500=1.0), TransientServerError),
        (FaultConfig(http_503=1.0), TransientServerError),
        (FaultConfig(reset=1.0), TransientServerError),
        (FaultConfig(truncate=1.0), TransientServerError),
        (FaultConfig(stall=1.0, stall_s=2.0), RequestTimeout),
    ]

    async def main() -> None:
        async with OpenAIBackend(proxy.url, api_key_env=None) as backend:
            assert (await backend.chat(request)).content == "ok"
            for config, error in cases:
                proxy.set_config(config)
                with pytest.raises(error) as info:
                    await backend.chat(request)
                assert type(info.value) is error, config
                assert info.value.retryable
            proxy.set_config(FaultConfig())
            proxy.pause(refuse=True)
            with pytest.raises(BackendUnreachable):
                await backend.chat(request)
            proxy.resume()
            assert (await backend.chat(request)).content == "ok"

    asyncio.run(main())
    assert proxy.stats.injected == len(cases)
