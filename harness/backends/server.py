"""The llama.cpp server process itself (`harness serve`): xllamacpp's in-process server.

Runs in its own process (the embedded backend launches `python -m harness serve ...` as a child)
so memory readings of the server are clean and tests can kill it. On start it prints one line,
`harness serve: listening on http://127.0.0.1:PORT ...`, which the parent reads; on SIGTERM or
SIGINT it stops the server and exits 0. A load failure prints `harness serve: load failed: ...`
and exits 3.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

from harness.errors import ConfigError
from harness.models.kv import CACHE_TYPE_BYTES
from harness.models.registry import DEFAULT_MODEL, resolve_model

__all__ = ["LISTEN_PREFIX", "LOAD_FAILED_PREFIX", "ServerSettings", "build_params", "serve"]

LISTEN_PREFIX = "harness serve: listening on "
LOAD_FAILED_PREFIX = "harness serve: load failed: "


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Settings of one llama.cpp server."""

    model: str = DEFAULT_MODEL
    """Model name (see harness.models.registry) or a path to a GGUF file."""
    n_ctx: int = 8192
    """Total context in tokens, shared by all slots (each slot gets n_ctx / parallel)."""
    parallel: int = 1
    """Server slots: requests decoded together."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    threads: int | None = None
    """CPU threads (None: llama.cpp's default, the number of cores)."""
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    swa_full: bool = False
    """Keep full-size KV for sliding-window layers (costs memory, allows more cache reuse)."""
    cache_ram_mib: int = 0
    """llama.cpp's host-memory prompt cache. Off by default: it grows the server's RSS up to
    this size and would blur memory and leak measurements."""
    n_batch: int = 2048
    n_ubatch: int = 512

    def validate(self) -> None:
        if self.n_ctx < 16:
            raise ConfigError(f"--ctx {self.n_ctx} is too small (at least 16 tokens)")
        if self.parallel < 1:
            raise ConfigError(f"--parallel {self.parallel} must be at least 1")
        for name in ("cache_type_k", "cache_type_v"):
            if getattr(self, name) not in CACHE_TYPE_BYTES:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of {sorted(CACHE_TYPE_BYTES)}"
                )

    def to_args(self) -> list[str]:
        """Command-line arguments of `harness serve` that reproduce these settings."""
        args = [
            "--model", self.model,
            "--ctx", str(self.n_ctx),
            "--parallel", str(self.parallel),
            "--host", self.host,
            "--port", str(self.port),
            "--cache-type-k", self.cache_type_k,
            "--cache-type-v", self.cache_type_v,
            "--cache-ram-mib", str(self.cache_ram_mib),
            "--batch", str(self.n_batch),
            "--ubatch", str(self.n_ubatch),
        ]  # fmt: skip
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.swa_full:
            args.append("--swa-full")
        return args


def build_params(settings: ServerSettings) -> Any:
    """xllamacpp `CommonParams` for these settings."""
    import xllamacpp as xlc

    settings.validate()
    spec = resolve_model(settings.model)
    p = xlc.CommonParams()
    p.model.path = str(spec.path)
    p.n_ctx = settings.n_ctx
    p.n_parallel = settings.parallel
    p.hostnames = [settings.host]
    p.port = settings.port
    if settings.threads:
        p.cpuparams.n_threads = settings.threads
        p.cpuparams_batch.n_threads = settings.threads
    p.cache_type_k = getattr(xlc.ggml_type, f"GGML_TYPE_{settings.cache_type_k.upper()}")
    p.cache_type_v = getattr(xlc.ggml_type, f"GGML_TYPE_{settings.cache_type_v.upper()}")
    p.swa_full = settings.swa_full
    p.cache_ram_mib = settings.cache_ram_mib
    p.n_batch = settings.n_batch
    p.n_ubatch = settings.n_ubatch
    p.endpoint_metrics = True
    p.endpoint_slots = True
    p.cache_prompt = True
    # The GGUF of Gemma 3 270M has no chat template and llama.cpp would fall back to ChatML;
    # give it the layout the engine counts tokens with (`chat_template` is template *text*).
    p.use_jinja = True
    p.chat_template = spec.chat_format.jinja
    return p


def serve(settings: ServerSettings, out: TextIO = sys.stdout) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the process exit code."""
    import xllamacpp as xlc

    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        params = build_params(settings)
        server = xlc.Server(params)
    except Exception as exc:  # xllamacpp raises plain RuntimeErrors on load failures
        print(LOAD_FAILED_PREFIX + f"{type(exc).__name__}: {exc}", file=out, flush=True)
        return 3
    print(
        LISTEN_PREFIX + f"{server.listening_address} "
        f"(model={settings.model}, n_ctx={settings.n_ctx}, parallel={settings.parallel})",
        file=out,
        flush=True,
    )
    # A parent killed with SIGKILL cannot stop us (we run in our own session so a Ctrl-C meant
    # for the parent does not hit us first): when the parent is gone, stop by ourselves.
    parent = os.getppid()
    while not stop.wait(0.5):
        if os.getppid() != parent:
            print("harness serve: parent process is gone; stopping", file=sys.stderr, flush=True)
            break
    del server
    return 0
