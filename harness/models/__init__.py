"""Model files, their metadata, chat layouts and KV-cache theory."""

from harness.models.geometry import ModelGeometry, geometry_from_gguf, geometry_from_metadata
from harness.models.kv import KVTheory, kv_theory
from harness.models.registry import DEFAULT_MODEL, KNOWN_MODELS, ModelSpec, resolve_model
from harness.models.templates import ChatFormat, Special, get_format

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ChatFormat",
    "KVTheory",
    "ModelGeometry",
    "ModelSpec",
    "Special",
    "geometry_from_gguf",
    "geometry_from_metadata",
    "get_format",
    "kv_theory",
    "resolve_model",
]
