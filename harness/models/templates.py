"""Chat templates: the Jinja text the embedded server renders, and the same layout in Python.

The engine counts prompt tokens *before* sending a request, exactly, without asking the server to
tokenize a 4,000-token prompt every time. It can because a prompt is a sequence of special tokens
and plain-text pieces, and llama.cpp tokenizes each piece between special tokens on its own: so
the tokens of a prompt are the concatenation of the tokens of its pieces, and the piece that holds
the shared rubric is tokenized once and cached. `render_pieces` yields those pieces; the Jinja
text below renders the same string on the server (checked by an integration test against
`/apply-template` and `/tokenize`).

Gemma's layout follows Ollama's gemma3 template, which production uses: a system message becomes
a user turn of its own (Gemma has no system role), which also puts the rubric in a piece of its
own, ended by a special token.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from harness.errors import ConfigError

__all__ = ["ChatFormat", "Special", "get_format", "memo_held_bytes"]


@dataclass(frozen=True, slots=True)
class Special:
    """A special token, written as its text (e.g. `<start_of_turn>`)."""

    text: str


Piece = str | Special
Message = Mapping[str, str]


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: formats are module constants
class ChatFormat:
    """A chat layout: its Jinja template for llama.cpp and its piece renderer for counting."""

    name: str
    jinja: str
    bos: str | None
    specials: tuple[str, ...]
    turn_open: str
    turn_close: str
    role_names: tuple[tuple[str, str], ...]

    def role(self, role: str) -> str:
        if role == "user":  # the common case, first
            return self.user_name
        for key, value in self.role_names:
            if key == role:
                return value
        raise ConfigError(f"chat format {self.name!r} has no role {role!r}")

    @property
    def user_name(self) -> str:
        return self.role_names[1][1]

    def render_pieces(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[Piece]:
        """The prompt as special tokens and text pieces, in order.

        Every message starts and ends with a special token or a newline piece of its own, so
        pieces never merge across messages, and each message's pieces are memoised: the rubric
        piece is the same string object in every prompt (its hash is computed once).
        """
        out: list[Piece] = [_special(self.bos)] if self.bos else []
        for msg in messages:
            out.extend(_message_pieces(self, msg["role"], msg["content"]))
        if add_generation_prompt:
            out.extend(_generation_prompt(self))
        return out

    def render_text(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt as one string (without the BOS token, which llama.cpp adds itself)."""
        pieces = self.render_pieces(messages, add_generation_prompt=add_generation_prompt)
        return "".join(
            p if isinstance(p, str) else p.text for p in pieces if p != Special(self.bos or "")
        )


class _PieceMemo:
    """A message's pieces, memoised for the most recently used `size` messages (thread-safe).

    Bounded like the token counter's LRU and as large (4,096: a run's live conversations hold far
    fewer messages), and it says what it holds (`held_bytes`), so a memory watch can tell it
    filling up from a leak. The held bytes count the memo's own tuples, not the strings inside
    them: the rendered text is the token counter's key too, and is counted there while both hold
    it (never twice; what only the memo holds is left out, so the figure is a lower bound)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._table: OrderedDict[tuple[ChatFormat, str, str], tuple[Piece, ...]] = OrderedDict()
        self._bytes = 0

    def pieces(self, fmt: ChatFormat, role: str, content: str) -> tuple[Piece, ...]:
        key = (fmt, role, content)
        with self._lock:
            got = self._table.get(key)
            if got is not None:
                self._table.move_to_end(key)
                return got
        got = _render_message(fmt, role, content)
        with self._lock:
            if key not in self._table:
                self._table[key] = got
                self._bytes += sys.getsizeof(key) + sys.getsizeof(got)
                while len(self._table) > self.size:
                    old, old_pieces = self._table.popitem(last=False)
                    self._bytes -= sys.getsizeof(old) + sys.getsizeof(old_pieces)
        return got

    def held_bytes(self) -> int:
        return self._bytes + sys.getsizeof(self._table)


_MEMO = _PieceMemo(4096)
_message_pieces = _MEMO.pieces


def memo_held_bytes() -> int:
    """Bytes the message memo holds now (see `_PieceMemo`)."""
    return _MEMO.held_bytes()


# No whitespace-trimming markers and no newline right after a block tag: llama.cpp's Jinja engine
# trims like Hugging Face's (trim_blocks, lstrip_blocks), and these layouts need every newline.
def _render_message(fmt: ChatFormat, role: str, content: str) -> tuple[Piece, ...]:
    text = fmt.role(role) + "\n" + content
    if not any(s in text for s in fmt.specials):
        return (_special(fmt.turn_open), text, _special(fmt.turn_close), "\n")
    # A message that contains a special token's text is parsed as that token by the server
    # (llama.cpp parses specials in chat prompts), so split it the same way here.
    out: list[Piece] = [_special(fmt.turn_open)]
    for part in _specials_pattern(fmt.specials).split(text):
        if part:
            out.append(_special(part) if part in fmt.specials else part)
    out += [_special(fmt.turn_close), "\n"]
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _special(text: str) -> Special:
    return Special(text)


@functools.lru_cache(maxsize=16)
def _generation_prompt(fmt: ChatFormat) -> tuple[Piece, ...]:
    return (_special(fmt.turn_open), fmt.role("assistant") + "\n")


@functools.lru_cache(maxsize=16)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")


_GEMMA_JINJA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<start_of_turn>model\n{{ m['content'] }}<end_of_turn>\n"
    "{% else %}"
    "<start_of_turn>user\n{{ m['content'] }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CHATML_JINJA = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA = ChatFormat(
    name="gemma",
    jinja=_GEMMA_JINJA,
    bos="<bos>",
    specials=("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"),
    turn_open="<start_of_turn>",
    turn_close="<end_of_turn>",
    role_names=(("system", "user"), ("user", "user"), ("assistant", "model")),
)

CHATML = ChatFormat(
    name="chatml",
    jinja=_CHATML_JINJA,
    bos=None,
    specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    turn_open="<|im_start|>",
    turn_close="<|im_end|>",
    role_names=(("system", "system"), ("user", "user"), ("assistant", "assistant")),
)

_FORMATS = {f.name: f for f in (GEMMA, CHATML)}


def get_format(name: str) -> ChatFormat:
    """The chat format called `name` (`gemma` or `chatml`)."""
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise ConfigError(f"unknown chat format {name!r}; known: {known}") from None
