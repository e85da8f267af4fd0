"""Integer rounding used wherever a length is padded to a multiple (blocks, tiles, vocabulary rows)."""

from __future__ import annotations


def ceil_div(value: int, divisor: int) -> int:
    """Smallest integer n with n * divisor >= value."""
    return -(-value // divisor)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return ceil_div(value, multiple) * multiple
