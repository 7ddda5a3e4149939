"""Model geometry: the shape numbers that decide KV-cache size, read from GGUF or Ollama metadata.

Both sources use the same llama.cpp key names (`gemma3.block_count`,
`gemma3.attention.head_count_kv`, ...): a GGUF file stores them as key/value fields, and Ollama's
`/api/show` returns them under `model_info`. One parser serves both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.models.gguf_kv import read_gguf_kv

__all__ = [
    "KV_MODELLED",
    "ModelGeometry",
    "geometry_from_gguf",
    "geometry_from_metadata",
    "read_gguf_metadata",
]

# Ollama leaves `attention.key_length` out for some models and then uses this default.
DEFAULT_HEAD_DIM = 256

# Architectures that interleave sliding-window ("local") layers with full ("global") ones, and the
# period of the pattern: in llama.cpp, layer `il` is global when `il % period == period - 1`.
SLIDING_WINDOW_PERIOD: dict[str, int] = {"gemma3": 6, "gemma2": 2, "gemma3n": 5}
_REQUIRED = object()


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    """The numbers of a transformer that size its KV cache."""

    architecture: str
    """llama.cpp architecture name, e.g. `gemma3`."""
    name: str
    """Human-readable model name from the metadata (or the file stem)."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads per layer."""
    n_kv_heads: int
    """Key/value heads per layer (grouped-query attention)."""
    key_length: int
    """Elements per key vector (head dimension of K)."""
    value_length: int
    """Elements per value vector (head dimension of V)."""
    context_length: int
    """Context length the model was trained for, in tokens."""
    embedding_length: int
    """Hidden size."""
    sliding_window: int | None = None
    """Window of the local layers in tokens; None when every layer attends to the full context."""
    global_layers: tuple[int, ...] = field(default=())
    """Indices of layers with full attention (their KV grows with the context)."""
    source: str = ""
    """Where the numbers came from: `gguf:<path>` or `ollama:/api/show <model>`."""


KV_MODELLED = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite"}
)
"""Architectures whose KV cache is `n_kv_heads × (key + value)` per token on every layer (or
on the global layers, with sliding windows). Others (gemma3n's layers share KV caches, gemma4,
multi-head latent attention, ...) get no theory: `kv_theory` says unknown, never a wrong number."""


def _get(meta: Mapping[str, Any], arch: str, key: str, default: Any = None) -> Any:
    full = f"{arch}.{key}"
    if full in meta and meta[full] is None:
        # Ollama's /api/show sends per-layer arrays as null: the value is there but unreadable.
        if default is _REQUIRED:
            raise ConfigError(
                f"metadata key {full!r} came as null (Ollama's /api/show leaves per-layer arrays "
                "out); the geometry cannot be read from it: give the model's GGUF instead"
            )
        return None if default is _REQUIRED else default
    value = meta.get(full, None if default is _REQUIRED else default)
    if isinstance(value, list | tuple) and value:
        # Per-layer arrays (e.g. head_count_kv on some models): take the first; we only model
        # uniform layers and say so in the geometry's source.
        return value[0]
    return value


def geometry_from_metadata(meta: Mapping[str, Any], *, source: str) -> ModelGeometry:
    """Build a geometry from llama.cpp-style metadata keys.

    Raises ConfigError naming the missing key when the metadata cannot describe a KV cache.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"{source}: metadata has no 'general.architecture' key")

    def need(key: str) -> int:
        try:
            value = _get(meta, arch, key, _REQUIRED)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if value is None:
            raise ConfigError(f"{source}: metadata has no '{arch}.{key}' key")
        return int(value)

    n_layers = need("block_count")
    n_heads = need("attention.head_count")
    if f"{arch}.attention.head_count_kv" in meta:
        n_kv_heads = need("attention.head_count_kv")  # null is an error, not n_heads
    else:
        n_kv_heads = n_heads
    embedding = need("embedding_length")
    default_dim = DEFAULT_HEAD_DIM if arch.startswith("gemma") else embedding // n_heads
    key_length = int(_get(meta, arch, "attention.key_length", default_dim))
    value_length = int(_get(meta, arch, "attention.value_length", key_length))
    window_raw = _get(meta, arch, "attention.sliding_window")
    window = int(window_raw) if window_raw else None

    if window is None:
        global_layers = tuple(range(n_layers))
    else:
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list | tuple) and len(pattern) == n_layers:
            # Per-layer booleans: true marks a sliding-window layer.
            global_layers = tuple(i for i, is_swa in enumerate(pattern) if not is_swa)
        else:
            period = int(pattern) if isinstance(pattern, int) and pattern > 0 else None
            period = period or SLIDING_WINDOW_PERIOD.get(arch)
            if period is None:
                global_layers = tuple(range(n_layers))
            else:
                global_layers = tuple(i for i in range(n_layers) if i % period == period - 1)

    name = meta.get("general.name") or meta.get("general.basename") or arch
    return ModelGeometry(
        architecture=arch,
        name=str(name),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        key_length=key_length,
        value_length=value_length,
        context_length=int(_get(meta, arch, "context_length", 0) or 0),
        embedding_length=embedding,
        sliding_window=window,
        global_layers=global_layers,
        source=source,
    )


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Read a GGUF file's key/values; long arrays (the tokenizer's) only as `<key>.count`."""
    return read_gguf_kv(path)


def geometry_from_gguf(path: str | Path) -> ModelGeometry:
    """Geometry of a local GGUF file."""
    meta = read_gguf_metadata(path)
    geom = geometry_from_metadata(meta, source=f"gguf:{path}")
    if geom.name == geom.architecture:
        return ModelGeometry(**{**_asdict(geom), "name": Path(path).stem})
    return geom


def _asdict(geom: ModelGeometry) -> dict[str, Any]:
    return {f: getattr(geom, f) for f in geom.__dataclass_fields__}
