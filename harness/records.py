"""The per-request record: what the engine measured about one request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RequestRecord"]


@dataclass(slots=True)
class RequestRecord:
    """One finished request, successful or not. Times are Unix seconds; durations in ms."""

    custom_id: str
    status: str
    """`ok` or `error`."""
    content: str | None = None
    """The reply text (also kept for parse failures, as the raw text)."""
    parsed: Mapping[str, Any] | None = None
    """The reply parsed as JSON under the output schema, when one was asked for."""
    error_type: str | None = None
    """Class name of the error (`ContextOverflow`, `ParseError`, ...)."""
    error: str | None = None
    prompt_tokens: int = 0
    """Prompt tokens as the server counted them (the engine's count before sending, on errors)."""
    cached_tokens: int | None = None
    """Prompt tokens the server reused from its prefix cache (None: not reported)."""
    cached_source: str = "unknown"
    cached_omitted: bool = False
    """The server left its cached count out and it is 0 by inference (`Usage.cached_omitted`)."""
    completion_tokens: int = 0
    expected_prompt_tokens: int = 0
    """The engine's own count before sending (checks the server's)."""
    reusable_tokens: int = 0
    """Upper bound on the tokens a prefix cache could have reused for this request."""
    latency_ms: float = 0.0
    """Wall time of the successful attempt, as the client saw it."""
    prompt_ms: float | None = None
    decode_ms: float | None = None
    attempts: int = 0
    trim: str | None = None
    worker: int = 0
    slot: int | None = None
    turn: int = 0
    """Position of the request in its conversation (0: first after a (re)start)."""
    started: float = 0.0
    finished: float = 0.0
    status_code: int | None = None
    raw: Mapping[str, Any] | None = None
    """The server's reply body, as it came (kept in the results line as
    `harness.server_reply`)."""
    completion: Mapping[str, Any] | None = None
    """The reply as an OpenAI `chat.completion` body, built by the harness
    (`harness.backends.completion`): the results line's `response.body`."""
    context_shifted: bool = False
    """The server shifted its context (dropped tokens) to answer: a trim failure."""
    endpoint: str | None = None
    """The server of a pool that answered (or last failed) this request; None for a run on
    one server (its results lines then carry no `endpoint`)."""
    reuse_alarm: Mapping[str, Any] | None = None
    """Set on the request that closed a window of requests whose server stopped reusing the
    shared prefix (harness.engine.reusewatch): the results file keeps the alarm."""
    scoring: Mapping[str, Any] | None = None
    """`--score-mode logprobs`: how the score was read (`harness.scoring.ScoreReading`: score,
    p, expected, the distribution, the top tokens at each node), or why the row was decoded
    instead; None for a row decoded as asked."""
    probe_tokens: int = 0
    """logprobs mode: prompt tokens the row's further probes computed (the values' tokens
    where they part: one forward step each)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_batch_line(self, seq: int) -> dict[str, Any]:
        """An OpenAI Batch output line (`response.body`: the reply as a `chat.completion`),
        plus the harness's own object: its measurements and the server's own reply body
        (`server_reply`), never passed off as the response."""
        response = None
        if self.ok:
            response = {
                "status_code": self.status_code or 200,
                "request_id": f"req_{seq}",
                "body": dict(self.completion) if self.completion is not None else None,
            }
        error = None if self.ok else {"code": self.error_type, "message": self.error}
        harness: dict[str, Any] = {
            "content": self.content,
            "parsed": dict(self.parsed) if self.parsed is not None else None,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "cached_source": self.cached_source,
            "completion_tokens": self.completion_tokens,
            "expected_prompt_tokens": self.expected_prompt_tokens,
            "reusable_tokens": self.reusable_tokens,
            "latency_ms": round(self.latency_ms, 3),
            "prompt_ms": self.prompt_ms,
            "decode_ms": self.decode_ms,
            "attempts": self.attempts,
            "trim": self.trim,
            "context_shifted": self.context_shifted,
            "worker": self.worker,
            "slot": self.slot,
            "turn": self.turn,
            "started": self.started,
            "finished": self.finished,
        }
        if self.cached_omitted:
            harness["cached_omitted"] = True
        if self.endpoint is not None:
            harness["endpoint"] = self.endpoint
        if self.ok:
            harness["server_reply"] = dict(self.raw) if self.raw is not None else None
        if self.reuse_alarm is not None:
            harness["reuse_alarm"] = dict(self.reuse_alarm)
        if self.scoring is not None:
            harness["scoring"] = dict(self.scoring)
            harness["probe_tokens"] = self.probe_tokens
        return {
            "id": f"batch_req_{seq}",
            "custom_id": self.custom_id,
            "response": response,
            "error": error,
            "harness": harness,
        }
