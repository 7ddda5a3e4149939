"""A fast reader for the key/value header of a GGUF file.

`gguf.GGUFReader` builds a numpy view per array element, which takes ~40 s on Gemma's 262,144
token strings; reading the header sequentially with `struct` takes well under a second. Only the
key/value section is read here (tensor data is never touched). Format: magic `GGUF`, version
(u32), tensor count (u64), key/value count (u64), then per pair: key (u64 length + UTF-8), value
type (u32), value; an array value is element type (u32), count (u64), elements.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

__all__ = ["GGUFValueType", "read_gguf_kv"]


class GGUFValueType:
    """GGUF value type codes."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
    UINT64, INT64, FLOAT64 = 10, 11, 12


_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, *, keep_arrays: bool) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype == GGUFValueType.STRING:
                if keep_arrays or count <= 64:
                    return [self.string() for _ in range(count)]
                data, pos = self.data, self.pos
                for _ in range(count):  # skip without decoding
                    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                self.pos = pos
                return _Skipped(count)
            fmt = _SCALAR[etype]
            size = struct.calcsize(fmt)
            start = self.pos
            self.pos += size * count
            if not keep_arrays and count > 64:
                return _Skipped(count)
            return list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, start))
        return self.unpack(_SCALAR[vtype])


class _Skipped(int):
    """Length of a long array that was not kept."""


def read_gguf_kv(path: str | Path, *, keep_arrays: bool = False) -> dict[str, Any]:
    """Read every key/value of a GGUF file.

    Long arrays (over 64 elements, e.g. the tokenizer's) are returned only with `keep_arrays`;
    otherwise their length is stored under `<key>.count` instead.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                raise ConfigError(f"{path}: not a GGUF file (bad magic)")
            version, _n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
            if version < 2:
                raise ConfigError(f"{path}: GGUF version {version} is too old (need 2 or newer)")
            # The KV section is small for most models; read enough for Gemma's vocabulary.
            data = head + fh.read(64 * 1024 * 1024)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    cur = _Cursor(data)
    cur.pos = 24
    out: dict[str, Any] = {}
    try:
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            value = cur.value(vtype, keep_arrays=keep_arrays)
            if isinstance(value, _Skipped):
                out[key + ".count"] = int(value)
            else:
                out[key] = value
    except (struct.error, KeyError) as exc:
        raise ConfigError(f"{path}: GGUF key/value section is truncated or corrupt") from exc
    return out
