"""Theoretical KV-cache bytes per token of context, sliding-window aware.

For each layer the cache holds, per token, `n_kv_heads × (key_length + value_length)` elements.
Global (full-attention) layers keep every token of the context, so their bytes grow with it;
sliding-window layers keep at most the window (llama.cpp, with `swa_full` off, sizes them at
`window × sequences + n_ubatch` cells), a fixed block. That split is what a memory sweep sees:
the slope of memory against `n_ctx` is the growing part alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import ConfigError
from harness.models.geometry import KV_MODELLED, ModelGeometry

__all__ = ["CACHE_TYPE_BYTES", "KVTheory", "UnknownGeometry", "kv_theory"]


class UnknownGeometry(ConfigError):
    """The model's architecture is one the KV theory does not model."""


# Bytes per element of each llama.cpp KV cache type (block-quantised types carry a scale).
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}


@dataclass(frozen=True, slots=True)
class KVTheory:
    """KV-cache sizes derived from a model's geometry and the cache element types."""

    cache_type_k: str
    cache_type_v: str
    bytes_per_token_all_layers: float
    """Bytes per token if every layer kept the whole context (no window handling)."""
    bytes_per_token_growing: float
    """Bytes per token of the global layers: what grows with `n_ctx` when windows are capped."""
    bytes_per_token_local: float
    """Bytes per cached token of the sliding-window layers, all of them together."""
    sliding_window: int | None
    """Window of the local layers in tokens (None: no sliding-window layers)."""

    def window_block_bytes(self, n_seq: int = 1, n_ubatch: int = 0) -> float:
        """Fixed bytes of the sliding-window layers: `(window × n_seq + n_ubatch)` cells."""
        if not self.sliding_window:
            return 0.0
        return self.bytes_per_token_local * (self.sliding_window * n_seq + n_ubatch)

    def total_bytes(self, n_ctx: int, *, swa_full: bool = False, n_seq: int = 1) -> float:
        """Whole KV cache for a context of `n_ctx` tokens (llama.cpp's allocation, unpadded)."""
        if swa_full or not self.sliding_window:
            return self.bytes_per_token_all_layers * n_ctx
        local_cells = min(n_ctx, self.sliding_window * n_seq)
        return self.bytes_per_token_growing * n_ctx + self.bytes_per_token_local * local_cells


def kv_theory(
    geom: ModelGeometry, cache_type_k: str = "f16", cache_type_v: str | None = None
) -> KVTheory:
    """Theoretical KV bytes per token for `geom` with the given cache types (default f16)."""
    cache_type_v = cache_type_v or cache_type_k
    if geom.architecture not in KV_MODELLED:
        raise UnknownGeometry(
            f"the KV theory does not model the {geom.architecture!r} architecture "
            f"({geom.source}): its KV bytes per token are unknown, not estimated"
        )
    for setting, value in (("cache_type_k", cache_type_k), ("cache_type_v", cache_type_v)):
        if value not in CACHE_TYPE_BYTES:
            known = ", ".join(sorted(CACHE_TYPE_BYTES))
            raise ConfigError(f"{setting} = {value!r} is not a KV cache type; use one of {known}")
    per_layer = geom.n_kv_heads * (
        geom.key_length * CACHE_TYPE_BYTES[cache_type_k]
        + geom.value_length * CACHE_TYPE_BYTES[cache_type_v]
    )
    n_global = len(geom.global_layers)
    n_local = geom.n_layers - n_global
    windowed = geom.sliding_window is not None and n_local > 0
    return KVTheory(
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        bytes_per_token_all_layers=per_layer * geom.n_layers,
        bytes_per_token_growing=per_layer * (n_global if windowed else geom.n_layers),
        bytes_per_token_local=per_layer * n_local if windowed else 0.0,
        sliding_window=geom.sliding_window if windowed else None,
    )
