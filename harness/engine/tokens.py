"""Exact prompt token counts before a request is sent, cheaply.

A prompt is a sequence of special tokens and text pieces (see `harness.models.templates`), and
llama.cpp tokenizes each text piece on its own. So the tokens of a prompt are the tokens of its
pieces, concatenated; the piece holding the shared rubric is tokenized once and cached, and each
new candidate costs one short tokenization, batched with others into one `/tokenize` call
(pieces joined by a special token, and the ids split at it).

Where the tokens come from is recorded in `TokenCounter.source`:
- `server`: the server's own `/tokenize` (llama.cpp);
- `packaged-gemma3`: the Gemma 3 tokenizer of the packaged model, run in a small local llama.cpp
  server (for Ollama, which has no tokenize endpoint; same vocabulary as Gemma 3 12B);
- `estimate`: 4 characters per token, when nothing better exists (reports say so).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from harness.models.templates import ChatFormat, Special

__all__ = ["TokenCounter", "common_prefix_len"]

TokenizeBatch = Callable[[list[str]], Awaitable[list[list[int]]]]
Message = Mapping[str, str]


def common_prefix_len(a: array[int], b: array[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    va = np.frombuffer(a, dtype=np.int32, count=n)
    vb = np.frombuffer(b, dtype=np.int32, count=n)
    diff = np.flatnonzero(va != vb)
    return int(diff[0]) if diff.size else n


class TokenCounter:
    """Token ids of chat prompts, from a piece cache filled by batched tokenization."""

    def __init__(
        self,
        chat_format: ChatFormat,
        tokenize: TokenizeBatch,
        *,
        source: str,
        cache_size: int = 4096,
        batch_chars: int = 200_000,
    ) -> None:
        self.chat_format = chat_format
        self._tokenize = tokenize
        self.source = source
        self.cache_size = cache_size
        self.batch_chars = batch_chars
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._special: dict[str, int] = {}
        self._pinned: dict[str, array[int]] = {}
        self.calls = 0

    # -- filling the cache -----------------------------------------------------------------

    async def _load_specials(self) -> None:
        if self._special:
            return
        names = list(self.chat_format.specials)
        ids = await self._tokenize(names)
        self.calls += 1
        for i, (name, tok) in enumerate(zip(names, ids, strict=True)):
            # A tokenizer that does not know the special (the estimate) gets a stand-in id.
            self._special[name] = tok[0] if len(tok) == 1 else -(i + 1)

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[Any]:
        return self.chat_format.render_pieces(messages, add_generation_prompt=add_generation_prompt)

    def _text_pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[str]:
        return [p for p in self._pieces(messages, add_generation_prompt) if isinstance(p, str)]

    async def prepare(
        self, conversations: Iterable[Sequence[Message]], *, add_generation_prompt: bool = True
    ) -> None:
        """Tokenize every text piece of these prompts that is not cached yet, in few calls."""
        await self._load_specials()
        missing: list[str] = []
        seen: set[str] = set()
        for messages in conversations:
            for text in self._text_pieces(messages, add_generation_prompt):
                if text not in seen and self._lookup(text) is None:
                    seen.add(text)
                    missing.append(text)
        await self.add_texts(missing)

    async def add_texts(self, texts: Sequence[str]) -> None:
        """Tokenize and cache `texts` (batched: joined by a separator special token)."""
        await self._load_specials()
        sep = self.chat_format.turn_close
        sep_id = self._special.get(sep)
        batch: list[str] = []
        size = 0
        for text in texts:
            batch.append(text)
            size += len(text)
            if size >= self.batch_chars:
                await self._run_batch(batch, sep, sep_id)
                batch, size = [], 0
        if batch:
            await self._run_batch(batch, sep, sep_id)

    async def _run_batch(self, texts: list[str], sep: str, sep_id: int | None) -> None:
        results: list[list[int]]
        if sep_id is None or sep_id < 0 or len(texts) == 1:
            results = await self._tokenize(texts)
            self.calls += 1
        else:
            joined = (await self._tokenize([sep.join(texts)]))[0]
            self.calls += 1
            results = []
            cur: list[int] = []
            for tok in joined:
                if tok == sep_id:
                    results.append(cur)
                    cur = []
                else:
                    cur.append(tok)
            results.append(cur)
            if len(results) != len(texts):  # a piece held the separator's text after all
                results = await self._tokenize(texts)
                self.calls += 1
        for text, ids in zip(texts, results, strict=True):
            self._store(text, array("i", ids))

    def pin(self, text: str) -> None:
        """Keep a piece (e.g. the rubric) out of LRU eviction."""
        ids = self._lookup(text)
        if ids is not None:
            self._pinned[text] = ids

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

    def ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> array[int]:
        """Token ids of the rendered prompt. Its pieces must have been prepared."""
        out: array[int] = array("i")
        for piece in self._pieces(messages, add_generation_prompt):
            if isinstance(piece, Special):
                out.append(self._special[piece.text])
            else:
                ids = self._lookup(piece)
                if ids is None:
                    raise KeyError(f"piece not tokenized yet: {piece[:40]!r}...")
                out.extend(ids)
        return out

    async def count(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> array[int]:
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

    async def tokenize(texts: list[str]) -> list[list[int]]:
        return [[hash(t[i : i + 4]) & 0x7FFFFFFF for i in range(0, len(t), 4)] for t in texts]

    return tokenize
