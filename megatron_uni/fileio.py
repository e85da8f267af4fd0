"""Crash-safe file writes shared by the checkpoint and data stores."""

from __future__ import annotations

import os


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
