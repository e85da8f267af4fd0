"""Is TransformerEngine usable here?

An installed-but-unloadable TE raises OSError/RuntimeError/AssertionError, not ImportError (no
``libcuda.so.1`` on a CPU machine), so every probe catches ``Exception``.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True
