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

__all__ = [
    "FLASH_ATTN",
    "LISTEN_PREFIX",
    "LOAD_FAILED_PREFIX",
    "OLLAMA_MIRRORED",
    "SERVER_FLAGS",
    "ServerSettings",
    "build_params",
    "llamacpp_build",
    "ollama_settings",
    "serve",
]

LISTEN_PREFIX = "harness serve: listening on "
LOAD_FAILED_PREFIX = "harness serve: load failed: "


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
"""llama-server's `--flash-attn` values and xllamacpp's `flash_attn_type` numbers."""
SERVER_FLAGS = ("ollama", "harness")
"""Launch modes: `ollama` mirrors how Ollama starts llama-server (what production runs);
`harness` is the harness's own tuning (`swa_full` where asked, no host prompt cache)."""
OLLAMA_MIRRORED = "Ollama v0.33.0-rc2 (ollama/ollama fb30760, 2026-08-21; llama.cpp b10488)"
"""The Ollama source the `ollama` launch mode mirrors: `startLlamaServer` in
`llm/llama_server.go` (flags), `DefaultOptions` in `api/types.go` (num_keep 4, num_batch 512),
`resolveContextShift` in `server/sched.go` (context shift on unless the request says no)."""


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
    cache_ram_mib: int | None = 0
    """llama.cpp's host-memory prompt cache in MiB; None: llama-server's default (8192). Off
    in the harness mode: it grows the server's RSS up to this size and blurs memory and leak
    measurements. Ollama passes nothing, so its servers have the default."""
    n_batch: int = 2048
    n_ubatch: int = 512
    ctx_shift: bool = False
    """`--context-shift`: when a sequence fills its context, drop old tokens (after `n_keep`)
    instead of failing. Ollama turns it on; the engine's trim policy should make it never
    happen, and a reply that says it happened is counted as a trim failure."""
    n_keep: int = 0
    """`--keep`: tokens kept at the start of a sequence by a context shift."""
    flash_attn: str = "auto"
    """`--flash-attn`: auto, on or off."""
    flags: str = "harness"
    """Which launch mode built these settings (see `SERVER_FLAGS`)."""

    def llama_server_args(self) -> list[str]:
        """The same settings as llama-server command-line flags (for reports: what ran)."""
        args = ["-c", str(self.n_ctx), "-np", str(self.parallel)]
        if self.cache_type_k != "f16" or self.cache_type_v != "f16":
            args += ["--cache-type-k", self.cache_type_k, "--cache-type-v", self.cache_type_v]
        args += [
            "--flash-attn",
            self.flash_attn,
            "-b",
            str(self.n_batch),
            "-ub",
            str(self.n_ubatch),
        ]
        if self.threads:
            args += ["-t", str(self.threads)]
        if self.ctx_shift:
            args.append("--context-shift")
            if self.n_keep > 0:
                args += ["--keep", str(self.n_keep)]
        if self.swa_full:
            args.append("--swa-full")
        if self.cache_ram_mib is not None:
            args += ["--cache-ram", str(self.cache_ram_mib)]
        return args

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
        if self.flash_attn not in FLASH_ATTN:
            raise ConfigError(f"flash attention {self.flash_attn!r} is not one of auto, on, off")
        if self.flags not in SERVER_FLAGS:
            raise ConfigError(f"server flags {self.flags!r}: choose {' or '.join(SERVER_FLAGS)}")

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
            "--batch", str(self.n_batch),
            "--ubatch", str(self.n_ubatch),
            "--flash-attn", self.flash_attn,
            "--flags", self.flags,
        ]  # fmt: skip
        if self.cache_ram_mib is not None:
            args += ["--cache-ram-mib", str(self.cache_ram_mib)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.swa_full:
            args.append("--swa-full")
        if self.ctx_shift:
            args += ["--context-shift", "--keep", str(self.n_keep)]
        return args


def ollama_settings(
    model: str,
    num_ctx: int,
    *,
    num_parallel: int = 1,
    num_keep: int = 4,
    kv_cache_type: str | None = None,
    flash_attention: bool | None = None,
    num_batch: int = 512,
    context_shift: bool = True,
    threads: int | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> ServerSettings:
    """The llama-server Ollama would start for a GGUF model with these options.

    Mirrors `OLLAMA_MIRRORED`: `-c num_ctx × num_parallel -np num_parallel` (every slot gets
    the whole num_ctx), `--cache-type-k/v` only when `OLLAMA_KV_CACHE_TYPE` is set (else
    llama-server's f16), `--flash-attn on|off` when `OLLAMA_FLASH_ATTENTION` is set, else
    `auto` (CPU and CUDA ≥ 6.0 support it), `-b/-ub num_batch` (512 by default),
    `--context-shift --keep num_keep` (num_keep 4 by default), and nothing else: no
    `--swa-full`, `--ctx-checkpoints` or `--cache-ram`, so llama-server's defaults apply.
    """
    kv = kv_cache_type or "f16"
    return ServerSettings(
        model=model,
        n_ctx=num_ctx * num_parallel,
        parallel=num_parallel,
        host=host,
        port=port,
        threads=threads,
        cache_type_k=kv,
        cache_type_v=kv,
        swa_full=False,
        cache_ram_mib=None,
        n_batch=num_batch,
        n_ubatch=num_batch,
        ctx_shift=context_shift,
        n_keep=num_keep if context_shift else 0,
        flash_attn="auto" if flash_attention is None else ("on" if flash_attention else "off"),
        flags="ollama",
    )


def llamacpp_build() -> str:
    """The llama.cpp build the embedded server runs, e.g. `llama.cpp b11549 (xllamacpp
    2026.10.11549)`. The server's own `build_info` says `b0-unknown`; xllamacpp versions are
    CalVer `YYYY.MM.NNNN` whose last field is the llama.cpp build number it wraps
    (xorbitsai/xllamacpp `scripts/generate-release-version.sh`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("xllamacpp")
    except PackageNotFoundError:
        return "llama.cpp (xllamacpp not installed)"
    build = v.rsplit(".", 1)[-1]
    return f"llama.cpp b{build} (xllamacpp {v})" if build.isdigit() else f"xllamacpp {v}"


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
    if settings.cache_ram_mib is not None:
        p.cache_ram_mib = settings.cache_ram_mib
    p.n_batch = settings.n_batch
    p.n_ubatch = settings.n_ubatch
    p.ctx_shift = settings.ctx_shift
    p.n_keep = settings.n_keep
    p.flash_attn_type = FLASH_ATTN[settings.flash_attn]
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
        f"(model={settings.model}, n_ctx={settings.n_ctx}, parallel={settings.parallel}, "
        f"flags={settings.flags}: {' '.join(settings.llama_server_args())})",
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
