"""Model metadata, KV theory, GGUF reading and the tiny model."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from harness.errors import ConfigError, ModelNotFound
from harness.models import geometry_from_gguf, geometry_from_metadata, kv_theory, resolve_model
from harness.models.gguf_kv import read_gguf_kv
from harness.models.tiny import TINY_DIMS

KIB = 1024

GEMMA3_12B = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 48,
    "gemma3.attention.head_count": 16,
    "gemma3.attention.head_count_kv": 8,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.attention.sliding_window": 1024,
    "gemma3.context_length": 131072,
    "gemma3.embedding_length": 3840,
}


def test_gemma3_12b_kv_bytes_per_token() -> None:
    geom = geometry_from_metadata(GEMMA3_12B, source="test")
    assert len(geom.global_layers) == 8
    assert geom.global_layers[:2] == (5, 11)
    theory = kv_theory(geom)
    assert theory.bytes_per_token_all_layers == 384 * KIB
    assert theory.bytes_per_token_growing == 64 * KIB
    # The 40 local layers hold a window of 1024 tokens each: a fixed block.
    assert theory.window_block_bytes() == 40 * 8 * 512 * 2 * 1024


def test_gemma3_12b_cache_types_scale_bytes() -> None:
    geom = geometry_from_metadata(GEMMA3_12B, source="test")
    assert kv_theory(geom, "q8_0").bytes_per_token_growing == pytest.approx(64 * KIB * 34 / 64)
    assert kv_theory(geom, "q4_0").bytes_per_token_growing == pytest.approx(64 * KIB * 18 / 64)
    with pytest.raises(ConfigError, match="cache_type_k = 'q3'"):
        kv_theory(geom, "q3")


def test_missing_key_length_defaults_to_256_for_gemma() -> None:
    meta = {
        k: v for k, v in GEMMA3_12B.items() if "key_length" not in k and "value_length" not in k
    }
    geom = geometry_from_metadata(meta, source="ollama:/api/show gemma3:12b")
    assert (geom.key_length, geom.value_length) == (256, 256)


def test_missing_required_key_names_it() -> None:
    meta = {k: v for k, v in GEMMA3_12B.items() if k != "gemma3.block_count"}
    with pytest.raises(ConfigError, match=r"gemma3\.block_count"):
        geometry_from_metadata(meta, source="x.gguf")


def test_model_without_window_grows_on_every_layer() -> None:
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.embedding_length": 576,
    }
    theory = kv_theory(geometry_from_metadata(meta, source="t"))
    assert theory.bytes_per_token_growing == theory.bytes_per_token_all_layers == 30 * 3 * 128 * 2
    assert theory.window_block_bytes() == 0


def test_packaged_gemma3_270m_geometry() -> None:
    geom = geometry_from_gguf(resolve_model("gemma3-270m").path)
    assert (geom.n_layers, geom.n_kv_heads, geom.key_length, geom.sliding_window) == (
        18, 1, 256, 512,
    )  # fmt: skip
    assert geom.global_layers == (5, 11, 17)
    theory = kv_theory(geom)
    assert theory.bytes_per_token_all_layers == 18 * KIB
    assert theory.bytes_per_token_growing == 3 * KIB


def test_fast_reader_matches_gguf_library(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(7)
    writer.add_sliding_window(64)
    writer.add_string("general.name", "ünïcode name")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(100)])
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_float32("gemma3.rope.freq_base", 10000.0)
    import numpy as np

    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_gguf_kv(path)
    ref = gguf.GGUFReader(str(path))
    assert ours["gemma3.block_count"] == ref.fields["gemma3.block_count"].contents() == 7
    assert ours["general.name"] == "ünïcode name"
    assert ours["tokenizer.ggml.add_bos_token"] is True
    assert ours["gemma3.rope.freq_base"] == 10000.0
    assert ours["tokenizer.ggml.tokens.count"] == 100  # long arrays are counted, not kept
    full = read_gguf_kv(path, keep_arrays=True)
    assert full["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()


def test_reader_rejects_non_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, sorry")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        read_gguf_kv(bad)


def test_tiny_model_is_a_real_gemma3_with_the_real_tokenizer() -> None:
    tiny = resolve_model("tiny-gemma3").path
    meta = read_gguf_kv(tiny)
    real = read_gguf_kv(resolve_model("gemma3-270m").path)
    assert meta["general.architecture"] == "gemma3"
    assert meta["tokenizer.ggml.tokens.count"] == real["tokenizer.ggml.tokens.count"] == 262144
    geom = geometry_from_gguf(tiny)
    assert geom.n_layers == TINY_DIMS["block_count"]
    assert geom.global_layers == (5,)
    assert tiny.stat().st_size < 64 * 1024 * 1024


def test_unknown_model_name_says_what_exists() -> None:
    with pytest.raises(ModelNotFound, match="gemma3-270m, tiny-gemma3, smollm2-135m"):
        resolve_model("gemma-9000")
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model("/nonexistent/model.gguf")


@pytest.mark.parametrize(
    ("meta", "tuned"),
    [({"general.architecture": "gemma3", "tokenizer.chat_template": "{{ x }}"}, True),
     ({"general.architecture": "llama"}, False)],
)  # fmt: skip
def test_a_gguf_is_instruction_tuned_only_when_it_carries_a_chat_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta: dict[str, str], tuned: bool
) -> None:
    """Issue 42: every .gguf given by path was called instruction-tuned, base models too."""
    import harness.models.geometry as geometry
    from harness.models.registry import resolve_model

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(geometry, "read_gguf_metadata", lambda path: meta)
    spec = resolve_model(str(gguf))
    assert spec.instruction_tuned is tuned
    assert ("likely a base model" in spec.note) is not tuned
