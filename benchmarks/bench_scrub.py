"""What ``PinnedPool(scrub=True)`` costs: staging throughput with and without zeroing on reuse.

    python benchmarks/bench_scrub.py            # cuda if usable, else host

Each cycle is what a server does per request: take a buffer, write the request into it (a
``memset`` of the whole buffer), give it back.  With ``scrub=True`` every block is zeroed when it
comes back (on the loop up to 256 KiB, in a thread above).  The pool is capped at two blocks, so
a scrub in flight holds the next request back, as it would under load.  Printed: GB/s staged
without and with scrub, their ratio, and a plain ``memset`` of the same size (the ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import statistics
import time

from aiopinned import PinnedPool

MiB = 1 << 20


async def staged_gbps(backend: str, size: int, scrub: bool, seconds: float) -> float:
    async with PinnedPool(backend, max_bytes=2 * size, scrub=scrub) as pool:
        for _ in range(3):  # warm: both blocks pinned
            (await pool.allocate(size)).free()
        samples = []
        for _ in range(5):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 5:
                buf = await pool.allocate(size)
                ctypes.memset(buf.ptr, n & 0xFF, size)
                buf.free()
                n += 1
            samples.append(n * size / (time.perf_counter() - t0) / 1e9)
        return statistics.median(samples)


def memset_gbps(size: int, seconds: float) -> float:
    buf = (ctypes.c_ubyte * size)()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ctypes.memset(buf, n & 0xFF, size)
        n += 1
    return n * size / (time.perf_counter() - t0) / 1e9


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()
    async with PinnedPool(args.backend) as probe:
        backend = probe.backend
    print(f"backend: {backend}; GB/s of requests staged (allocate, write, free), cap 2 blocks")
    print(f"{'size':>9} {'no scrub':>10} {'scrub':>10} {'scrub/no':>9} {'memset':>10}")
    for size in (64 << 10, 1 * MiB, 16 * MiB, 64 * MiB):
        plain = await staged_gbps(backend, size, False, args.seconds)
        zeroed = await staged_gbps(backend, size, True, args.seconds)
        ceiling = memset_gbps(size, args.seconds / 2)
        print(f"{size // 1024:>6} KiB {plain:>10.2f} {zeroed:>10.2f} {zeroed / plain:>8.2f}x "
              f"{ceiling:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
