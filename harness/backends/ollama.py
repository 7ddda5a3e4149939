"""Ollama on its native API, through the official `ollama` client's transport.

- Requests go to `/api/chat` with `options` (`num_ctx`, `num_predict`, `temperature`, `seed`),
  `keep_alive`, `format` (a JSON schema) for structured output, and `truncate: false`: Ollama
  otherwise cuts a prompt longer than the context and answers 200 as if nothing happened
  (ollama#9221); with it, the overflow comes back as an error, mapped to `ContextOverflow`.
- Replies are read from the body itself: the `ollama` client's response models drop fields
  they do not know, such as `prompt_eval_cached_count`, the cached prompt tokens newer servers
  report (`CACHED_FIELD_EVIDENCE` says what is known of which). That figure is `server`-sourced.
  A reply without it has cached tokens `unknown` (never estimated from durations) — unless the
  same server sent the field on earlier replies: then it leaves a zero out, and the reply counts
  0 cached tokens (`Usage.cached_omitted`), so a request that reused nothing (a cold start, a
  trim, a prefix that stopped matching) stays in the savings ratio instead of vanishing.
- `prompt_eval_count` changed meaning across versions (ollama#16414, #16428): omitted when the
  whole prompt was cached (before mid-2024), newly evaluated tokens only in 0.30.0, every prompt
  token (cached included) from 0.30.1 on. The version comes from `/api/version`; only where it
  counts every token can the engine compare it with its own count to catch a cut prompt.
- With no `num_ctx`, the model is loaded at start and its context read from `/api/ps`
  (`context_length`): Ollama's default is 4,096 tokens below 24 GiB of VRAM, less than the
  rubric plus a candidate.
- Geometry from `/api/show` (`gemma3.*` keys); memory from `/api/ps` (`size`, `size_vram`).
- A reply the request has already begun (`ChatRequest.prefill`, `--score-mode logprobs`) goes
  to `/api/generate` with `raw: true`: the prompt rendered here with Gemma's layout (as the text
  path renders it for llama-server), the prefill after it, and `logprobs` / `top_logprobs` (at
  most 20). `/api/chat` cannot carry it: Ollama's gemma3 template closes a final assistant turn
  and opens a new one (`template/gemma3-instruct.gotmpl` at ollama fb30760). Log-probabilities
  arrived in Ollama 0.12.11 (ollama#12899, 2025-11-11; the Python client 0.6.1, ollama-python
  #601): the reply's top-level `logprobs` list, each entry `token`, `logprob`, `bytes` and its
  `top_logprobs` (`api/types.go` `Logprob`), relayed from llama-server's `n_probs` (Ollama ≥ 0.30
  `llm/llama_server.go`): token text only, no ids.

The client takes an injectable httpx transport, so the logic is tested on recorded replies.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, Self

import httpx

from harness.backends.base import (
    Backend,
    BackendSpec,
    ChatRequest,
    ChatResult,
    ServerInfo,
    Timings,
    TokenChoice,
    Usage,
)
from harness.backends.http import map_transport_error
from harness.errors import (
    BackendError,
    ContextOverflow,
    ModelNotFound,
    NoAPI,
    OutOfMemory,
    ProtocolError,
    TransientServerError,
)
from harness.memory import MemoryProbe, OllamaPsProbe, local_gpu_probe, normalise_ollama_host
from harness.models.geometry import ModelGeometry, geometry_from_metadata
from harness.models.templates import get_format

__all__ = [
    "CACHED_FIELD_EVIDENCE",
    "DEFAULT_HOST",
    "LOGPROBS_SINCE",
    "REPLAY_HEADER",
    "OllamaBackend",
    "parse_version",
    "prompt_count_complete",
]

LOGPROBS_SINCE = (0, 12, 11)
"""The first Ollama version whose API returns log-probabilities (ollama#12899)."""
TOP_LOGPROBS_MAX = 20
"""Ollama answers 400 to a larger `top_logprobs` (server/routes.go)."""

DEFAULT_HOST = "http://127.0.0.1:11434"
REPLAY_HEADER = "X-Harness-Replay"
"""The header a replay of recorded Ollama replies names itself in (tests/ollama_replay.py)."""
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
# "the prompt is longer than the context length currently available to the model" (Ollama's
# own check), "the input length exceeds the context length" (older), and llama-server's
# "request (N tokens) exceeds the available context size (M tokens)" relayed with truncate off.
_CONTEXT_MARKERS = ("longer than the context length", "exceeds the context length",
                    "exceeds the available context size")  # fmt: skip
_LLAMA_OVERFLOW = re.compile(r"request \((\d+) tokens\) exceeds the available context size \((\d+)")


CACHED_FIELD_EVIDENCE = (
    "Ollama's prompt_eval_cached_count: added by ollama PR #17943 (merged 2026-08-22, after "
    "v0.33.0-rc2); a third-party client (openclaw PR #140222, 2026-09-06) names 0.33.3 as the "
    "first release with it; upstream declares it `*int` with omitempty (stdapi.ai#252), so a "
    "zero is sent, and an earlier branch (int, omitempty) left a zero out. No recorded reply of "
    "a named release shows it (an unattributed 0.34.0 body does, with 0). The harness reads it "
    "from each reply, and counts a missing one as 0 only where the same server sent it before"
)
"""What the evidence supports about which Ollama sends the cached count (doctor and README)."""


def parse_version(text: str) -> tuple[int, int, int] | None:
    """`0.33.0-rc2` → (0, 33, 0); None when it is not a version."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def prompt_count_complete(version: tuple[int, int, int] | None) -> bool:
    """Whether `prompt_eval_count` counts every prompt token, cached ones included, on this
    server version: not in 0.30.0 (new tokens only), nor when the version is unknown."""
    return version is not None and version != (0, 30, 0)


@Backend.register("ollama", order=2)
class OllamaBackend(Backend):
    """A client of an Ollama server (native API)."""

    default_model = "gemma3:12b"
    default_profile = "gpu-gemma3-12b"

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        return cls(
            spec.model or cls.default_model,
            base_url=spec.base_url,
            # Nothing set a context: use (and read) the one Ollama loads the model with.
            num_ctx=None if spec.context_from_server else spec.n_ctx,
        )

    def reach(self) -> dict[str, Any]:
        return {
            "kind": "ollama",
            "base_url": self.info.base_url,
            "model": self.info.model,
            "num_ctx": self.info.n_ctx_per_slot,
        }

    def __init__(
        self,
        model: str = default_model,
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
        self.version: tuple[int, int, int] | None = None
        self._cached_field_seen = False
        """Whether a reply of this server carried `prompt_eval_cached_count`: from then on a
        reply without it left a zero out (see the module docstring)."""
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
            return self._status_error(exc.status_code, str(exc.error))
        if isinstance(exc, ValueError):
            return ProtocolError(f"Ollama at {url} sent an unexpected reply: {exc}", url=url)
        return BackendError(f"Ollama at {url}: {type(exc).__name__}: {exc}", url=url)

    def _status_error(self, code: int, msg: str) -> BackendError:
        url = self.base_url
        low = msg.lower()
        if code == 404 and "model" not in low:
            # Go's plain-text `404 page not found`: this URL is not Ollama's API root.
            return NoAPI(
                f"no Ollama API at {url} (it answered {code} {msg.strip()!r}: wrong path? give "
                "the server's root, e.g. http://127.0.0.1:11434, without /v1 or /api)",
                url=url,
            )
        if code == 404 or ("model" in low and "not found" in low):
            return ModelNotFound(
                f"Ollama at {url} has no model {self.model!r} ({msg}); "
                f"run `ollama pull {self.model}`",
                url=url,
            )
        if any(marker in low for marker in _OOM_MARKERS):
            return OutOfMemory(
                f"Ollama at {url} ran out of memory loading {self.model!r} ({msg}); lower num_ctx",
                url=url,
            )
        if any(marker in low for marker in _CONTEXT_MARKERS):
            m = _LLAMA_OVERFLOW.search(msg)
            return ContextOverflow(
                f"Ollama at {url}: {msg} (num_ctx {self.info.n_ctx_per_slot})",
                url=url,
                prompt_tokens=int(m[1]) if m else None,
                n_ctx=int(m[2]) if m else self.info.n_ctx_per_slot,
            )
        if code in (429, 500, 502, 503, 504) or code < 0:
            return TransientServerError(
                f"Ollama at {url} answered {code}: {msg}", url=url, status_code=code
            )
        return BackendError(f"Ollama at {url} answered {code}: {msg}", url=url)

    # -- lifecycle -------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request through the official client's transport; the body as sent, as a dict."""
        try:
            resp = await self._client._request_raw(method, path, **kwargs)
            data = resp.json()
        except Exception as exc:
            raise self._translate(exc) from exc
        if not isinstance(data, dict):
            raise ProtocolError(f"Ollama at {self.base_url}{path} sent {data!r:.200}")
        return data

    async def start(self) -> None:
        import ollama

        if self._client is None:
            kwargs: dict[str, Any] = {"timeout": self.timeout_s}
            if self._transport is not None:
                kwargs["transport"] = self._transport
            self._client = ollama.AsyncClient(host=self.base_url, **kwargs)
        version, replay = await self._version()
        self.version = parse_version(version)
        self.info.server = f"ollama {version}"
        if replay:
            # Not Ollama: a replay of recorded bodies that says so. Every report it feeds
            # carries it, and the verdict never takes its figures for measurements.
            self.info.server += f" (a replay: {replay})"
            self.info.extra["replay"] = replay
        self.info.extra["prompt_eval_count_counts_cached"] = prompt_count_complete(self.version)
        # A started reply goes as a raw prompt rendered here: the chat layout must be known.
        self.info.supports_prefill = (
            self.version is not None
            and self.version >= LOGPROBS_SINCE
            and self.info.chat_format is not None
        )
        await self._request("POST", "/api/show", json={"model": self.model})
        if self.num_ctx is None:
            await self._load_and_read_context()

    async def _version(self) -> tuple[str, str | None]:
        """The server's version, and what it says it is when it is a replay of recorded replies
        (its `/api/version` answer's `replay`, or its `X-Harness-Replay` header); Ollama says
        neither."""
        try:
            resp = await self._client._request_raw("GET", "/api/version")
            data = resp.json()
        except Exception as exc:
            raise self._translate(exc) from exc
        if not isinstance(data, dict):
            raise ProtocolError(f"Ollama at {self.base_url}/api/version sent {data!r:.200}")
        replay = data.get("replay") or resp.headers.get(REPLAY_HEADER)
        return str(data.get("version", "?")), str(replay) if replay else None

    async def _load_and_read_context(self) -> None:
        """Load the model (an empty generate) and read its context from `/api/ps`."""
        await self._request(
            "POST", "/api/generate", json={"model": self.model, "keep_alive": self.keep_alive}
        )
        ps = await self._request("GET", "/api/ps")
        names = {self.model, f"{self.model}:latest"}
        for entry in ps.get("models") or []:
            if isinstance(entry, Mapping) and names & {entry.get("name"), entry.get("model")}:
                ctx = entry.get("context_length")
                if isinstance(ctx, int) and ctx > 0:
                    self.info.n_ctx_per_slot = ctx
                    self.info.extra["context_source"] = "ollama:/api/ps context_length"
                else:
                    self.info.extra["context_source"] = "unknown (/api/ps has no context_length)"
                return

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

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for `/api/chat`."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in request.messages],
            "stream": False,
            "options": self.options(request),
            "truncate": False,
        }
        if request.output_schema:
            body["format"] = dict(request.output_schema)
        return self._finish_body(body, request)

    def build_generate_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for `/api/generate` with a raw prompt: the chat rendered here with the
        model's layout, then the reply already begun (`request.prefill`)."""
        fmt = self.info.chat_format
        if fmt is None:
            raise BackendError(
                f"Ollama at {self.base_url}: the chat layout of {self.model!r} is not known to "
                "the harness, so a started reply cannot be sent; use --score-mode decode"
            )
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": fmt.render_text(request.messages) + (request.prefill or ""),
            "raw": True,
            "stream": False,
            "options": self.options(request),
            "truncate": False,
        }
        return self._finish_body(body, request)

    def _finish_body(self, body: dict[str, Any], request: ChatRequest) -> dict[str, Any]:
        """What `/api/chat` and `/api/generate` bodies share after their own fields: the
        log-probabilities asked (at most Ollama's 20) and how long the model stays loaded."""
        if request.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = min(request.top_logprobs, TOP_LOGPROBS_MAX)
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    async def chat(self, request: ChatRequest) -> ChatResult:
        if self._client is None:
            raise BackendError(f"Ollama backend for {self.base_url} is not started")
        started = time.perf_counter()
        if request.prefill is not None:
            data = await self._request(
                "POST", "/api/generate", json=self.build_generate_body(request)
            )
            total_ms = (time.perf_counter() - started) * 1000.0
            return self.parse_reply(data, total_ms)
        data = await self._request("POST", "/api/chat", json=self.build_body(request))
        total_ms = (time.perf_counter() - started) * 1000.0
        return self.parse_reply(data, total_ms)

    def parse_reply(self, data: Mapping[str, Any], total_ms: float) -> ChatResult:
        """Normalise an Ollama `/api/chat` or `/api/generate` body (see the module docstring for
        the counts)."""
        try:
            if "response" in data and "message" not in data:  # /api/generate
                content = str(data.get("response") or "")
            else:
                content = (data.get("message") or {}).get("content") or ""
            evaluated = data.get("prompt_eval_count")
            prompt_tokens = int(evaluated or 0)
            completion_tokens = int(data.get("eval_count") or 0)
            raw_cached = data.get("prompt_eval_cached_count")
            cached = int(raw_cached) if raw_cached is not None else None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"Ollama at {self.base_url} sent a malformed reply") from exc
        omitted = False
        if cached is not None:
            self._cached_field_seen = True
        elif self._cached_field_seen and evaluated is not None:
            cached, omitted = 0, True  # this server sends the field: it left a zero out
        complete = prompt_count_complete(self.version) and evaluated is not None
        if cached is not None and self.version == (0, 30, 0):
            prompt_tokens += cached  # 0.30.0 counted new tokens only

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
                "server" if cached is not None else "unknown",
                prompt_tokens_complete=complete,
                cached_omitted=omitted,
            ),
            timings=Timings(
                total_ms=total_ms,
                prompt_ms=ms("prompt_eval_duration"),
                decode_ms=ms("eval_duration"),
                load_ms=ms("load_duration"),
            ),
            raw=dict(data),
            top_logprobs=_top_lists(data.get("logprobs")),
        )

    async def model_geometry(self) -> ModelGeometry | None:
        if self._client is None:
            raise BackendError(f"Ollama backend for {self.base_url} is not started")
        show = await self._request("POST", "/api/show", json={"model": self.model})
        info = show.get("model_info") or {}
        return geometry_from_metadata(info, source=f"ollama:/api/show {self.model}")

    def memory_probe(self) -> OllamaPsProbe:
        return OllamaPsProbe(self.base_url, self.model, transport=self._sync_transport)

    def gpu_probe(self) -> MemoryProbe | None:
        return local_gpu_probe(self.base_url)


def _top_lists(entries: Any) -> list[list[TokenChoice]] | None:
    """Per generated token, its `top_logprobs` as Ollama sends them (text, no ids)."""
    if not isinstance(entries, list):
        return None
    out: list[list[TokenChoice]] = []
    for entry in entries:
        tops = entry.get("top_logprobs") if isinstance(entry, Mapping) else None
        out.append(
            [
                TokenChoice(str(t.get("token", "")), float(t["logprob"]))
                for t in (tops if isinstance(tops, list) else [])
                if isinstance(t, Mapping) and isinstance(t.get("logprob"), int | float)
            ]
        )
    return out
