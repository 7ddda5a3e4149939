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
    """Token ids of chat prompts, from a cache of text pieces tokenized ahead of time."""

    def __init__(
        self,
        chat_format: ChatFormat,
        tokenize: TokenizeBatch,
        *,
        source: str,
        cache_size: int = 4096,
    ) -> None:
        self.chat_format = chat_format
        self._tokenize = tokenize
        self.source = source
        self.cache_size = cache_size
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._special: dict[str, int] = {}
        self._special_ids: dict[str, array[int]] = {}
        self._pinned: dict[str, array[int]] = {}
        self.calls = 0

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

    def _text_pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[str]:
        return [p for p in self._pieces(messages, add_generation_prompt) if isinstance(p, str)]

    async def prepare(
        self, conversations: Iterable[Sequence[Message]], *, add_generation_prompt: bool = True
    ) -> None:
        """Tokenize every text piece of these prompts that is not cached yet, in one call.

        A piece that occurs in several of the prompts (the shared rubric) is pinned, so a long
        run of new candidates can never push it out of the cache.
        """
        await self._load_specials()
        missing: list[str] = []
        seen: dict[str, int] = {}
        for messages in conversations:
            for text in self._text_pieces(messages, add_generation_prompt):
                count = seen.get(text)
                if count is None:
                    seen[text] = 1
                    if self._lookup(text) is None:
                        missing.append(text)
                else:
                    seen[text] = count + 1
        await self.add_texts(missing)
        for text, count in seen.items():
            if count > 1 and text not in self._pinned:
                self.pin(text)

    async def add_texts(self, texts: Sequence[str]) -> None:
        """Tokenize and cache plain-text pieces (no special tokens are parsed inside them)."""
        if not texts:
            return
        await self._load_specials()
        results = await self._tokenize(list(texts), False)
        self.calls += 1
        for text, tok in zip(texts, results, strict=True):
            self._store(text, tok if isinstance(tok, array) else array("i", tok))

    def pin(self, text: str) -> None:
        """Keep a piece (e.g. the rubric) out of LRU eviction (the 64 most recent pins)."""
        ids = self._lookup(text)
        if ids is not None:
            self._pinned[text] = ids
            if len(self._pinned) > 64:
                del self._pinned[next(iter(self._pinned))]

    def _store(self, text: str, ids: array[int]) -> None:
        self._cache[text] = ids
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _lookup(self, text: str) -> array[int] | None:
        ids = self._pinned.get(text)
        if ids is not None:
            return ids
        ids = self._cache.get(text)
        if ids is not None:
            self._cache.move_to_end(text)
        return ids

    # -- counting --------------------------------------------------------------------------

    def ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> TokenSeq:
        """Token ids of the rendered prompt. Its pieces must have been prepared."""
        out: list[array[int]] = []
        specials = self._special_ids
        for piece in self._pieces(messages, add_generation_prompt):
            if isinstance(piece, Special):
                out.append(specials[piece.text])
            else:
                ids = self._lookup(piece)
                if ids is None:
                    raise KeyError(f"piece not tokenized yet: {piece[:40]!r}...")
                out.append(ids)
        return TokenSeq(out)

    async def count(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> TokenSeq:
        """Token ids of the prompt, tokenizing what is missing first."""
        try:
            return self.ids(messages, add_generation_prompt=add_generation_prompt)
        except KeyError:
            await self.prepare([messages], add_generation_prompt=add_generation_prompt)
            return self.ids(messages, add_generation_prompt=add_generation_prompt)

    async def text_ids(self, text: str) -> array[int]:
        """Token ids of a plain text (e.g. a reply), cached."""
        ids = self._lookup(text)
        if ids is None:
            await self.add_texts([text])
            ids = self._lookup(text)
        assert ids is not None
        return ids


def estimate_tokenize() -> TokenizeBatch:
    """A tokenizer of last resort: one pseudo-token per 4 characters (reports say `estimate`)."""

    async def tokenize(texts: list[str], parse_special: bool = False) -> Sequence[Sequence[int]]:
        return [[hash(t[i : i + 4]) & 0x7FFFFFFF for i in range(0, len(t), 4)] for t in texts]

    return tokenize
