"""Any server speaking OpenAI's `/v1/chat/completions` (llama.cpp, vLLM, ...), over httpx.

Cached tokens come from `usage.prompt_tokens_details.cached_tokens`, else llama.cpp's
`timings.cache_n`, else they are unknown (None). When the server is llama.cpp (it answers
`/props`), the backend also uses its extensions: `/tokenize`, `id_slot`, `cache_prompt`, GBNF
`grammar`, and its own `/completion` endpoint, which the request path chooses:

- `chat`: `/v1/chat/completions` with the messages; the server renders its chat template and
  tokenizes the whole prompt (the rubric too) on every request;
- `text`: `/completion` with the prompt rendered here as text (special tokens as text) — what
  Ollama ≥ 0.30 sends its llama-server for models whose template Go renders (gemma3);
- `tokens`: `/completion` with the prompt as the engine's own token ids: no template, no
  tokenization on the server. The fastest path; it needs the engine's exact count
  (`ChatRequest.prompt_ids`).

Connections to a llama.cpp server are capped at its slots + 1 (`llama_connections`). llama-server
serves HTTP on `max(slots + 2, cores - 1)` threads (3 for one slot on 2 cores), and cpp-httplib
keeps an idle keep-alive connection, with its thread, for 5 s. Uncapped, the token counter's
bursts of 8 `/tokenize` calls sometimes took 5.11 s instead of milliseconds: 11 times in 7 runs
of the performance suite or its replay on one slot, none with the cap (nor in four 200-row
`harness run`s). Which connection history triggers it was not isolated (a fresh client's burst
of 12 did not wait); the cap keeps every client within the threads the server has. Idle
connections are also dropped before the server's 5 s.

The API key is read from an environment variable (named by `api_key_env`) when the backend
starts; it goes into the Authorization header and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
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
from harness.backends.http import map_transport_error, raise_for_response
from harness.errors import (
    BackendError,
    ConfigError,
    ModelNotFound,
    ProtocolError,
    TransientServerError,
)
from harness.memory import MemoryProbe, local_gpu_probe
from harness.models.templates import ChatFormat

__all__ = ["LLAMA_KEEPALIVE_S", "REQUEST_PATHS", "OpenAIBackend", "llama_connections"]

REQUEST_PATHS = ("chat", "text", "tokens")
"""How a request reaches a llama.cpp server (see the module docstring)."""
_COMPLETION_ECHOES = frozenset({"prompt", "generation_settings"})
"""Fields of llama.cpp's `/completion` reply that echo the request (not kept)."""
_STOP_TYPES = {"eos": "stop", "word": "stop", "limit": "length"}
LLAMA_KEEPALIVE_S = 5.0
"""How long llama-server keeps an idle connection, and the HTTP thread serving it (cpp-httplib's
`CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND`)."""


def llama_connections(n_slots: int | None) -> int:
    """The most connections a client should hold to a llama.cpp server with `n_slots` slots.

    llama-server started without `--threads-http` (Ollama passes none) has `max(n_parallel + 2,
    cores - 1)` HTTP threads (tools/server), so at least slots + 2 whatever machine it runs on;
    each open keep-alive connection holds one. Slots + 1 leaves one for another client (a
    baseline, a health check) and is still one more than the slots: a request waits at the server
    (tokenized, in the queue) while the slots compute. More in flight than that cannot be read by
    the server before a thread frees: they wait in the client's pool instead.
    """
    return max(1, (n_slots or 1) + 1)


@Backend.register("openai", order=1)
class OpenAIBackend(Backend):
    """A client of any OpenAI-compatible chat server."""

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> Self:
        if not spec.base_url:
            raise ConfigError(
                "--backend openai needs --base-url or OPENAI_BASE_URL (e.g. "
                "http://127.0.0.1:8080/v1)"
            )
        opts: dict[str, Any] = {
            "model": spec.model or None,
            "max_connections": spec.max_connections,
        }
        if spec.request_path:
            opts["request_path"] = spec.request_path
        return cls(spec.base_url, **opts)

    def reach(self) -> dict[str, Any]:
        return {
            "kind": "openai",
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "chat_format": self.info.chat_format,
            "request_path": self.request_path,
            "n_keep": self.n_keep,
            "timeout_s": self.timeout_s,
        }

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        chat_format: ChatFormat | None = None,
        request_path: str = "chat",
        n_keep: int | None = None,
    ) -> None:
        if request_path not in REQUEST_PATHS:
            raise ConfigError(
                f"request path {request_path!r}: choose one of {', '.join(REQUEST_PATHS)}"
            )
        self.request_path = request_path
        self.n_keep = n_keep
        """`n_keep` sent with `/completion` requests (Ollama sends its num_keep)."""
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._capped = False
        """Whether the client's pool is already fitted to a llama.cpp server's HTTP threads."""
        self.info = ServerInfo(
            backend=self.name, base_url=self.base_url, model=model or "", chat_format=chat_format
        )

    # -- lifecycle -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendError(f"backend for {self.base_url} is not started; use `async with`")
        return self._client

    def _new_client(self, connections: int, keepalive_s: float | None = 5.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers(),
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                keepalive_expiry=keepalive_s,
            ),
            transport=self._transport,
        )

    async def start(self) -> None:
        if self._client is None:
            self._client = self._new_client(self.max_connections)
            self._capped = False
        await self._discover()
        if self.info.supports_slots and not self._capped:
            # A llama.cpp server: no more connections than it has HTTP threads to serve (see the
            # module docstring), and none kept idle for as long as the server keeps them.
            cap = min(self.max_connections, llama_connections(self.info.n_slots))
            await self.client.aclose()
            self._client = self._new_client(cap, keepalive_s=LLAMA_KEEPALIVE_S - 1.0)
            self._capped = True
            self.info.extra["connections"] = cap

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _get(self, path: str) -> httpx.Response:
        url = self.base_url + path
        try:
            return await self.client.get(path)
        except httpx.TransportError as exc:
            raise map_transport_error(exc, url) from exc

    async def _discover(self) -> None:
        """Learn what the server is: its models, and llama.cpp's slots and context."""
        resp = await self._get("/v1/models")
        raise_for_response(resp, self.base_url + "/v1/models")
        try:
            models = [m.get("id") for m in resp.json().get("data", [])]
        except (ValueError, AttributeError) as exc:
            raise ProtocolError(f"{self.base_url}/v1/models did not return a model list") from exc
        if self.model and models and self.model not in models:
            raise ModelNotFound(
                f"model {self.model!r} is not served at {self.base_url}; it serves: "
                + ", ".join(str(m) for m in models),
                url=self.base_url,
            )
        if not self.info.model and models:
            self.info.model = str(models[0])
        props = await self._get("/props")
        if props.status_code == 200:
            try:
                data = props.json()
            except ValueError:
                data = {}
            self.info.server = f"llama.cpp {data.get('build_info', '')}".strip()
            self.info.n_slots = data.get("total_slots")
            settings = data.get("default_generation_settings", {})
            self.info.n_ctx_per_slot = settings.get("n_ctx")
            self.info.supports_slots = True
            self.info.supports_tokenize = True
            # llama-server continues a final assistant message (its default, unless started
            # with --no-prefill-assistant) and reports top log-probabilities (n_probs).
            self.info.supports_prefill = True
            self.info.extra["props"] = {
                k: data.get(k) for k in ("model_path", "total_slots", "build_info")
            }
        if self.request_path != "chat":
            if not self.info.supports_slots:
                raise ConfigError(
                    f"request path {self.request_path!r} needs a llama.cpp server (its "
                    f"/completion endpoint); {self.base_url} is not one: use --request-path chat"
                )
            if self.info.chat_format is None:
                raise ConfigError(
                    f"request path {self.request_path!r} renders the prompt here, but the chat "
                    f"template of {self.info.model!r} is not known to the harness: use "
                    "--request-path chat"
                )
        self.info.extra["request_path"] = self.request_path

    def gpu_probe(self) -> MemoryProbe | None:
        return local_gpu_probe(self.base_url)

    async def health(self) -> bool:
        try:
            resp = await self.client.get("/health")
            if resp.status_code == 404:
                # An OpenAI-compatible server without llama.cpp's / vLLM's /health: it is
                # ready when it lists its models.
                resp = await self.client.get("/v1/models")
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    # -- requests --------------------------------------------------------------------------

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for `/v1/chat/completions`."""
        body: dict[str, Any] = {"messages": list(request.messages)}
        if request.prefill is not None:
            # The reply already begun: llama-server renders it without closing the turn and
            # the model continues it.
            body["messages"].append({"role": "assistant", "content": request.prefill})
        if request.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        if self.model:
            body["model"] = self.model
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.seed is not None:
            body["seed"] = request.seed
        if request.grammar is not None and self.info.supports_slots:
            body["grammar"] = request.grammar
        elif request.output_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": dict(request.output_schema)},
            }
        if self.info.supports_slots:
            if request.slot is not None:
                body["id_slot"] = request.slot
            if not request.cache_prompt:
                body["cache_prompt"] = False
        body.update(request.extra)
        return body

    def build_completion_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body for llama.cpp's `/completion` (the `text` and `tokens` paths)."""
        prompt: Any
        if self.request_path == "tokens" and request.prompt_ids is not None:
            prompt = list(request.prompt_ids)
        else:  # the text path, or a request whose ids were not counted (sent as text)
            fmt = self.info.chat_format
            assert fmt is not None  # checked at start
            prompt = fmt.render_text(request.messages)  # the server adds BOS
            if request.prefill is not None:
                prompt += request.prefill
        body: dict[str, Any] = {"prompt": prompt, "cache_prompt": request.cache_prompt}
        if request.top_logprobs:
            body["n_probs"] = request.top_logprobs
        if request.max_tokens is not None:
            body["n_predict"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.seed is not None:
            body["seed"] = request.seed
        if request.grammar is not None:
            body["grammar"] = request.grammar
        elif request.output_schema is not None:
            body["json_schema"] = dict(request.output_schema)
        if request.slot is not None:
            body["id_slot"] = request.slot
        if self.n_keep:
            body["n_keep"] = self.n_keep
        extra = dict(request.extra)
        if "max_tokens" in extra:  # batch lines say max_tokens; /completion says n_predict
            body["n_predict"] = extra.pop("max_tokens")
        body.update(extra)
        return body

    async def _post(self, path: str, body: dict[str, Any], timeout_s: float) -> Any:
        url = self.base_url + path
        try:
            resp = await self.client.post(
                path,
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(timeout_s, connect=10.0),
            )
        except httpx.TransportError as exc:
            raise map_transport_error(exc, url) from exc
        raise_for_response(resp, url)
        try:
            return resp.json()
        except ValueError as exc:
            raise TransientServerError(
                f"{url} sent a body that is not JSON (truncated?)", url=url
            ) from exc

    async def chat(self, request: ChatRequest) -> ChatResult:
        timeout = request.timeout_s if request.timeout_s is not None else self.timeout_s
        started = time.perf_counter()
        if self.request_path == "chat":
            data = await self._post("/v1/chat/completions", self.build_body(request), timeout)
            total_ms = (time.perf_counter() - started) * 1000.0
            return self.parse_reply(
                data, total_ms, self.base_url + "/v1/chat/completions", request.slot
            )
        data = await self._post("/completion", self.build_completion_body(request), timeout)
        total_ms = (time.perf_counter() - started) * 1000.0
        return self.parse_completion(data, total_ms, self.base_url + "/completion", request.slot)

    async def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Two prompts the second of which is the first plus one token (1..10 on Gemma: the
        token after `1`) are one request of two tokens on llama.cpp, the first forced to that
        token (`logit_bias`: the probabilities it reports are the model's, before any sampler),
        so the second position's probabilities are the second prompt's: one task, as a decoded
        reply is. Otherwise `/completion` (the text and token paths) takes every prompt in one
        call (llama-server runs them as tasks one after another on the slot, each finding the
        one before it in its cache), and the chat path asks one by one.

        Why one task: the token path's two tasks a row (a prompt, then it plus `1`) lost 510
        tokens of cached rubric on 47 of 199 rows in each of three 200-row runs of Gemma 3 270M
        under Ollama's flags (Gemma's sliding-window cache; decoded rows lost none), a 510-token
        prefill each."""
        if len(requests) < 2:
            return await super().chat_many(requests)
        forced = self._one_more_token(requests)
        if forced is not None:
            return await self._forced_pair(requests[0], forced)
        if self.request_path == "chat":
            return await super().chat_many(requests)
        first = requests[0]
        timeout = first.timeout_s if first.timeout_s is not None else self.timeout_s
        bodies = [self.build_completion_body(r) for r in requests]
        body = dict(bodies[0])
        body["prompt"] = [b["prompt"] for b in bodies]
        started = time.perf_counter()
        data = await self._post("/completion", body, timeout)
        total_ms = (time.perf_counter() - started) * 1000.0
        url = self.base_url + "/completion"
        if not isinstance(data, list) or len(data) != len(requests):
            raise TransientServerError(
                f"{url} answered {len(requests)} prompts with something else than "
                f"{len(requests)} results",
                url=url,
            )
        # llama-server answers in the order of the prompts (each result carries its `index`).
        data = sorted(data, key=lambda d: int(d.get("index", 0)) if isinstance(d, dict) else 0)
        return [self.parse_completion(d, total_ms, url, first.slot) for d in data]

    def _one_more_token(self, requests: Sequence[ChatRequest]) -> int | None:
        """The token the second request adds to the first, when that is all it adds (and the
        server is llama.cpp, which takes `logit_bias` by token id)."""
        if len(requests) != 2 or not self.info.supports_slots:
            return None
        a, b = requests
        if a.prompt_ids is None or b.prompt_ids is None or a.top_logprobs is None:
            return None
        ids_a, ids_b = list(a.prompt_ids), list(b.prompt_ids)
        if len(ids_b) != len(ids_a) + 1 or ids_b[:-1] != ids_a:
            return None
        return int(ids_b[-1])

    async def _forced_pair(self, first: ChatRequest, token: int) -> list[ChatResult]:
        # /v1/chat/completions takes OpenAI's {"id": bias}; /completion llama.cpp's [[id, bias]].
        bias: Any = {str(token): 100} if self.request_path == "chat" else [[token, 100]]
        extra = {**first.extra, "logit_bias": bias}
        r = await self.chat(replace(first, max_tokens=2, extra=extra))
        tops = r.top_logprobs or []
        prompt, cached, source = r.usage.prompt_tokens, r.usage.cached_tokens, r.usage.cached_source
        a = ChatResult(
            r.content, r.finish_reason, Usage(prompt, 1, cached, source), r.timings, r.raw,
            r.slot, top_logprobs=tops[:1],
        )  # fmt: skip
        # The forced token was computed as a decode step: the second "prompt" cost one token.
        b = ChatResult(
            r.content, r.finish_reason, Usage(prompt + 1, 1, prompt, source),
            Timings(total_ms=r.timings.total_ms, prompt_ms=0.0, decode_ms=0.0), r.raw, r.slot,
            top_logprobs=tops[1:2],
        )  # fmt: skip
        return [a, b]

    @staticmethod
    def parse_completion(
        data: Any, total_ms: float, url: str, slot: int | None = None
    ) -> ChatResult:
        """Normalise a llama.cpp `/completion` body: the prompt is `cache_n + prompt_n`."""
        try:
            timings = data["timings"]
            cached = int(timings["cache_n"])
            prompt_tokens = cached + int(timings["prompt_n"])
            completion_tokens = int(data.get("tokens_predicted", 0))
            content = str(data.get("content") or "")
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientServerError(
                f"{url} sent a reply without content/timings (truncated?)", url=url
            ) from exc
        finish = _STOP_TYPES.get(str(data.get("stop_type")), data.get("stop_type"))
        probs = data.get("completion_probabilities")
        top = _top_lists(probs) if isinstance(probs, list) else None
        # The server's reply as it came, less what it echoes of the request: the whole prompt
        # (4,000 tokens of rubric in every results line) and the generation settings (the
        # grammar among them). Results files keep it beside the harness's chat.completion body
        # (`harness.backends.completion`, which carries its per-token probabilities as OpenAI's
        # `logprobs.content`), as the server's, never as that body.
        raw = {k: v for k, v in data.items() if k not in _COMPLETION_ECHOES}
        return ChatResult(
            content=content,
            finish_reason=finish,
            usage=Usage(prompt_tokens, completion_tokens, cached, "llama.cpp timings"),
            timings=Timings(
                total_ms=total_ms,
                prompt_ms=timings.get("prompt_ms"),
                decode_ms=timings.get("predicted_ms"),
            ),
            raw=raw,
            slot=slot,
            context_shifted=bool(data.get("truncated")),
            top_logprobs=top,
        )

    @staticmethod
    def parse_reply(data: Any, total_ms: float, url: str, slot: int | None = None) -> ChatResult:
        """Normalise an OpenAI chat completion body (with llama.cpp extras if present)."""
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
            prompt_tokens = int(usage["prompt_tokens"])
            completion_tokens = int(usage.get("completion_tokens", 0))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise TransientServerError(
                f"{url} sent a reply without choices/usage (truncated?)", url=url
            ) from exc
        timings = data.get("timings") or {}
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        content_probs = logprobs.get("content") if isinstance(logprobs, dict) else None
        details = usage.get("prompt_tokens_details") or {}
        cached: int | None
        if details.get("cached_tokens") is not None:
            cached, source = int(details["cached_tokens"]), "server"
        elif timings.get("cache_n") is not None:
            cached, source = int(timings["cache_n"]), "llama.cpp timings"
        else:
            cached, source = None, "unknown"
        return ChatResult(
            content=content,
            finish_reason=choice.get("finish_reason"),
            usage=Usage(prompt_tokens, completion_tokens, cached, source),
            timings=Timings(
                total_ms=total_ms,
                prompt_ms=timings.get("prompt_ms"),
                decode_ms=timings.get("predicted_ms"),
            ),
            raw=data,
            slot=slot,
            top_logprobs=_top_lists(content_probs) if isinstance(content_probs, list) else None,
        )

    async def tokenize(
        self, texts: Sequence[str], parse_special: bool = False
    ) -> Sequence[Sequence[int]]:
        """llama.cpp `/tokenize`, one text per call, a few calls at a time."""
        if not self.info.supports_tokenize:
            return await super().tokenize(texts, parse_special)
        url = self.base_url + "/tokenize"
        limit = asyncio.Semaphore(8)

        async def one(text: str) -> list[int]:
            async with limit:
                try:
                    resp = await self.client.post(
                        "/tokenize",
                        json={
                            "content": text,
                            "add_special": False,
                            "parse_special": parse_special,
                        },
                    )
                except httpx.TransportError as exc:
                    raise map_transport_error(exc, url) from exc
            raise_for_response(resp, url)
            return [int(t) for t in resp.json()["tokens"]]

        return await asyncio.gather(*(one(t) for t in texts))


def _top_lists(entries: list[Any]) -> list[list[TokenChoice]]:
    """Per generated token, its `top_logprobs` (OpenAI's `logprobs.content`, llama.cpp's
    `completion_probabilities`: the same shape, llama.cpp adds each token's `id`)."""
    out: list[list[TokenChoice]] = []
    for entry in entries:
        tops = entry.get("top_logprobs") if isinstance(entry, dict) else None
        row: list[TokenChoice] = []
        for t in tops if isinstance(tops, list) else []:
            if isinstance(t, dict) and "logprob" in t:
                tid = t.get("id")
                row.append(
                    TokenChoice(
                        str(t.get("token", "")),
                        float(t["logprob"]),
                        int(tid) if isinstance(tid, int) else None,
                    )
                )
        out.append(row)
    return out
