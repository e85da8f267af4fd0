#!/usr/bin/env python
"""Generate text or image-code grids from an HF folder or a megatron checkpoint (CPU).

Same as ``megatron-uni generate``; see ``--help`` and docs/inference.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_uni.inference.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
