"""Scoring in one forward step: the reply's fixed JSON written ahead, the score read from the
model's probabilities.

A reply under a one-field output schema is `{"score": 7}`: everything but the value is fixed by
the schema, so decoding it token by token spends most of its steps on the wrapper. In `logprobs`
mode the request ends with the fixed text up to the value already written (the *prefill*,
`{"score": `), and the harness reads the model's next-token probabilities there instead of
letting it write.

A value may take several tokens (Gemma writes `10` as `1`, `0`), and values may share their first
tokens. So the allowed values, each followed by the text that closes the reply, are tokenized
and put in a tree of token paths (`ValueTree`). The model is asked for its top log-probabilities
at every node where the paths part (the root, right after the prefill, and for 1..10 on Gemma the
node after `1`, where `0` and the closing `}` part): one prompt per such node (`ValueTree.probes`).
Where a node has a single way on, the grammar of the schema would force it, and the model is not
asked.

From those probabilities (`read_distribution`):

- `p(value)`: the product, over the nodes its path passes where paths part, of the model's
  probability of the path's next token renormalised over the tokens the allowed values may take
  there. This is the distribution grammar-bound sampling of the value draws from. (Renormalising
  once over whole values instead would charge `1` and `10` for the model's wish to write
  something else after `1`, a step no single-token value is asked about.)
- `score`: greedy decoding of the value under the schema's grammar: at each such node the most
  probable allowed token. It is what the `decode` mode writes at temperature 0 when the numerics
  agree; `argmax`, the most probable value, is given beside it and almost always equals it.
- `expected`: the sum of p·value (integer values only).
- `p_outside`: the probability the model, left free, would leave the allowed values at a node
  the harness asked about (product of the raw probabilities along the way).
- `unseen_bound`: the most probability the allowed tokens missing from a node's top list could
  hold (each at most the smallest listed), so a reader knows how much the top-N cut off.

A node where no allowed token is among the top N cannot be read; the row is then decoded instead
(`Unreadable`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCORE_MODES",
    "ScoreReading",
    "TokenChoice",
    "Unreadable",
    "ValueShape",
    "ValueTree",
    "build_tree",
    "mode_of_report",
    "planned_mode",
    "read_distribution",
    "value_shape",
]

SCORE_MODES = ("decode", "logprobs")
"""`decode`: the model writes the reply; `logprobs`: the reply's fixed part is written ahead and
the value read from the model's probabilities."""
MAX_VALUES = 101
"""Integer ranges with more values than this are decoded (the tight grammar's own limit)."""
TOP_N = 20
"""Top log-probabilities asked per node: OpenAI's and Ollama's most (Ollama refuses more)."""


@dataclass(frozen=True, slots=True)
class TokenChoice:
    """One of the most likely tokens at a position, as a server reports it."""

    token: str
    """The token's text."""
    logprob: float
    """Natural log of its probability."""
    id: int | None = None
    """Its id in the model's vocabulary, when the server says (llama.cpp does, Ollama does not)."""


class Unreadable(ValueError):
    """The probabilities do not say which value the model would write (no allowed token among
    the top N at a node)."""


@dataclass(frozen=True, slots=True)
class ValueShape:
    """What a schema fixes of the reply, and the values its first field may take."""

    field: str
    prefill: str
    """The reply's text up to the value: `{"score": `."""
    close: str
    """The text after the value: `}`."""
    values: tuple[tuple[str, Any], ...]
    """Each allowed value as JSON text and as its Python value, in the schema's order."""
    sep: str = ""
    """Text between the prefill and the value that is not sent written: the prefill's trailing
    space, where the tokenizer joins it to the value (`' "'` in BPE vocabularies)."""

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for _, v in self.values)

    def reply(self, text: str) -> str:
        """The whole reply with `text` (an allowed value's JSON) written in."""
        return self.prefill + self.sep + text + self.close


def value_shape(schema: Mapping[str, Any] | None) -> ValueShape | str:
    """The reply's fixed shape under `schema`, or why `logprobs` mode cannot read it (one line).

    Read: an object whose first property is an integer range (minimum..maximum, at most
    `MAX_VALUES` values), a string enum or a boolean, and no other property required (the reply
    the harness completes, `{"score": 7}`, must be valid under the schema). The layout is the
    tight grammar's (`harness.workload.tight_grammar`): no free whitespace."""
    if not schema or schema.get("type") != "object":
        return "the output schema is not a JSON object schema"
    props = schema.get("properties")
    if not isinstance(props, Mapping) or not props:
        return "the output schema has no properties"
    name, spec = next(iter(props.items()))
    required = [str(r) for r in schema.get("required") or []]
    others = [r for r in required if r != name]
    if others:
        return (
            f"the schema requires {', '.join(others)} besides {name!r}: the model must write "
            "those, and logprobs mode reads one value"
        )
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    values: list[tuple[str, Any]]
    if kind == "integer" and "minimum" in spec and "maximum" in spec:
        lo, hi = int(spec["minimum"]), int(spec["maximum"])
        if hi < lo or hi - lo + 1 > MAX_VALUES:
            return f"{name!r} ranges over more than {MAX_VALUES} values"
        values = [(str(v), v) for v in range(lo, hi + 1)]
    elif isinstance(spec, Mapping) and isinstance(spec.get("enum"), list) and spec["enum"]:
        import json

        values = [(json.dumps(v), v) for v in spec["enum"]]
    elif kind == "boolean":
        values = [("true", True), ("false", False)]
    else:
        return f"the first field {name!r} is neither an integer range nor an enum"
    import json

    return ValueShape(str(name), "{" + json.dumps(str(name)) + ": ", "}", tuple(values))


@dataclass(slots=True)
class Node:
    """A token path after the prefill: its children, and its text when known."""

    path: tuple[int, ...]
    text: str | None
    children: dict[int, Node] = field(default_factory=dict)
    value: int | None = None
    """Index of the value whose path ends here (a leaf)."""


Tokenize = Callable[[list[str]], Awaitable[Sequence[Sequence[int]]]]
"""Token ids of each text (no BOS, special tokens not parsed)."""


@dataclass(slots=True)
class ValueTree:
    """The allowed values' token paths after the prefill, as a tree."""

    shape: ValueShape
    prefill_ids: tuple[int, ...]
    root: Node
    probes: list[Node]
    """The nodes where paths part, root first: one prompt each."""

    def node_texts(self) -> list[str]:
        """Each probe's text after the prefill (the root's is empty)."""
        return [n.text or "" for n in self.probes]


async def build_tree(shape: ValueShape, tokenize: Tokenize) -> ValueTree | str:
    """Tokenize the prefill and every complete reply; the tree of the values' paths, or why
    the tokenizer makes the shape unreadable (the value's first token joins the text before it,
    even with the prefill's trailing space left to the model).

    Each node's text is found by tokenizing the reply's prefixes character by character: the
    text whose tokens are exactly the node's path (probes need it to be sent as text)."""
    tree = await _build_tree(shape, tokenize)
    stripped = shape.prefill.rstrip()
    if isinstance(tree, str) and stripped != shape.prefill and not shape.sep:
        gap = shape.prefill[len(stripped) :]
        other = ValueShape(shape.field, stripped, shape.close, shape.values, sep=gap)
        again = await _build_tree(other, tokenize)
        return again if isinstance(again, ValueTree) else tree
    return tree


async def _build_tree(shape: ValueShape, tokenize: Tokenize) -> ValueTree | str:
    fulls = [shape.reply(text) for text, _ in shape.values]
    prefixes = sorted(
        {shape.prefill + full[len(shape.prefill) : k] for full in fulls for k in range(
            len(shape.prefill) + 1, len(full) + 1)}
    )  # fmt: skip
    ids = await tokenize([shape.prefill, *fulls, *prefixes])
    pre = tuple(ids[0])
    paths = [tuple(x) for x in ids[1 : 1 + len(fulls)]]
    by_path: dict[tuple[int, ...], str] = {}
    for text, toks in zip(prefixes, ids[1 + len(fulls) :], strict=True):
        t = tuple(toks)
        if t[: len(pre)] == pre:
            by_path.setdefault(t[len(pre) :], text[len(shape.prefill) :])
    root = Node((), "")
    for k, full in enumerate(paths):
        if full[: len(pre)] != pre or len(full) == len(pre):
            return (
                f"the tokenizer joins the value {shape.values[k][0]} to the text before it "
                f"({shape.prefill!r}): the prefill would not end where the value starts"
            )
        node = root
        tail = full[len(pre) :]
        for i, tok in enumerate(tail):
            child = node.children.get(tok)
            if child is None:
                sub = tail[: i + 1]
                child = node.children[tok] = Node(sub, by_path.get(sub))
            node = child
        if node.value is not None or node.children:
            return f"two allowed values share the token path of {shape.values[k][0]}"
        node.value = k
    for node in _walk(root):
        if node.value is not None and node.children:
            return "an allowed value's tokens are a prefix of another's tokens with no close"
    # The nodes where the paths part; the root too when none does (one allowed value).
    probes = [n for n in _walk(root) if len(n.children) > 1] or [root]
    for n in probes:
        if n.text is None:
            return f"no text tokenizes to the token path {list(n.path)}: it cannot be sent as text"
    return ValueTree(shape, pre, root, probes)


def _walk(node: Node) -> list[Node]:
    out = [node]
    for child in node.children.values():
        out.extend(_walk(child))
    return out


@dataclass(frozen=True, slots=True)
class ScoreReading:
    """What the probabilities say about one row (see the module docstring)."""

    score: Any
    """Greedy decoding of the value under the schema's grammar."""
    p: float
    """p(score)."""
    expected: float | None
    """Sum of p·value (integer values); None for enums."""
    argmax: Any
    distribution: dict[str, float]
    """p of each allowed value (JSON text), in the schema's order."""
    p_outside: float
    unseen_bound: float
    steps: list[dict[str, Any]]
    """Per node asked: its text after the prefill and the top tokens read there."""

    def margin(self) -> float:
        """p of the most probable value minus p of the next (1.0 for a single value)."""
        ps = sorted(self.distribution.values(), reverse=True)
        return ps[0] - ps[1] if len(ps) > 1 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "p": self.p,
            "expected": self.expected,
            "argmax": self.argmax,
            "distribution": self.distribution,
            "p_outside": self.p_outside,
            "unseen_bound": self.unseen_bound,
            "steps": self.steps,
        }


def _child_probs(node: Node, top: Sequence[TokenChoice]) -> tuple[dict[int, float], float, float]:
    """Raw probabilities of `node`'s children from its top list (by id, else by text), the
    listed mass outside them, and the bound on the unseen children's mass."""
    texts: dict[str, int] = {}
    for key, child in node.children.items():
        if child.text is not None and node.text is not None:
            texts.setdefault(child.text[len(node.text) :], key)
    probs: dict[int, float] = {}
    for choice in top:
        tok: int | None
        if choice.id is not None:
            tok = choice.id if choice.id in node.children else None
        else:
            tok = texts.get(choice.token)
        if tok is not None:
            probs[tok] = probs.get(tok, 0.0) + math.exp(choice.logprob)
    seen = sum(probs.values())
    listed = sum(math.exp(c.logprob) for c in top)
    floor = min((math.exp(c.logprob) for c in top), default=1.0)
    unseen = len(node.children) - len(probs)
    full = len(top) < TOP_N and listed > 0.999  # a short list that holds all the mass
    bound = 0.0 if full else unseen * floor
    return probs, max(0.0, 1.0 - seen), min(1.0, bound)


def read_distribution(tree: ValueTree, tops: Sequence[Sequence[TokenChoice]]) -> ScoreReading:
    """The value distribution from each probe's top list (`tops[i]` for `tree.probes[i]`);
    raises Unreadable when a node the paths reach has no allowed token in its list."""
    if len(tops) != len(tree.probes):
        raise Unreadable(f"{len(tops)} probability lists for {len(tree.probes)} probes")
    read: dict[int, tuple[dict[int, float], float, float]] = {}
    steps = []
    for node, top in zip(tree.probes, tops, strict=True):
        read[id(node)] = _child_probs(node, top)
        steps.append(
            {"after": node.text or "", "top": [[c.token, round(c.logprob, 6)] for c in top]}
        )
    values = tree.shape.values
    p = [0.0] * len(values)
    raw = [0.0] * len(values)
    unseen = 0.0

    def down(node: Node, pg: float, pr: float) -> None:
        nonlocal unseen
        if node.value is not None:
            p[node.value] += pg
            raw[node.value] += pr
            return
        if len(node.children) == 1:  # one way on: the grammar forces it, nothing is asked
            (child,) = node.children.values()
            down(child, pg, pr)
            return
        probs, _, bound = read[id(node)]
        unseen += pr * bound
        z = sum(probs.values())
        if z <= 0:
            if pg > 0:
                raise Unreadable(
                    f"no allowed token among the top {TOP_N} after {node.text or 'the prefill'!r}"
                )
            return
        for tok, child in node.children.items():
            q = probs.get(tok, 0.0)
            down(child, pg * q / z, pr * q)

    down(tree.root, 1.0, 1.0)
    # Greedy: the most probable allowed token at every node the paths part.
    node = tree.root
    while node.value is None:
        if len(node.children) == 1:
            node = next(iter(node.children.values()))
            continue
        probs = read[id(node)][0]
        node = node.children[max(probs, key=lambda t: probs[t])]
    greedy = node.value
    best = max(range(len(values)), key=lambda k: p[k])
    shape = tree.shape
    expected = (
        sum(pk * float(v) for pk, (_, v) in zip(p, values, strict=True)) if shape.numeric else None
    )
    return ScoreReading(
        score=values[greedy][1],
        p=p[greedy],
        expected=expected,
        argmax=values[best][1],
        distribution={text: pk for (text, _), pk in zip(values, p, strict=True)},
        p_outside=max(0.0, 1.0 - sum(raw)),
        unseen_bound=min(1.0, unseen),
        steps=steps,
    )


def planned_mode(asked: str, schema: Mapping[str, Any] | None) -> dict[str, str]:
    """The mode a suite's run scores in, as far as the settings and the workload tell (a
    server that cannot read probabilities still decodes; `harness run`'s banner says so):
    for its report, so what reads its throughput knows which mode it measured."""
    if asked != "logprobs":
        return {
            "asked": asked,
            "used": "decode",
            "why": "decode asked: the model writes each reply",
        }
    shape = value_shape(schema)
    if isinstance(shape, str):
        return {"asked": asked, "used": "decode", "why": shape}
    return {"asked": asked, "used": "logprobs", "why": f"{shape.field!r} read from the model's "
            "top log-probabilities"}  # fmt: skip


def mode_of_report(data: Mapping[str, Any]) -> str:
    """`score mode X` for a line quoting a report's throughput: what the report says its run
    scored in (`score_mode.used`), else its config's, else `decode` (reports from before the
    setting decoded)."""
    block = data.get("score_mode")
    if isinstance(block, Mapping) and block.get("used"):
        why = f": {block['why']}" if block.get("why") else ""
        return f"score mode {block['used']}{why}"
    cfg = data.get("config")
    value = cfg.get("score_mode") if isinstance(cfg, Mapping) else None
    if isinstance(value, Mapping) and value.get("value"):
        return f"score mode {value['value']}"
    return "score mode decode (reported before score modes existed)"
