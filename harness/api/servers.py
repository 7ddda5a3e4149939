"""The model-server processes the service starts: noted in SQLite, stopped after a SIGKILL.

The embedded backend's llama.cpp server (and the small tokenizer server `open_token_counter`
starts for a backend without `/tokenize`) runs in its own session, so it outlives a SIGKILLed
service. Every such server is noted (`ServerNotes`: pid, start time, role) as soon as it starts,
again after every relaunch (a new pid); the next start of the service stops the ones noted
(`reap`), after checking that the pid still names the same process.

The children get an environment without the service's secrets (`scrubbed_env`): the API key
and the upstream OpenAI key are for this process alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psutil

from harness.api.store import Store
from harness.backends.base import Backend
from harness.backends.embedded import EmbeddedBackend
from harness.backends.openai import OpenAIBackend
from harness.backends.pool import PoolBackend
from harness.engine.tokens import TokenCounter

__all__ = [
    "SCRUBBED_ENV",
    "SERVERS_NOTE",
    "ServerNotes",
    "helper_backend",
    "needs_env_credentials",
    "reap",
    "scrubbed_env",
    "server_pid",
    "server_pids",
]

log = logging.getLogger("harness.api")

SERVERS_NOTE = "servers"
_OLD_NOTE = "embedded_server"
"""The note of earlier versions: one server, `{"pid", "create_time"}`."""
SCRUBBED_ENV = ("HARNESS_API_KEY", "OPENAI_API_KEY")
"""Variables a child the service starts never sees."""

_scrub_lock = threading.Lock()
_scrub_depth = 0
_scrub_saved: dict[str, str] = {}


@contextlib.contextmanager
def scrubbed_env() -> Iterator[None]:
    """`SCRUBBED_ENV` out of `os.environ` while a child is started (a child copies the
    environment when it starts); put back afterwards. Nested uses share one removal."""
    global _scrub_depth
    with _scrub_lock:
        if _scrub_depth == 0:
            for name in SCRUBBED_ENV:
                value = os.environ.pop(name, None)
                if value is not None:
                    _scrub_saved[name] = value
        _scrub_depth += 1
    try:
        yield
    finally:
        with _scrub_lock:
            _scrub_depth -= 1
            if _scrub_depth == 0:
                for name, value in _scrub_saved.items():
                    os.environ.setdefault(name, value)
                _scrub_saved.clear()


def needs_env_credentials(backend: Backend) -> bool:
    """True for a backend that reads its upstream key from the environment when it starts
    (the openai backend): its start must not be scrubbed. It starts no child of its own."""
    return isinstance(backend, OpenAIBackend) and not isinstance(backend, EmbeddedBackend)


def server_pid(backend: Backend) -> int | None:
    """The pid of the server process a started backend launched, when it launched one."""
    pid = backend.info.extra.get("server_pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def server_pids(backend: Backend) -> list[int]:
    """The pids of every server a started backend launched: each member's for a pool (`harness
    api --servers N`, as `harness run` builds it: `harness.run.factory.open_backend`), else
    its own, when it launched one."""
    members = backend.members if isinstance(backend, PoolBackend) else [backend]
    return [pid for pid in (server_pid(m) for m in members) if pid is not None]


def helper_backend(counter: TokenCounter, backend: Backend) -> Backend | None:
    """The backend behind a token counter when it is not `backend` itself: the packaged
    tokenizer's server `open_token_counter` starts for a backend without `/tokenize`.

    `open_token_counter` does not expose it; its tokenize function is the helper's bound
    method, so the helper is that method's `__self__`."""
    owner = getattr(getattr(counter, "_tokenize", None), "__self__", None)
    return owner if isinstance(owner, Backend) and owner is not backend else None


class ServerNotes:
    """The servers of this run of the service, by role (`model`, `tokenizer`) and index (the
    pool's members are `model` 0, 1, ...), noted in SQLite (`SERVERS_NOTE`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._servers: dict[str, list[dict[str, Any]]] = {}

    def note(self, role: str, pid: int | None) -> None:
        """Note (or, with None, forget) the one server of `role`; written at once."""
        self.note_all(role, [] if pid is None else [pid])

    def note_all(self, role: str, pids: Sequence[int]) -> None:
        """Note the servers of `role` now (a pool's several; none forgets them), in place of
        the ones noted before (a relaunch gives new pids); written at once. A pid that is gone
        already is not noted."""
        before = self._servers.pop(role, [])
        servers: list[dict[str, Any]] = []
        for index, pid in enumerate(pids):
            try:
                created = psutil.Process(pid).create_time()
            except psutil.Error:
                continue
            servers.append({"role": role, "index": index, "pid": pid, "create_time": created})
        if servers:
            self._servers[role] = servers
        if servers or before:
            self._write()

    def clear(self) -> None:
        self._servers.clear()
        self.store.set_meta(SERVERS_NOTE, None)

    def _write(self) -> None:
        servers = [s for role in self._servers.values() for s in role]
        self.store.set_meta(SERVERS_NOTE, {"servers": servers} if servers else None)


def _stop_if_ours(pid: int, create_time: float) -> None:
    try:
        proc = psutil.Process(pid)
        same = abs(proc.create_time() - create_time) < 0.5
        cmd = " ".join(proc.cmdline())
        if same and "harness" in cmd and "serve" in cmd:
            log.info("stopping the model server pid %d left by an earlier run", proc.pid)
            proc.terminate()
            try:
                proc.wait(10)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    except psutil.Error:
        pass


def reap(store: Store) -> int:
    """Stop every server an earlier run of the service noted and left running (it was killed:
    a pool's several included); returns how many notes were read. The notes are removed."""
    found: list[dict[str, Any]] = []
    new = store.get_meta(SERVERS_NOTE)
    if new and isinstance(new.get("servers"), list):
        found += [s for s in new["servers"] if isinstance(s, dict)]
    old = store.get_meta(_OLD_NOTE)
    if old:
        found.append(dict(old))
    for entry in found:
        try:
            _stop_if_ours(int(entry["pid"]), float(entry["create_time"]))
        except (KeyError, TypeError, ValueError):
            continue
    store.set_meta(SERVERS_NOTE, None)
    store.set_meta(_OLD_NOTE, None)
    return len(found)
