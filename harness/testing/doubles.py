"""Test doubles for logic tests and benchmarks of the engine itself.

`InProcessDouble` is a zero-latency, in-process stand-in for a llama.cpp server: it renders the
prompt with the Gemma layout, tokenizes it with a deterministic word-level tokenizer, keeps a
per-slot prefix cache (reporting cached tokens as the common prefix with what the slot held,
like llama.cpp), enforces a context window, and answers a score derived from the candidate.
It exists to test the engine's logic and to measure the engine's own overhead; **its numbers
are never measurements of a model or a server** (its `ServerInfo.server` says so).
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from harness.backends.base import (
    Backend,
    ChatRequest,
    ChatResult,
    ServerInfo,
    Timings,
    TokenChoice,
    Usage,
)
from harness.engine.tokens import TokenSeq, common_prefix_len
from harness.errors import ContextOverflow
from harness.models.templates import ChatFormat, Special, get_format

__all__ = ["DOUBLE_LABEL", "InProcessDouble", "char_tokenize", "quad_tokenize"]

DOUBLE_LABEL = "in-process test double (its numbers are not measurements)"


@functools.lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


def quad_tokenize(text: str, specials: Sequence[str] = ()) -> array[int]:
    """Deterministic token ids, one per 4 bytes of UTF-8 (about a real tokenizer's rate, and
    computed in C); specials are single tokens."""
    out: array[int] = array("i")
    parts = _specials_pattern(tuple(specials)).split(text) if specials else [text]
    for part in parts:
        if part in specials:
            out.append(-1 - list(specials).index(part))
        elif part:
            raw = part.encode("utf-8")
            out.frombytes(raw + b"\0" * (-len(raw) % 4))
    return out


def char_tokenize(text: str, specials: Sequence[str] = ()) -> array[int]:
    """One token per character (its code point); specials are single tokens. With it the
    double's replies split as a real tokenizer splits digits, one each (`--score-mode
    logprobs` tests)."""
    out: array[int] = array("i")
    parts = _specials_pattern(tuple(specials)).split(text) if specials else [text]
    for part in parts:
        if part in specials:
            out.append(-1 - list(specials).index(part))
        else:
            out.extend(ord(c) for c in part)
    return out


Logprobs = Callable[[ChatRequest, str], list[TokenChoice]]
"""`logprobs(request, intended)`: the top tokens at the next position, given the text the
double would write next."""


def default_logprobs(request: ChatRequest, intended: str) -> list[TokenChoice]:
    """0.6 on the character the double would write, the rest spread over digits, `}` and `,`
    (deterministic, not a model)."""
    others = [c for c in "5432167890}," if c != intended]
    weights = [0.4 * 0.5 ** (k + 1) for k in range(len(others))]
    weights[-1] += 0.4 - sum(weights)
    top = [(intended, 0.6), *zip(others, weights, strict=True)]
    return [TokenChoice(c, math.log(p), ord(c)) for c, p in top][: request.top_logprobs or 1]


class InProcessDouble(Backend):
    """A zero-latency llama.cpp stand-in (see the module docstring)."""

    name = "double"

    def __init__(
        self,
        *,
        n_slots: int = 1,
        n_ctx_per_slot: int = 1_000_000,
        delay_s: float = 0.0,
        chat_format: ChatFormat | None = None,
        fail: Callable[[int, ChatRequest], BaseException | None] | None = None,
        reply: Callable[[ChatRequest], str] | None = None,
        simulate_cache: bool = True,
        tokenizer: Callable[[str, Sequence[str]], array[int]] = quad_tokenize,
        logprobs: Logprobs | None = default_logprobs,
    ) -> None:
        self.chat_format = chat_format or get_format("gemma")
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        """How the double reports top log-probabilities (None: it cannot, as a server that
        does not continue a started reply)."""
        self.delay_s = delay_s
        self.fail = fail
        self.reply = reply
        self.simulate_cache = simulate_cache
        """False: no prompt rendering at all (usage from character counts, cached unknown), so
        a benchmark measures the engine's own dispatch cost and next to nothing else."""
        self.calls = 0
        self.requests: list[tuple[int | None, int]] = []
        """(slot, prompt tokens) of every request that reached the double."""
        self._slots: dict[int, TokenSeq] = {}
        specials = self.chat_format.specials
        self._special_ids = {s: array("i", [-1 - i]) for i, s in enumerate(specials)}
        self._pieces: OrderedDict[str, array[int]] = OrderedDict()
        self.info = ServerInfo(
            backend=self.name,
            base_url="inprocess://double",
            model="double",
            server=DOUBLE_LABEL,
            n_ctx_per_slot=n_ctx_per_slot,
            n_slots=n_slots,
            supports_slots=True,
            supports_tokenize=True,
            supports_prefill=logprobs is not None,
            chat_format=self.chat_format,
        )

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def health(self) -> bool:
        return True

    async def tokenize(
        self, texts: Sequence[str], parse_special: bool = False
    ) -> Sequence[Sequence[int]]:
        specials = self.chat_format.specials if parse_special else ()
        return [self.tokenizer(t, specials) for t in texts]

    def _piece_ids(self, text: str) -> array[int]:
        ids = self._pieces.get(text)
        if ids is None:
            ids = self.tokenizer(text, ())
            self._pieces[text] = ids
            if len(self._pieces) > 4096:
                self._pieces.popitem(last=False)
        return ids

    def prompt_ids(self, messages: Sequence[Any]) -> TokenSeq:
        out: list[array[int]] = []
        for piece in self.chat_format.render_pieces(messages):
            if isinstance(piece, Special):
                out.append(self._special_ids[piece.text])
            else:
                out.append(self._piece_ids(piece))
        return TokenSeq(out)

    def default_reply(self, request: ChatRequest) -> str:
        last = request.messages[-1]["content"] if request.messages else ""
        if request.grammar is not None or request.output_schema is not None:
            return f'{{"score": {1 + zlib.crc32(last.encode()) % 10}}}'
        return "ok " + str(zlib.crc32(last.encode()) % 1000)

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        if self.fail is not None:
            exc = self.fail(self.calls, request)
            if exc is not None:
                raise exc
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not self.simulate_cache:
            content = self.default_reply(request)
            chars = sum(len(m["content"]) for m in request.messages)
            usage = Usage(chars // 4, 4, None, "unknown")
            return ChatResult(content, "stop", usage, Timings(total_ms=0.0), {}, request.slot)
        ids = self.prompt_ids(request.messages)
        if request.prefill:
            ids = ids.extended(self._piece_ids(request.prefill))
        n_ctx = self.info.n_ctx_per_slot or 0
        room = len(ids) + (request.max_tokens or 0)
        if n_ctx and room > n_ctx:
            raise ContextOverflow(
                f"request ({len(ids)} tokens) exceeds the available context size ({n_ctx} tokens)",
                prompt_tokens=len(ids),
                n_ctx=n_ctx,
            )
        slot = request.slot if request.slot is not None else 0
        self.requests.append((request.slot, len(ids)))
        held = self._slots.get(slot)
        cached = 0
        if held is not None and request.cache_prompt:
            cached = min(common_prefix_len(ids, held), len(ids) - 1)
        content = self.reply(request) if self.reply is not None else self.default_reply(request)
        top: list[list[TokenChoice]] | None = None
        if request.prefill is not None:
            # A started reply: the double continues its own reply, if it starts so.
            whole = self.default_reply(replace_schema(request))
            rest = whole[len(request.prefill) :] if whole.startswith(request.prefill) else "}"
            content = rest[: max(1, request.max_tokens or len(rest))] or "}"
            if request.top_logprobs and self.logprobs is not None:
                top = [self.logprobs(request, content[0])]
        completion = self._piece_ids(content)
        if request.max_tokens is not None and len(completion) > request.max_tokens:
            completion = completion[: request.max_tokens]
        self._slots[slot] = ids.extended(completion)
        usage = Usage(len(ids), len(completion), cached, "double")
        raw = {
            "choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(completion)},
        }
        return ChatResult(
            content, "stop", usage, Timings(total_ms=0.0), raw, slot=request.slot, top_logprobs=top
        )


def replace_schema(request: ChatRequest) -> ChatRequest:
    """The request as if it asked for the schema's reply (the double's `{"score": N}`)."""
    from dataclasses import replace

    return replace(request, output_schema={"type": "object"})
