"""Exact prompt token counts before a request is sent, cheaply.

A prompt is a sequence of special tokens and text pieces (see `harness.models.templates`), and
llama.cpp tokenizes each text piece on its own. So the tokens of a prompt are the tokens of its
pieces, concatenated; the piece holding the shared rubric is tokenized once and cached, and each
new candidate costs one short tokenization of its own piece, ahead of time, with special-token
parsing off (on Gemma's vocabulary, llama.cpp's scan for its ~6,000 special tokens costs ~7 us
per character, three times the tokenization itself; pieces never hold specials anyway).

Where the tokens come from is recorded in `TokenCounter.source`:
- `server`: the server's own `/tokenize` (llama.cpp);
- `packaged-gemma3`: the Gemma 3 tokenizer of the packaged model, run in a small local llama.cpp
  server (for Ollama, which has no tokenize endpoint; same vocabulary as Gemma 3 12B);
- `estimate`: 4 characters per token, when nothing better exists (reports say so).
"""

from __future__ import annotations

import itertools
import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from harness.models.templates import ChatFormat, Special

__all__ = ["TokenCounter", "TokenSeq", "common_prefix_len"]

TokenizeBatch = Callable[[list[str], bool], Awaitable[Sequence[Sequence[int]]]]
"""`tokenize(texts, parse_special)`: token ids of each text."""
Message = Mapping[str, str]


class TokenSeq:
    """A prompt's token ids as a list of cached segments, never copied into one array.

    Prompts share their big segments (the rubric's ids are one array object in every prompt),
    so the length is a sum and the common prefix of two prompts skips shared segments by
    identity; only the first differing segment is compared token by token.
    """

    __slots__ = ("length", "segments")

    def __init__(self, segments: Sequence[array[int]]) -> None:
        self.segments = tuple(segments)
        self.length = sum(map(len, self.segments))

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self.segments)

    def extended(self, more: array[int]) -> TokenSeq:
        """This sequence followed by `more` (e.g. the generated tokens)."""
        return TokenSeq((*self.segments, more))


def _prefix_len(a: array[int], oa: int, b: array[int], ob: int, n: int) -> int:
    va = np.frombuffer(a, dtype=np.int32, count=n, offset=4 * oa)
    vb = np.frombuffer(b, dtype=np.int32, count=n, offset=4 * ob)
    differ = va != vb
    first = int(differ.argmax())
    return first if differ[first] else n


def common_prefix_len(a: TokenSeq | array[int], b: TokenSeq | array[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    sa = a.segments if isinstance(a, TokenSeq) else (a,)
    sb = b.segments if isinstance(b, TokenSeq) else (b,)
    i = j = oa = ob = total = 0
    while i < len(sa) and j < len(sb):
        x, y = sa[i], sb[j]
        if oa == 0 and ob == 0 and x is y:
            total += len(x)
            i += 1
            j += 1
            continue
        n = min(len(x) - oa, len(y) - ob)
        if n:
            k = _prefix_len(x, oa, y, ob, n)
            total += k
            if k < n:
                return total
            oa += n
            ob += n
        if oa == len(x):
            i, oa = i + 1, 0
        if ob == len(y):
            j, ob = j + 1, 0
    return total


class TokenCounter:
    """Token ids of chat prompts, from a cache of text pieces tokenized ahead of time.

    Two tables hold pieces: a pin table for pieces that many prompts share (the rubric), and an
    LRU for the rest. Both refresh on every use, so the rubric, used by every request, is never
    the one dropped; a piece dropped from the pin table goes back to the LRU. Whatever either
    table drops, `count()` builds each prompt from the ids it looked up or tokenized in the same
    call, so it always returns the prompt's ids (a piece it needs is never looked up twice).

    Both tables are bounded, and `held_bytes()` says what they hold now, so a memory watch can
    tell the tables filling up to their bound from a leak.
    """

    def __init__(
        self,
        chat_format: ChatFormat,
        tokenize: TokenizeBatch,
        *,
        source: str,
        cache_size: int = 4096,
        pin_cap: int = 64,
    ) -> None:
        self.chat_format = chat_format
        self._tokenize = tokenize
        self.source = source
        self.cache_size = cache_size
        self.pin_cap = pin_cap
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._special: dict[str, int] = {}
        self._special_ids: dict[str, array[int]] = {}
        self._pinned: OrderedDict[str, array[int]] = OrderedDict()
        self._entry_bytes = 0
        """`sys.getsizeof` of every key and value the two tables hold, kept as they change."""
        self.calls = 0

    def held_bytes(self) -> int:
        """Bytes the two tables hold now, as the interpreter sizes them (`sys.getsizeof` of
        each piece, its ids and both tables). A lower bound on what they cost the process (the
        allocator rounds up), so a watch that subtracts it still sees the rest of any growth."""
        return self._entry_bytes + sys.getsizeof(self._cache) + sys.getsizeof(self._pinned)

    # -- filling the cache -----------------------------------------------------------------

    async def _load_specials(self) -> None:
        if self._special:
            return
        names = list(self.chat_format.specials)
        ids = await self._tokenize(names, True)
        self.calls += 1
        for i, (name, tok) in enumerate(zip(names, ids, strict=True)):
            # A tokenizer that does not know the special (the estimate) gets a stand-in id.
            self._special[name] = tok[0] if len(tok) == 1 else -(i + 1)
            self._special_ids[name] = array("i", [self._special[name]])

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Any]:
        return self.chat_format.render_pieces(messages, add_generation_prompt=add_generation_prompt)

    async def prepare(
        self, conversations: Iterable[Sequence[Message]], *, add_generation_prompt: bool = True
    ) -> None:
        """Tokenize every text piece of these prompts that is not cached yet, in one call.

        A piece that occurs in several of the prompts (the shared rubric) is pinned, so a long
        run of new candidates cannot push it out of the cache. A piece repeated inside one
        prompt (a reply the model gave twice) is not: it is shared by nothing else.
        """
        await self._load_specials()
        missing: list[str] = []
        prompts_with: dict[str, int] = {}
        for messages in conversations:
            texts = {p for p in self._pieces(messages, add_generation_prompt) if isinstance(p, str)}
            for text in texts:
                count = prompts_with.get(text)
                if count is None:
                    prompts_with[text] = 1
                    if self._lookup(text) is None:
                        missing.append(text)
                else:
                    prompts_with[text] = count + 1
        await self._add(missing)
        for text, count in prompts_with.items():
            if count > 1:
                self.pin(text)

    async def _add(self, texts: Sequence[str]) -> dict[str, array[int]]:
        """Tokenize plain-text pieces (no special tokens parsed inside), cache them, and return
        them (the caller uses what this returns, not the cache, which may drop them at once)."""
        if not texts:
            return {}
        results = await self._tokenize(list(texts), False)
        self.calls += 1
        out: dict[str, array[int]] = {}
        for text, tok in zip(texts, results, strict=True):
            ids = tok if isinstance(tok, array) else array("i", tok)
            out[text] = ids
            self._store(text, ids)
        return out

    def pin(self, text: str) -> None:
        """Keep a cached piece (e.g. the rubric) out of the LRU's eviction, among the
        `pin_cap` most recently used pins; the least recently used pin goes back to the LRU."""
        ids = self._cache.pop(text, None)
        if ids is None:
            ids = self._pinned.get(text)
            if ids is None:
                return
        else:
            self._entry_bytes -= _sizeof(text, ids)
        if text not in self._pinned:
            self._entry_bytes += _sizeof(text, ids)
        self._pinned[text] = ids
        self._pinned.move_to_end(text)
        while len(self._pinned) > self.pin_cap:
            old, old_ids = self._pinned.popitem(last=False)
            self._entry_bytes -= _sizeof(old, old_ids)
            self._store(old, old_ids)

    def _store(self, text: str, ids: array[int]) -> None:
        if text in self._pinned:
            return
        before = self._cache.get(text)
        if before is not None:
            self._entry_bytes -= _sizeof(text, before)
        self._cache[text] = ids
        self._entry_bytes += _sizeof(text, ids)
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            old, old_ids = self._cache.popitem(last=False)
            self._entry_bytes -= _sizeof(old, old_ids)

    def _lookup(self, text: str) -> array[int] | None:
        ids = self._pinned.get(text)
        if ids is not None:
            self._pinned.move_to_end(text)
            return ids
        ids = self._cache.get(text)
        if ids is not None:
            self._cache.move_to_end(text)
        return ids

    # -- counting --------------------------------------------------------------------------

    async def count(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> TokenSeq:
        """Token ids of the rendered prompt, tokenizing the pieces not cached first."""
        if not self._special:
            await self._load_specials()
        specials = self._special_ids
        out: list[array[int]] = []
        missing: list[tuple[int, str]] = []
        for piece in self._pieces(messages, add_generation_prompt):
            if isinstance(piece, Special):
                out.append(specials[piece.text])
                continue
            ids = self._lookup(piece)
            if ids is None:
                missing.append((len(out), piece))
                ids = _EMPTY
            out.append(ids)
        if missing:
            got = await self._add(list(dict.fromkeys(text for _, text in missing)))
            for at, text in missing:
                out[at] = got[text]
        return TokenSeq(out)

    async def texts_ids(self, texts: Sequence[str]) -> list[array[int]]:
        """Token ids of plain texts (no BOS, specials not parsed), the uncached ones in one
        call."""
        found = {t: self._lookup(t) for t in texts}
        got = await self._add([t for t, ids in found.items() if ids is None])
        out: list[array[int]] = []
        for t in texts:
            ids = found[t]
            out.append(ids if ids is not None else got[t])
        return out

    async def text_ids(self, text: str) -> array[int]:
        """Token ids of a plain text (e.g. a reply), cached."""
        ids = self._lookup(text)
        if ids is None:
            ids = (await self._add([text]))[text]
        return ids


_EMPTY: array[int] = array("i")


def _sizeof(text: str, ids: array[int]) -> int:
    return sys.getsizeof(text) + sys.getsizeof(ids)


def estimate_tokenize() -> TokenizeBatch:
    """A tokenizer of last resort: one pseudo-token per 4 characters (reports say `estimate`)."""

    async def tokenize(texts: list[str], parse_special: bool = False) -> Sequence[Sequence[int]]:
        return [[hash(t[i : i + 4]) & 0x7FFFFFFF for i in range(0, len(t), 4)] for t in texts]

    return tokenize
