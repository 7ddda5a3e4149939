"""Every backend's reply as an OpenAI `chat.completion` body: the one mapping.

`harness run`'s results lines and `harness api`'s output files hold, as `response.body`, the
body OpenAI's Batch API would: `id`, `object: chat.completion`, `created`, `model`,
`choices[0].message` (`role`, `content`), `choices[0].finish_reason`, and `usage`
(`prompt_tokens`, `completion_tokens`, `total_tokens`, and `prompt_tokens_details.cached_tokens`
only where the server reported the cached tokens: omitted, never 0, where it did not). The
official client's users read `body.choices[0].message.content` whatever the backend.

The body is built by the harness from the reply (`ChatResult`: its text, finish reason and
normalised usage, `harness.backends.base`) and from what the server's own body says of itself:

- an OpenAI-shaped reply (any `/v1/chat/completions` server): its `id`, `created` and `model`;
  `usage.completion_tokens_details` when it has them (reasoning tokens);
- Ollama's `/api/chat` body: `model`, `created` from `created_at`, `finish_reason` from
  `done_reason` (as Ollama's own OpenAI layer maps them, `openai/openai.go` `ToChatCompletion`),
  `message.reasoning` from `message.thinking`; Ollama gives no id, so the harness makes one;
- llama.cpp's `/completion` body (the `text` and `tokens` request paths): the harness makes the
  id and `created` (the time it got the reply), as it does for any reply without them.

Per-token log-probabilities (`--score-mode logprobs`) go to `choices[0].logprobs.content`: an
OpenAI reply's own, llama.cpp's `completion_probabilities` and Ollama's `logprobs` (entries of
the same shape: token, logprob, top_logprobs). A cached count the server left out and the
harness counts as 0 (`Usage.cached_omitted`) is not the server's report: it is left out here.

`model` is the reply's own name for its model, except where llama.cpp names it by the file it
loaded (`/root/.cache/.../tiny-gemma3-....gguf`: a path on the server, no model name): then the
name the harness serves it under (`ServerInfo.model`), as the batch and `harness run` name it.

The server's own body is never passed off as this one: the results file keeps it beside, under
the harness's own `harness.server_reply` (`records.RequestRecord.to_batch_line`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from harness.backends.base import ChatResult

__all__ = ["chat_completion", "unix_seconds"]


def unix_seconds(stamp: Any) -> int | None:
    """An RFC 3339 time (`2025-08-20T13:47:53.224661Z`, Go's nanoseconds included) in whole
    Unix seconds; None when it is not one."""
    if not isinstance(stamp, str) or "T" not in stamp:
        return None
    text = stamp.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python reads at most 6 fraction digits: drop the rest (Go writes 9)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        return int(datetime.fromisoformat(text).timestamp())
    except ValueError:
        return None


def _own(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) and value else None


def _model(raw: Mapping[str, Any], served: str) -> str:
    own = _own(raw, "model", str)
    return served if not own or (own.endswith(".gguf") and served) else str(own)


def chat_completion(result: ChatResult, *, model: str = "") -> dict[str, Any]:
    """The reply as an OpenAI `chat.completion` body (see the module docstring); `model`: the
    served model's name, for a reply that does not name it."""
    raw: Mapping[str, Any] = result.raw if isinstance(result.raw, Mapping) else {}
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    created: int | None = None
    completion_details: Any = None
    logprobs: Any = None
    if isinstance(raw.get("choices"), list):  # an OpenAI-shaped reply
        created = _own(raw, "created", int)
        first = raw["choices"][0] if raw["choices"] else None
        if isinstance(first, Mapping) and isinstance(first.get("logprobs"), Mapping):
            logprobs = dict(first["logprobs"])
        usage = raw.get("usage")
        if isinstance(usage, Mapping) and isinstance(
            usage.get("completion_tokens_details"), Mapping
        ):
            completion_details = dict(usage["completion_tokens_details"])
    elif isinstance(raw.get("message"), Mapping):  # Ollama's /api/chat
        created = unix_seconds(raw.get("created_at"))
        said = raw["message"]
        if isinstance(said.get("role"), str) and said["role"]:
            message["role"] = said["role"]
        if isinstance(said.get("thinking"), str) and said["thinking"]:
            message["reasoning"] = said["thinking"]
    if logprobs is None:
        # llama.cpp's /completion (n_probs) and Ollama's (logprobs): per-token entries that
        # already have OpenAI's `logprobs.content` shape (token, logprob, top_logprobs).
        entries = raw.get("completion_probabilities", raw.get("logprobs"))
        if isinstance(entries, list):
            logprobs = {"content": entries}
    u = result.usage
    usage_out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
    if u.cached_tokens is not None and not u.cached_omitted:  # reported, not inferred
        usage_out["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    if completion_details is not None:
        usage_out["completion_tokens_details"] = completion_details
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": result.finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {
        "id": _own(raw, "id", str) or f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": _model(raw, model),
        "choices": [choice],
        "usage": usage_out,
    }
