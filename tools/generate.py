#!/usr/bin/env python
"""Generate text or image-code grids from an HF folder or a megatron checkpoint (CPU).

Same as ``megatron-uni generate``; see ``--help`` and docs/inference.md.
"""

from __future__ import annotations

import sys

from megatron_uni.inference.command import main

if __name__ == "__main__":
    sys.exit(main())
