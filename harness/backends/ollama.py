"""Ollama on its native API, through the official `ollama` client.

- Requests carry `options` (`num_ctx`, `num_predict`, `temperature`, `seed`), `keep_alive`, and
  `format` (a JSON schema) for structured output.
- Model geometry comes from `/api/show` (`gemma3.*` keys; a missing `key_length` defaults to 256
  as Ollama does); load state and memory from `/api/ps` (`size`, `size_vram`, `context_length`).
- In most Ollama versions `prompt_eval_count` counts *all* prompt tokens, cached ones included,
  so cached tokens are not reported. They are **inferred** here: the first request of a prompt
  family runs cold and gives a prefill rate (tokens per nanosecond of `prompt_eval_duration`);
  a later request that took less time than its prompt would need at that rate is taken to have
  reused the difference. `Usage.cached_source` says `inferred` for such figures.

The client takes an injectable httpx transport, so the logic is tested on recorded responses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx

from harness.backends.base import Backend, ChatRequest, ChatResult, ServerInfo, Timings, Usage
from harness.backends.openai import map_transport_error
from harness.errors import (
    BackendError,
    ContextOverflow,
    ModelNotFound,
    OutOfMemory,
    ProtocolError,
    TransientServerError,
)
from harness.memory import OllamaPsProbe, normalise_ollama_host
from harness.models.geometry import ModelGeometry, geometry_from_metadata
from harness.models.templates import get_format

__all__ = ["CacheInference", "OllamaBackend"]

DEFAULT_HOST = "http://127.0.0.1:11434"
_NS_PER_MS = 1_000_000.0
# Substrings of Ollama's load failures for want of memory. Ollama's own check answers 500
# "model requires more system memory (7.5 GiB) than is available (5.2 GiB)"; the runner's
# failures carry llama.cpp/CUDA wording.
_OOM_MARKERS = (
    "out of memory",
    "cudamalloc",
    "insufficient memory",
    "requires more system memory",
    "unable to allocate",
)


class CacheInference:
    """Infers cached prompt tokens from Ollama's durations (see the module docstring).

    The cold prefill cost is the *slowest* (highest ns per prompt token) seen: the first
    request's, raised by any later request that took longer per token, since such a request
    cannot have reused much. Inferred cached tokens are clamped to `[0, prompt_tokens - 1]`.
    """

    def __init__(self) -> None:
        self.cold_ns_per_token: float | None = None

    def observe(self, prompt_tokens: int, prompt_eval_ns: int | None) -> int | None:
        if not prompt_eval_ns or prompt_tokens <= 0:
            return None
        ns_per_token = prompt_eval_ns / prompt_tokens
        if self.cold_ns_per_token is None:
            self.cold_ns_per_token = ns_per_token
            return 0
        if ns_per_token > self.cold_ns_per_token:
            # Slower than our cold estimate: this one was (nearly) cold; learn from it.
            self.cold_ns_per_token = ns_per_token
            return 0
        computed = prompt_eval_ns / self.cold_ns_per_token
        cached = round(prompt_tokens - computed)
        return max(0, min(prompt_tokens - 1, cached))


@Backend.register("ollama")
class OllamaBackend(Backend):
    """A client of an Ollama server (native API)."""

    def __init__(
        self,
        model: str = "gemma3:12b",
        *,
        base_url: str | None = None,
        num_ctx: int | None = None,
        keep_alive: str | float | None = "30m",
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sync_transport: httpx.BaseTransport | None = None,
        **_: Any,
    ) -> None:
        import os

        # `OLLAMA_HOST=0.0.0.0` (how Ollama is told to listen on every interface) means port
        # 11434 to the ollama CLI and client, not http's 80.
        self.base_url = normalise_ollama_host(
            base_url or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        )
        self.model = model
        self.num_ctx = num_ctx
        self.keep_alive = keep_alive
        self.timeout_s = timeout_s
        self._transport = transport
        self._sync_transport = sync_transport
        self._client: Any = None
        self.cache_inference = CacheInference()
        self.info = ServerInfo(
            backend=self.name,
            base_url=self.base_url,
            model=model,
            n_ctx_per_slot=num_ctx,
            chat_format=get_format("gemma") if model.startswith("gemma") else None,
        )

    # -- error translation -----------------------------------------------------------------

    def _translate(self, exc: BaseException) -> BackendError:
        import ollama

        url = self.base_url
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, httpx.TransportError):
            return map_transport_error(exc, url)
        if isinstance(exc, ConnectionError):
            return map_transport_error(httpx.ConnectError(str(exc)), url)
        if isinstance(exc, ollama.ResponseError):
            msg = str(exc.error)
            low = msg.lower()
            code = exc.status_code
            if code == 404 or "not found" in low:
                return ModelNotFound(
                    f"Ollama at {url} has no model {self.model!r} ({msg}); "
                    f"run `ollama pull {self.model}`",
                    url=url,
                )
            if any(marker in low for marker in _OOM_MARKERS):
                return OutOfMemory(
                    f"Ollama at {url} ran out of memory loading {self.model!r} ({msg}); "
                    "lower num_ctx",
                    url=url,
                )
            if "context" in low and ("exceed" in low or "too long" in low):
                return ContextOverflow(f"Ollama at {url}: {msg}", url=url)
            if code in (429, 500, 502, 503, 504) or code < 0:
                return TransientServerError(
                    f"Ollama at {url} answered {code}: {msg}", url=url, status_code=code
                )
            return BackendError(f"Ollama at {url} answered {code}: {msg}", url=url)
        if isinstance(exc, ValueError):
            return ProtocolError(f"Ollama at {url} sent an unexpected reply: {exc}", url=url)
        return BackendError(f"Ollama at {url}: {type(exc).__name__}: {exc}", url=url)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        import ollama

        if self._client is None:
            kwargs: dict[str, Any] = {"timeout": self.timeout_s}
            if self._transport is not None:
                kwargs["transport"] = self._transport
            self._client = ollama.AsyncClient(host=self.base_url, **kwargs)
        try:
            version = await self._client._request_raw("GET", "/api/version")
            self.info.server = f"ollama {version.json().get('version', '?')}"
            await self._client.show(self.model)
        except Exception as exc:
            raise self._translate(exc) from exc

    async def stop(self) -> None:
        if self._client is not None:
            await self._client._client.aclose()
            self._client = None

    async def health(self) -> bool:
        if self._client is None:
            return False
        try:
            await self._client._request_raw("GET", "/api/version")
        except Exception:
            return False
        return True

    # -- requests --------------------------------------------------------------------------

    def options(self, request: ChatRequest) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.num_ctx is not None:
            opts["num_ctx"] = self.num_ctx
        if request.max_tokens is not None:
            opts["num_predict"] = request.max_tokens
        if request.temperature is not None:
            opts["temperature"] = request.temperature
        if request.seed is not None:
            opts["seed"] = request.seed
        extra_opts = request.extra.get("options")
        if isinstance(extra_opts, Mapping):
            opts.update(extra_opts)
        return opts

    async def chat(self, request: ChatRequest) -> ChatResult:
        if self._client is None:
            raise BackendError(f"Ollama backend for {self.base_url} is not started")
        started = time.perf_counter()
        try:
            resp = await self._client.chat(
                model=self.model,
                messages=[dict(m) for m in request.messages],
                options=self.options(request),
                format=dict(request.output_schema) if request.output_schema else None,
                keep_alive=self.keep_alive,
                stream=False,
            )
        except Exception as exc:
            raise self._translate(exc) from exc
        total_ms = (time.perf_counter() - started) * 1000.0
        return self.parse_reply(resp.model_dump(), total_ms)

    def parse_reply(self, data: Mapping[str, Any], total_ms: float) -> ChatResult:
        """Normalise an Ollama `/api/chat` body; cached tokens are inferred (see module doc)."""
        try:
            content = (data.get("message") or {}).get("content") or ""
            prompt_tokens = int(data.get("prompt_eval_count") or 0)
            completion_tokens = int(data.get("eval_count") or 0)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"Ollama at {self.base_url} sent a malformed reply") from exc
        prompt_ns = data.get("prompt_eval_duration")
        cached = self.cache_inference.observe(prompt_tokens, prompt_ns)

        def ms(key: str) -> float | None:
            value = data.get(key)
            return float(value) / _NS_PER_MS if value is not None else None

        return ChatResult(
            content=content,
            finish_reason=data.get("done_reason"),
            usage=Usage(
                prompt_tokens,
                completion_tokens,
                cached,
                "inferred" if cached is not None else "unknown",
            ),
            timings=Timings(
                total_ms=total_ms,
                prompt_ms=ms("prompt_eval_duration"),
                decode_ms=ms("eval_duration"),
                load_ms=ms("load_duration"),
            ),
            raw=dict(data),
        )

    async def model_geometry(self) -> ModelGeometry | None:
        if self._client is None:
            raise BackendError(f"Ollama backend for {self.base_url} is not started")
        try:
            show = await self._client.show(self.model)
        except Exception as exc:
            raise self._translate(exc) from exc
        info = show.modelinfo or {}
        return geometry_from_metadata(info, source=f"ollama:/api/show {self.model}")

    def memory_probe(self) -> OllamaPsProbe:
        return OllamaPsProbe(self.base_url, self.model, transport=self._sync_transport)
