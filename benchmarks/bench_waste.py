"""Waste and hit rate of the size rules on a mixed-size trace (host backend).

    python benchmarks/bench_waste.py

The trace (the issue's): 4000 allocations with sizes log-uniform between 4 KiB and 64 MiB; after
each one, once more than 32 buffers are live, a random live buffer is freed.  Waste is the mean,
over the trace, of ``active_bytes`` (the blocks handed out) over the bytes requested by the live
buffers; the hit rate is cache hits over allocations.  Printed for the default rule
(``rounding="fine"``) next to the seed's (``rounding="pow2"``), with and without a cap.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random

from aiopinned import PinnedBuffer, PinnedPool

KiB, MiB = 1 << 10, 1 << 20


def trace(seed: int, n: int = 4000) -> list[tuple[int, float]]:
    """``n`` (size, pick) pairs: the size to allocate, then which live buffer to free."""
    rng = random.Random(seed)
    lo, hi = math.log(4 * KiB), math.log(64 * MiB)
    return [(int(math.exp(rng.uniform(lo, hi))), rng.random()) for _ in range(n)]


async def run(
    steps: list[tuple[int, float]], rounding: str, max_bytes: int | None
) -> tuple[float, float]:
    """(waste, hit rate) of one pool on the trace."""
    async with PinnedPool("host", rounding=rounding, max_bytes=max_bytes) as pool:
        live: list[PinnedBuffer] = []
        ratios = []
        for size, pick in steps:
            live.append(await pool.allocate(size))
            if len(live) > 32:
                live.pop(int(pick * len(live))).free()
            ratios.append(pool.stats().active_bytes / sum(b.nbytes for b in live))
        s = pool.stats()
        for buf in live:
            buf.free()
        return sum(ratios) / len(ratios), s.cache_hits / len(steps)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    steps = trace(args.seed)
    print(f"{'rule':<16} {'cap':>9} {'waste':>7} {'hit rate':>9}")
    for max_bytes in (None, 4 << 30):
        cap = "none" if max_bytes is None else f"{max_bytes >> 30} GiB"
        base = None
        for rounding in ("fine", "pow2"):
            waste, hits = await run(steps, rounding, max_bytes)
            base = base or waste
            note = f"   (wastes {waste / base:.2f}x the default)" if rounding == "pow2" else ""
            print(f"{rounding:<16} {cap:>9} {waste:>7.3f} {hits:>9.3f}{note}")


if __name__ == "__main__":
    asyncio.run(main())
