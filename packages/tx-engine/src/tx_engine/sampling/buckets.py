"""Shape buckets of the sampling programs: each distinct size is its own compiled program."""

from __future__ import annotations

__all__ = ["context_bucket", "pow2"]


def pow2(n: int, floor: int = 1) -> int:
    """The power of two >= ``max(n, floor)``."""
    return 1 << max(0, max(n, floor) - 1).bit_length()


def context_bucket(n: int) -> int:
    """The largest of 2^k and 3·2^(k-1) that is <= ``n`` (``n >= 2``): a reused prefix's
    length. Two sizes per octave keep at least 2/3 of a common prefix with few programs."""
    p = 1 << (n.bit_length() - 1)
    return p + p // 2 if p >= 2 and n >= p + p // 2 else p
