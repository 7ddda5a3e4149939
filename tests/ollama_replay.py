"""A loopback HTTP server that replays reply bodies recorded from real Ollama servers.

It answers Ollama's native routes with the recorded bodies of `tests/data/ollama/recorded/`
(SOURCES.md names each one's source). Two things cannot come from a recording and are set per
test, and said so: the server's version (to replay a body as 0.30.0 or 0.34.0) and the token
counts of each `/api/chat` reply, which must describe *this* request (`counts(request_body)`
returns the fields to put over the recorded body's, e.g. `prompt_eval_count`). Unknown paths get
Go's plain `404 page not found`, as Ollama's do. It says it is a replay (`/api/version` answers
`replay` beside `version`, every reply carries `X-Harness-Replay`): the harness records it in
every report it feeds and the verdict never counts those figures as measurements.

    with OllamaReplay(version="0.34.0", counts=lambda body: {...}) as replay:
        ... replay.url ...

`counting(tokenizer_url)` gives a `counts` that does what a server does: it renders the chat
with Gemma's layout, tokenizes it with a real llama.cpp tokenizer (the tiny model's: Gemma 3's
vocabulary) and reports every token as counted and all but the new turn as cached. With
`kv_bytes_per_token`, `/api/ps` reports `size` growing with the num_ctx of the last load, as a
model whose KV grows does (a model of Ollama's accounting, not a recording).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "data" / "ollama" / "recorded"
MARKER = "tests/ollama_replay.py: recorded Ollama bodies, counts set by the test"
"""What the replay says it is, in its `/api/version` answer and an `X-Harness-Replay` header."""

Counts = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def recorded(name: str) -> Any:
    text = (RECORDED / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else text


class OllamaReplay:
    """See the module docstring. A context manager; `url` is `http://127.0.0.1:PORT`."""

    def __init__(
        self,
        *,
        model: str = "gemma3:12b",
        version: str = "0.34.0",
        chat: str = "unattributed_chat_qwen2.5_7b_prompt_eval_cached_count_v0.34.0.json",
        counts: Counts | None = None,
        ps: str = "ps_spilled_mistral_7b_v0.11.6.json",
        spilled: bool = False,
        context_length: int | None = 16384,
        content: str | None = None,
        oom_above: int | None = 1_000_000,
        kv_bytes_per_token: int | None = None,
        chat_seconds: float = 0.0,
    ) -> None:
        self.model = model
        self.chat_seconds = chat_seconds
        """How long each `/api/chat` reply holds the (one) model, chats one at a time: a test
        double's pace, for a test whose outcome must not depend on this machine's speed."""
        self._model_lock = threading.Lock()
        self.version = version
        self.chat_body = recorded(chat)
        self.counts = counts
        self.ps_body = recorded(ps)
        entry = self.ps_body["models"][0]
        entry["name"] = entry["model"] = model  # the recorded entry, renamed to our model
        if not spilled:
            entry["size_vram"] = entry["size"]  # the recorded body spilled; this one does not
        if context_length is None:
            entry.pop("context_length", None)
        else:
            entry["context_length"] = context_length
        self.show_body = recorded("show_gemma3_1b.json")
        self.content = content
        self.oom_above = oom_above
        self.kv_bytes_per_token = kv_bytes_per_token
        self.base_size = int(self.ps_body["models"][0]["size"])
        self.num_ctx = context_length or 4096
        """The num_ctx of the last load (Ollama's default until a request asks another)."""
        """A chat asking a larger num_ctx gets the recorded out-of-memory reply (Easy-RAG#9)."""
        """Reply text to put in `message.content` (None: the recorded one)."""
        self.requests: list[tuple[str, str, Any]] = []
        self.loaded = True
        """Whether the model is loaded (`/api/ps` lists it): keep_alive 0 or a restart unloads
        it, the next chat or generate loads it."""
        self.down_s = 1.0
        self.down_until = 0.0
        """`POST /_replay/restart` drops every connection until then (monotonic s)."""
        self.generates: list[Any] = []
        """The bodies of `/api/generate` requests that asked for log-probabilities."""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def chats(self) -> list[Any]:
        return [body for method, path, body in self.requests if path == "/api/chat"]

    def reply(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("GET", "/api/version"):
            # A replay says what it is (real Ollama answers only `version`): the harness records
            # it, and the verdict never takes its figures for a measurement.
            return 200, {"version": self.version, "replay": MARKER}
        if (method, path) == ("POST", "/_replay/restart"):
            # As a restart does: the loaded model is gone, and for `down_s` every connection is
            # dropped unanswered.
            self.down_until = time.monotonic() + self.down_s
            self.loaded = False
            return 200, {"restarted": True}
        if (method, path) == ("POST", "/api/show"):
            if isinstance(body, dict) and body.get("model") != self.model:
                return 404, {"error": f"model '{body.get('model')}' not found"}
            return 200, self.show_body
        if (method, path) == ("GET", "/api/ps"):
            if not self.loaded:
                return 200, {"models": []}
            if self.kv_bytes_per_token is not None:
                entry = self.ps_body["models"][0]
                entry["size"] = self.base_size + self.kv_bytes_per_token * self.num_ctx
                entry["size_vram"] = entry["size"]
                entry["context_length"] = self.num_ctx
            return 200, self.ps_body
        if (method, path) == ("POST", "/api/generate"):
            if isinstance(body, dict) and body.get("logprobs"):
                # `--score-mode logprobs`: a raw prompt that ends in the reply's start; the
                # derived bodies (SOURCES.md) answer the value's first token, and the token after
                # `1` (10's `0` or the closing `}`).
                self.generates.append(body)
                prompt = str(body.get("prompt", ""))
                name = (
                    "derived_generate_raw_logprobs_after_1.json"
                    if prompt.endswith(": 1")
                    else "derived_generate_raw_logprobs_value.json"
                )
                out = recorded(name)
                out["model"] = self.model
                if self.counts is not None:
                    for key, value in self.counts(body).items():
                        if value is not None:
                            out[key] = value
                return 200, out
            # keep_alive 0 unloads the model (Ollama's documented way); anything else loads it.
            self.loaded = not (isinstance(body, dict) and body.get("keep_alive") in (0, "0"))
            reason = "load" if self.loaded else "unload"
            return 200, {"model": self.model, "response": "", "done": True, "done_reason": reason}
        if (method, path) == ("POST", "/api/chat"):
            if self.chat_seconds > 0:
                with self._model_lock:
                    time.sleep(self.chat_seconds)
            num_ctx = ((body or {}).get("options") or {}).get("num_ctx") or 0
            if self.oom_above is not None and num_ctx > self.oom_above:
                return 500, recorded("error_500_requires_more_system_memory.json")
            if num_ctx:
                self.num_ctx = num_ctx
            self.loaded = True
            out = copy.deepcopy(self.chat_body)
            out["model"] = self.model
            if self.content is not None:
                out["message"]["content"] = self.content
            if self.counts is not None:
                for key, value in self.counts(body).items():
                    if value is None:
                        out.pop(key, None)
                    else:
                        out[key] = value
            return 200, out
        return 404, recorded("error_404_plain.txt")

    def __enter__(self) -> OllamaReplay:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                if time.monotonic() < replay.down_until:
                    self.close_connection = True  # "restarting": no answer on this connection
                    return
                replay.requests.append((self.command, self.path, body))
                status, reply = replay.reply(self.command, self.path, body)
                data = (json.dumps(reply) if not isinstance(reply, str) else reply).encode()
                self.send_response(status)
                kind = "text/plain" if isinstance(reply, str) else "application/json"
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Harness-Replay", MARKER)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def counting(tokenizer_url: str, *, new_tokens: int = 40) -> Counts:
    """Token counts of each chat as a server would report them (see the module docstring)."""
    import httpx

    from harness.models.templates import get_format

    gemma = get_format("gemma")

    def counts(body: Mapping[str, Any]) -> Mapping[str, Any]:
        # /api/chat renders its messages; a raw /api/generate prompt is the text itself.
        text = body["prompt"] if "prompt" in body else gemma.render_text(body["messages"])
        reply = httpx.post(
            f"{tokenizer_url}/tokenize",
            json={"content": text, "add_special": True, "parse_special": True},
            timeout=60,
        )
        n = len(reply.json()["tokens"])
        return {"prompt_eval_count": n, "prompt_eval_cached_count": max(0, n - new_tokens)}

    return counts
