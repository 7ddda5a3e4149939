"""`--score-mode logprobs` in the engine: a row's probe requests, and its score read back.

The maths (the reply's fixed shape, the values' token tree, the distribution) is
`harness.scoring`; this module ties it to a backend and a token counter. For each output schema
(work items share one object) the tree is built once, with the counter's tokenizer, the one the
engine counts prompts with: the server's own, or Gemma 3's packaged one for Ollama.

A row's requests (`probe_requests`): one per node of the tree where the values' tokens part
(right after the prefill, and after `1` for 1..10 on Gemma), each the row's prompt with the
prefill and the node's path, generating one token with its top log-probabilities. No grammar is
sent: the harness reads, at each node, the most probable of the tokens the schema allows, which
is the token a grammar-bound greedy sampler would pick, so a grammar on the server would change
nothing read and cost sampler time.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from harness.backends.base import Backend, ChatRequest
from harness.engine.tokens import TokenCounter, TokenSeq
from harness.scoring import TOP_N, ValueShape, ValueTree, build_tree, value_shape

__all__ = ["LogprobScorer", "logprobs_unavailable", "probe_requests"]


def logprobs_unavailable(backend: Backend, counter_source: str | None) -> str | None:
    """Why this server cannot score in logprobs mode (one line), or None when it can."""
    info = backend.info
    if not info.supports_prefill:
        return (
            f"{info.backend} at {info.base_url} does not continue a started reply with "
            "log-probabilities (llama.cpp and Ollama ≥ 0.12.11 do)"
        )
    if counter_source == "estimate":
        return (
            "no tokenizer for this model (token counts are estimates): the values' tokens are "
            "unknown"
        )
    return None


def probe_requests(base: ChatRequest, tree: ValueTree, prompt_ids: TokenSeq) -> list[ChatRequest]:
    """The row's requests: one per probe node (the row's prompt, the prefill, the node's
    path), each one token long with its top log-probabilities."""
    shape = tree.shape
    out = []
    for node in tree.probes:
        ids = prompt_ids.extended(array("i", (*tree.prefill_ids, *node.path)))
        out.append(
            replace(
                base,
                prefill=shape.prefill + (node.text or ""),
                top_logprobs=TOP_N,
                max_tokens=1,
                output_schema=None,
                grammar=None,
                prompt_ids=ids,
            )
        )
    return out


class LogprobScorer:
    """Trees of the output schemas met so far, built with one token counter."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self._trees: dict[int, tuple[Mapping[str, Any], ValueTree | str]] = {}

    async def tree_for(self, schema: Mapping[str, Any] | None) -> ValueTree | str:
        """The schema's value tree, or why its replies are decoded instead."""
        if schema is None:
            return "no output schema (free-text replies)"
        hit = self._trees.get(id(schema))
        if hit is not None and hit[0] is schema:
            return hit[1]
        shape = value_shape(schema)
        tree: ValueTree | str = (
            shape if isinstance(shape, str) else await build_tree(shape, self._tokenize)
        )
        self._trees[id(schema)] = (schema, tree)
        return tree

    async def _tokenize(self, texts: list[str]) -> Sequence[Sequence[int]]:
        return await self.counter.texts_ids(texts)


def describe(tree: ValueTree | str | ValueShape) -> str:
    """One line for the banner: what logprobs mode reads, or why it falls back."""
    if isinstance(tree, str):
        return tree
    if isinstance(tree, ValueShape):
        return f"{tree.field}: {len(tree.values)} values"
    where = ", ".join(repr(tree.shape.prefill + (n.text or "")) for n in tree.probes)
    return (
        f"{tree.shape.field!r} over {len(tree.shape.values)} values, read where their tokens "
        f"part: after {where}"
    )
