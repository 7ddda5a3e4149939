"""Request strategies and the trim policy.

- `stateless`: each request is the shared system prompt plus one candidate; the server's prefix
  cache alone saves the rubric's tokens. Flat memory, no trims.
- `conversation`: the conversation batching of the original design. Requests that share a system
  prompt go as one rolling conversation (system, candidate 1, answer 1, ..., candidate k), so the
  prefix cache makes only the new turn cost. The `TrimPolicy` restarts the conversation from the
  system prompt (optionally keeping the last K exchanges) when its tokens would pass
  `trim_threshold`, or every `trim_interval` requests, whichever comes first.

Both strategies refuse to send a request longer than `max_context_tokens` (prompt tokens plus
room for the reply): such a request is the row's error (`Plan.refused`), never sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from harness.engine.tokens import TokenCounter, TokenSeq
from harness.errors import ConfigError, ContextOverflow
from harness.workload import WorkItem

__all__ = [
    "SAFE_FRACTION",
    "STRATEGIES",
    "Conversation",
    "ConversationStrategy",
    "Plan",
    "StatelessStrategy",
    "Strategy",
    "TrimPolicy",
    "make_strategy",
]

Message = Mapping[str, str]
SAFE_FRACTION = 0.8
"""The trim threshold's share of the context cap when nothing else sets it (the roadmap's 80%),
and the margin `harness doctor` and phase 1 keep below a context: the one place it is written."""


@dataclass(frozen=True, slots=True)
class TrimPolicy:
    """When a rolling conversation restarts, and the hard cap on any request."""

    max_context_tokens: int = 8192
    """No request is sent whose prompt plus reply room exceeds this (MAX_CONTEXT_TOKENS)."""
    trim_threshold: int | None = None
    """Restart before a conversation would pass this many tokens (CONTEXT_TRIM_THRESHOLD);
    None: `SAFE_FRACTION` (80%) of max_context_tokens."""
    trim_interval: int | None = None
    """Restart after this many requests in one conversation (TRIM_INTERVAL); None: never."""
    keep_last: int = 0
    """Exchanges kept when a conversation restarts."""

    @property
    def threshold(self) -> int:
        if self.trim_threshold is not None:
            return self.trim_threshold
        return int(self.max_context_tokens * SAFE_FRACTION)

    def validate(self) -> None:
        if self.max_context_tokens < 1:
            raise ConfigError(f"MAX_CONTEXT_TOKENS = {self.max_context_tokens} must be positive")
        if not 0 < self.threshold <= self.max_context_tokens:
            raise ConfigError(
                f"CONTEXT_TRIM_THRESHOLD = {self.threshold} must be between 1 and "
                f"MAX_CONTEXT_TOKENS = {self.max_context_tokens}"
            )
        if self.trim_interval is not None and self.trim_interval < 1:
            raise ConfigError(f"TRIM_INTERVAL = {self.trim_interval} must be at least 1")
        if self.keep_last < 0:
            raise ConfigError(f"keep_last = {self.keep_last} must not be negative")

    def decide(self, *, requests_in_conversation: int, needed_tokens: int) -> str | None:
        """Why the conversation must restart before the next request, or None."""
        if self.trim_interval is not None and requests_in_conversation >= self.trim_interval:
            return "interval"
        if needed_tokens > self.threshold:
            return "threshold"
        return None


@dataclass(slots=True)
class Conversation:
    """A worker's rolling conversation (the stateless strategy keeps only `last_ids`)."""

    prefix: tuple[Message, ...] = ()
    exchanges: list[tuple[tuple[Message, ...], Message]] = field(default_factory=list)
    requests: int = 0
    """Requests sent since the conversation (re)started."""
    trims: int = 0

    def messages(self, turn: tuple[Message, ...]) -> list[Message]:
        out: list[Message] = list(self.prefix)
        for user_msgs, reply in self.exchanges:
            out.extend(user_msgs)
            out.append(reply)
        out.extend(turn)
        return out


@dataclass(slots=True)
class Plan:
    """What a worker will send next."""

    messages: list[Message]
    prompt_ids: TokenSeq
    trim: str | None = None
    """Why the conversation restarted before this request (`interval`, `threshold`,
    `overflow`), or None."""
    refused: ContextOverflow | None = None
    """Set when the request cannot fit even alone: it is the row's error and is not sent."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _needed(ids: TokenSeq, item: WorkItem) -> int:
    return len(ids) + (item.max_tokens or 0)


class Strategy(ABC):
    """How work items become requests."""

    name: ClassVar[str] = ""

    def __init__(self, policy: TrimPolicy | None = None) -> None:
        self.policy = policy or TrimPolicy()
        self.policy.validate()

    def _refusal(self, ids: TokenSeq, item: WorkItem) -> ContextOverflow | None:
        needed = _needed(ids, item)
        if needed <= self.policy.max_context_tokens:
            return None
        return ContextOverflow(
            f"request {item.custom_id!r} needs {needed} tokens ({len(ids)} prompt + "
            f"{item.max_tokens or 0} reply), more than MAX_CONTEXT_TOKENS = "
            f"{self.policy.max_context_tokens}; it was not sent",
            prompt_tokens=len(ids),
            n_ctx=self.policy.max_context_tokens,
        )

    @abstractmethod
    async def plan(
        self, conv: Conversation, item: WorkItem, counter: TokenCounter, *, force_trim: bool = False
    ) -> Plan:
        """The messages to send for `item` (`Plan.refused` when it cannot fit)."""

    def commit(self, conv: Conversation, item: WorkItem, plan: Plan, reply: str) -> None:  # noqa: B027
        """Record a successful reply (the stateless strategy keeps nothing)."""


class StatelessStrategy(Strategy):
    """System prompt + one candidate per request; the server's prefix cache does the rest."""

    name = "stateless"

    async def plan(
        self, conv: Conversation, item: WorkItem, counter: TokenCounter, *, force_trim: bool = False
    ) -> Plan:
        messages = list(item.messages)
        ids = await counter.count(messages)
        return Plan(messages, ids, refused=self._refusal(ids, item))


class ConversationStrategy(Strategy):
    """One rolling conversation per worker, restarted by the trim policy."""

    name = "conversation"

    async def plan(
        self, conv: Conversation, item: WorkItem, counter: TokenCounter, *, force_trim: bool = False
    ) -> Plan:
        turn = item.turn
        if conv.prefix != item.prefix:
            # A different shared prefix starts a new conversation; not a trim.
            conv.prefix, conv.exchanges, conv.requests = item.prefix, [], 0
        reason: str | None = "overflow" if force_trim and conv.exchanges else None
        messages = conv.messages(turn)
        ids = await counter.count(messages)
        if reason is None and conv.requests:
            reason = self.policy.decide(
                requests_in_conversation=conv.requests, needed_tokens=_needed(ids, item)
            )
        if reason is not None:
            keep = self.policy.keep_last if reason != "overflow" else 0
            conv.exchanges = conv.exchanges[-keep:] if keep else []
            conv.requests = 0
            conv.trims += 1
            messages = conv.messages(turn)
            ids = await counter.count(messages)
            if conv.exchanges and _needed(ids, item) > self.policy.threshold:
                conv.exchanges = []
                messages = conv.messages(turn)
                ids = await counter.count(messages)
        return Plan(messages, ids, reason, self._refusal(ids, item))

    def commit(self, conv: Conversation, item: WorkItem, plan: Plan, reply: str) -> None:
        conv.exchanges.append((item.turn, {"role": "assistant", "content": reply}))
        conv.requests += 1


STRATEGIES: dict[str, type[Strategy]] = {
    StatelessStrategy.name: StatelessStrategy,
    ConversationStrategy.name: ConversationStrategy,
}


def make_strategy(name: str, policy: TrimPolicy | None = None) -> Strategy:
    """The strategy called `name` (`stateless` or `conversation`)."""
    try:
        return STRATEGIES[name](policy)
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        ) from None
