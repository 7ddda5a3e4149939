"""The embedded default: a real llama.cpp server (xllamacpp) in a child process.

`EmbeddedServer` launches `python -m harness serve ...`, reads the URL it prints, waits for
`/health`, and stops it (SIGTERM, then SIGKILL). A child process keeps memory readings clean
(its RSS is the server's alone) and lets tests kill the server. `EmbeddedBackend` is the
OpenAI-compatible backend pointed at that child, plus the server's memory probe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Self

import httpx

from harness.backends.base import Backend, BackendSpec
from harness.backends.openai import OpenAIBackend
from harness.backends.server import (
    LISTEN_PREFIX,
    LOAD_FAILED_PREFIX,
    ServerSettings,
    llamacpp_build,
    ollama_settings,
)
from harness.errors import BackendError, ConfigError, LoadFailure, OutOfMemory
from harness.memory import ProcessRSSProbe
from harness.models.geometry import ModelGeometry, geometry_from_gguf
from harness.models.registry import DEFAULT_MODEL, resolve_model

__all__ = ["EmbeddedBackend", "EmbeddedServer", "packaged_tokenizer"]

_OOM_MARKERS = ("out of memory", "failed to allocate", "cannot allocate", "bad_alloc", "oom")


class EmbeddedServer:
    """A llama.cpp server in a child process. A context manager; `start()` returns self."""

    def __init__(
        self,
        settings: ServerSettings | None = None,
        *,
        log_dir: str | Path | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.settings = settings or ServerSettings()
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "harness-logs"
        self.proc: subprocess.Popen[str] | None = None
        self.url: str | None = None
        self.log_path: Path | None = None
        self._log: IO[str] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BackendError("the embedded server is not running")
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "harness", "serve", *self.settings.to_args()]

    def start(self) -> EmbeddedServer:
        """Launch the child and wait until it answers /health. Raises LoadFailure/OutOfMemory."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        # Resolve the model here so a missing model fails fast, with the parent's message.
        resolve_model(self.settings.model)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log", dir=self.log_dir)
        os.close(fd)
        self.log_path = Path(name)
        self._log = self.log_path.open("w")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal goes to the parent, which stops us
        )
        self.url = self._read_url()
        self._wait_healthy()
        return self

    def _read_url(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        found: list[str] = []

        def reader() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                found.append(line.rstrip("\n"))
                if line.startswith((LISTEN_PREFIX, LOAD_FAILED_PREFIX)):
                    return

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(self.startup_timeout_s)
        for line in found:
            if line.startswith(LISTEN_PREFIX):
                return line[len(LISTEN_PREFIX) :].split()[0]
        failure = next((ln for ln in found if ln.startswith(LOAD_FAILED_PREFIX)), None)
        self.stop()
        self._raise_load_failure(failure[len(LOAD_FAILED_PREFIX) :] if failure else None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_load_failure(self, reason: str | None) -> None:
        tail = self.log_tail()
        text = f"{reason or ''}\n{tail}".lower()
        what = (
            f"llama.cpp server for model {self.settings.model!r} "
            f"(n_ctx={self.settings.n_ctx}, parallel={self.settings.parallel})"
        )
        if reason is None and self.proc is not None and self.proc.returncode is None:
            reason = f"no answer within {self.startup_timeout_s:.0f} s"
        if any(marker in text for marker in _OOM_MARKERS):
            raise OutOfMemory(
                f"{what} ran out of memory while loading: {reason or 'see log'}; "
                f"lower --ctx or --parallel (log: {self.log_path})"
            )
        raise LoadFailure(f"{what} failed to start: {reason or 'it exited'} (log: {self.log_path})")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.05
        with httpx.Client(base_url=self.url or "", timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    self._raise_load_failure(f"exited with code {self.proc.returncode}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.stop()
        self._raise_load_failure(f"/health did not answer within {self.startup_timeout_s:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open(errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (fault tests). The next `start()` launches a fresh one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> EmbeddedServer:
        """Stop (if running) and start a fresh server on the same port when it had one."""
        port = int(self.url.rsplit(":", 1)[1]) if self.url else self.settings.port
        self.stop()
        self.settings = replace(self.settings, port=port)
        return self.start()

    def memory_probe(self) -> ProcessRSSProbe:
        return ProcessRSSProbe(self.pid)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@Backend.register("embedded", order=0)
class EmbeddedBackend(OpenAIBackend):
    """OpenAI-compatible backend on a llama.cpp server it launches and stops itself."""

    default_model = DEFAULT_MODEL

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        opts: dict[str, Any] = {
            "n_ctx": spec.n_ctx * spec.parallel,
            "parallel": spec.parallel,
            "server_flags": spec.server_flags,
            "swa_full": spec.swa_full,
            "max_connections": spec.max_connections,
            "threads": spec.threads,
        }
        if spec.request_path:
            opts["request_path"] = spec.request_path
        return cls(spec.model or None, **opts)

    def __init__(
        self,
        model: str | None = None,
        *,
        n_ctx: int = 8192,
        parallel: int = 1,
        threads: int | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        swa_full: bool = False,
        server_flags: str = "harness",
        request_path: str | None = None,
        settings: ServerSettings | None = None,
        log_dir: str | Path | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 64,
        **_: Any,
    ) -> None:
        if settings is None and server_flags == "ollama":
            if swa_full:
                raise ConfigError(
                    "swa_full is not among the flags Ollama starts llama-server with; drop it, "
                    "or use the harness's own server flags"
                )
            settings = ollama_settings(
                model or DEFAULT_MODEL,
                max(16, n_ctx // parallel),
                num_parallel=parallel,
                kv_cache_type=cache_type_k if cache_type_k != "f16" else None,
                threads=threads,
            )
        self.settings = settings or ServerSettings(
            model=model or DEFAULT_MODEL,
            n_ctx=n_ctx,
            parallel=parallel,
            threads=threads,
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
            swa_full=swa_full,
            flags=server_flags,
        )
        self.settings.validate()
        self.server = EmbeddedServer(self.settings, log_dir=log_dir)
        self.spec = resolve_model(self.settings.model)
        if request_path is None:
            # Production's form under Ollama's flags (Go renders gemma3's template and sends
            # text); the fastest form under the harness's own.
            request_path = "text" if self.settings.flags == "ollama" else "tokens"
        super().__init__(
            "http://127.0.0.1:0",
            api_key_env=None,
            timeout_s=timeout_s,
            max_connections=max_connections,
            chat_format=self.spec.chat_format,
            request_path=request_path,
            n_keep=self.settings.n_keep if self.settings.ctx_shift else None,
        )
        self.info.model = self.settings.model
        self.info.extra["server_flags"] = self.settings.flags
        self.info.extra["llama_server_args"] = self.settings.llama_server_args()
        self.info.extra["llama_cpp"] = llamacpp_build()

    async def start(self) -> None:
        if not self.server.alive():
            await asyncio.to_thread(self.server.start)
            assert self.server.url is not None
            self.base_url = self.server.url
            self.info.base_url = self.server.url
            if self._client is not None:
                await self._client.aclose()
                self._client = None
        await super().start()
        self.info.model = self.settings.model
        self.info.extra["server_pid"] = self.server.pid
        self.info.extra["server_log"] = str(self.server.log_path)

    async def stop(self) -> None:
        await super().stop()
        await asyncio.to_thread(self.server.stop)

    async def model_geometry(self) -> ModelGeometry | None:
        return await asyncio.to_thread(geometry_from_gguf, self.spec.path)

    def memory_probe(self) -> ProcessRSSProbe:
        return self.server.memory_probe()

    def gpu_probe(self) -> None:
        return None  # the embedded server is xllamacpp's CPU build


def packaged_tokenizer() -> EmbeddedBackend:
    """A small server of the packaged Gemma 3 tokenizer (tiny-gemma3: random weights, the real
    vocabulary), not started: it counts prompts exactly for a Gemma server without a
    `/tokenize` of its own (Ollama), since Gemma 3's vocabulary is the same at every size."""
    return EmbeddedBackend(model="tiny-gemma3", n_ctx=512)
