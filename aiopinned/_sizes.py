"""Size rules: the block a request of ``n`` bytes grows, and the largest idle block it may take.

``pow2`` is the seed's: a new block is the next power of two (up to 2x the request, 1.5x on
average); reuse takes the smallest idle block that fits, however large without a cap, and no
larger than the power of two it would have grown under one (the best-fit trap, DESIGN.md).

``fine`` (the default) has four size classes per doubling above 16 KiB: a new block is ``n``
rounded up to a quarter of its power of two (at most 25% over, about 9% for spread sizes), and a
request takes no idle block more than one class above its own, cap or no cap, so a small request
never sits in a big block.  ``benchmarks/bench_waste.py`` measures both on a mixed trace.
"""

from __future__ import annotations

from ._block import pow2

ROUNDINGS = ("fine", "pow2")
FINE_FROM = 16 << 10  # below this, powers of two: pages and bytes, not fractions, are wasted


def fine(n: int) -> int:
    """``n`` rounded up to one of four classes per doubling (a power of two below 16 KiB)."""
    if n <= FINE_FROM:
        return pow2(n)
    shift = (n - 1).bit_length() - 3
    return (((n - 1) >> shift) + 1) << shift


class Sizes:
    """One pool's rule: ``grow(n)`` (the block to pin) and ``limit(n)`` (the largest idle block
    a request may take, ``None`` for any)."""

    __slots__ = ("bounded", "grow", "name")

    def __init__(self, name: str, capped: bool) -> None:
        self.name = name
        #: the size class of a request: the block growth pins for it
        self.grow = pow2 if name == "pow2" else fine
        self.bounded = name != "pow2" or capped

    def limit(self, n: int) -> int | None:
        if not self.bounded:
            return None
        c = self.grow(n)
        return c if self.name == "pow2" else self.grow(c + 1)
