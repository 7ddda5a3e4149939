"""Atomic file writes: a temporary file in the same directory, fsync, then rename.

A reader (or a crash) sees the old file or the new one, never half of one. Errors name the path.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import OutputError

__all__ = ["atomic_write_json", "atomic_write_text"]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically. Raises OutputError naming the path."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
