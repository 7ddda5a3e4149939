"""How much of the shared rubric a server reuses, by the length of what follows it.

On Gemma's sliding-window layers llama-server keeps only `window + n_ubatch` cells of KV: after
a request whose candidate and reply pass that, the local layers no longer hold the rubric's end,
and the next request reuses the rubric only through a context checkpoint (or recomputes it).
How far reuse falls depends on the request's form (chat messages vs a rendered text prompt,
what Ollama ≥ 0.30 sends), on `num_batch` (= `n_ubatch` under Ollama's flags) and on the
llama.cpp build. This sweep measures it: for each candidate length, a few requests with fresh
candidates of that length after the same rubric, and the cached prompt tokens the server reports.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.backends.base import Backend, ChatRequest
from harness.engine.tokens import TokenCounter

__all__ = ["ReuseRow", "padded_candidate", "reuse_fall", "reuse_sweep"]

_FILLER = (
    "Led the migration of a batch platform to streaming, owned the on-call rotation, mentored "
    "four engineers, wrote the data contracts between teams, and cut the nightly load window "
    "from six hours to forty minutes while keeping the error budget. "
)


def padded_candidate(base: str, n_tokens: int, counter_ratio: float = 5.0) -> str:
    """`base` followed by filler to about `n_tokens` tokens (≈5 characters a token)."""
    want = int(n_tokens * counter_ratio)
    text = base
    while len(text) < want:
        text += " " + _FILLER
    return text[:want]


@dataclass(slots=True)
class ReuseRow:
    """Reuse of the rubric at one candidate length on one request path."""

    path: str
    """How requests reached the server: `chat`, `text` (rendered prompt, Ollama's form),
    `tokens`, or `ollama` (Ollama's own /api/chat)."""
    target_tokens: int
    """The candidate + reply length asked for."""
    candidate_tokens: float
    """Mean prompt tokens after the rubric, measured."""
    rubric_tokens: int
    """Tokens of the shared prefix (BOS, the rubric's turn)."""
    cached: list[int | None] = field(default_factory=list)
    """Cached prompt tokens each request reported, in order (the first follows the previous
    length's requests)."""
    seconds: list[float] = field(default_factory=list)

    @property
    def reused(self) -> int | None:
        """Rubric tokens reused, median of the requests after the first (they follow a request
        of the same length), capped at the rubric."""
        later = [c for c in self.cached[1:] if c is not None] or [
            c for c in self.cached if c is not None
        ]
        if not later:
            return None
        return min(int(statistics.median(later)), self.rubric_tokens)

    @property
    def reused_fraction(self) -> float | None:
        r = self.reused
        return r / self.rubric_tokens if r is not None and self.rubric_tokens else None

    @property
    def rps(self) -> float | None:
        later = self.seconds[1:] or self.seconds
        return len(later) / sum(later) if later and sum(later) > 0 else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(reused=self.reused, reused_fraction=self.reused_fraction, rps=self.rps)
        return out


async def reuse_sweep(
    backend: Backend,
    counter: TokenCounter,
    *,
    rubric: str,
    user_prefix: str,
    lengths: Sequence[int],
    paths: Sequence[str],
    requests: int = 3,
    max_tokens: int = 8,
) -> list[ReuseRow]:
    """Measure rubric reuse by candidate length on each request path (see the module doc).

    For llama.cpp backends `paths` switch the backend's request path on the same server; for
    others pass `["ollama"]` (or the backend's one path). Each path starts with a warm-up
    request so the rubric is cached; each length then sends `requests` fresh candidates.
    """
    system = {"role": "system", "content": rubric}
    rubric_tokens = len(await counter.count([system], add_generation_prompt=False)) + 1
    rows: list[ReuseRow] = []
    serial = 0
    for path in paths:
        if hasattr(backend, "request_path") and path in ("chat", "text", "tokens"):
            backend.request_path = path
        warm = [system, {"role": "user", "content": f"{user_prefix} warm-up {path}"}]
        await backend.chat(
            ChatRequest(warm, max_tokens=1, temperature=0.0, prompt_ids=await counter.count(warm))
        )
        for target in lengths:
            row = ReuseRow(path, target, 0.0, rubric_tokens)
            sizes: list[int] = []
            for _ in range(requests):
                serial += 1
                body = padded_candidate(
                    f"{user_prefix} candidate {serial}: ", max(8, target - max_tokens)
                )
                messages = [system, {"role": "user", "content": body}]
                ids = await counter.count(messages)
                sizes.append(len(ids) - rubric_tokens + max_tokens)
                started = time.perf_counter()
                result = await backend.chat(
                    ChatRequest(
                        messages,
                        max_tokens=max_tokens,
                        temperature=0.0,
                        seed=serial,
                        prompt_ids=ids,
                    )
                )
                row.seconds.append(time.perf_counter() - started)
                row.cached.append(result.usage.cached_tokens)
            row.candidate_tokens = sum(sizes) / len(sizes)
            rows.append(row)
    return rows


def reuse_fall(rows: Sequence[ReuseRow], path: str, *, keep: float = 0.95) -> int | None:
    """The shortest candidate length (tokens after the rubric) on `path` at which less than
    `keep` of the rubric was reused; None when reuse held at every length measured."""
    for row in sorted((r for r in rows if r.path == path), key=lambda r: r.candidate_tokens):
        frac = row.reused_fraction
        if frac is not None and frac < keep:
            return int(row.candidate_tokens)
    return None
