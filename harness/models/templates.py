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

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from harness.errors import ConfigError

__all__ = ["ChatFormat", "Special", "get_format"]


@dataclass(frozen=True, slots=True)
class Special:
    """A special token, written as its text (e.g. `<start_of_turn>`)."""

    text: str


Piece = str | Special
Message = Mapping[str, str]


@dataclass(frozen=True, slots=True)
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
        for key, value in self.role_names:
            if key == role:
                return value
        raise ConfigError(f"chat format {self.name!r} has no role {role!r}")

    def _split_specials(self, text: str) -> Iterator[Piece]:
        # A message that contains a special token's text is parsed as that token by the server
        # (llama.cpp parses specials in chat prompts), so split it the same way here.
        pattern = "(" + "|".join(re.escape(s) for s in self.specials) + ")"
        for part in re.split(pattern, text):
            if not part:
                continue
            yield Special(part) if part in self.specials else part

    def render_pieces(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[Piece]:
        """The prompt as special tokens and text pieces, in order; text pieces are merged."""
        out: list[Piece] = []
        if self.bos:
            out.append(Special(self.bos))
        for msg in messages:
            out.append(Special(self.turn_open))
            out.extend(self._split_specials(self.role(msg["role"]) + "\n" + msg["content"]))
            out.append(Special(self.turn_close))
            out.append("\n")
        if add_generation_prompt:
            out.append(Special(self.turn_open))
            out.append(self.role("assistant") + "\n")
        merged: list[Piece] = []
        for piece in out:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] = merged[-1] + piece
            else:
                merged.append(piece)
        return merged

    def render_text(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt as one string (without the BOS token, which llama.cpp adds itself)."""
        pieces = self.render_pieces(messages, add_generation_prompt=add_generation_prompt)
        return "".join(
            p if isinstance(p, str) else p.text for p in pieces if p != Special(self.bos or "")
        )


# No whitespace-trimming markers and no newline right after a block tag: llama.cpp's Jinja engine
# trims like Hugging Face's (trim_blocks, lstrip_blocks), and these layouts need every newline.
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
