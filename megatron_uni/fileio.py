"""Crash-safe file writes: every file the package writes whole (checkpoints, the image-code store,
JSON configs and reports) goes through here."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str, value: Any, indent: Optional[int] = 2, sort_keys: bool = True) -> None:
    """``value`` as JSON ending in a newline, written atomically (HF's layout with the defaults)."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")
