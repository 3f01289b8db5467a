"""Core figures: cache-hit cost, copy bandwidth, and what growing does to the event loop.

    python benchmarks/bench_core.py            # cuda if usable, else host

Every row is measured against its peer in the same run; ratios are ours / theirs for time
(lower is better) and ours / theirs for bandwidth (higher is better).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from aiopinned import PinnedPool
from aiopinned._bench import (
    copy_gbps,
    cuda_torch,
    hit_samplers,
    interleaved,
    pool_pin_release,
    torch_pin_release,
)


def _table(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"  {name:<{width}}  {value:>14}  {ratio}")


class DictOfLists:
    """The plain baseline: idle buffers in a dict of lists by size, behind an ``asyncio.Lock``."""

    def __init__(self) -> None:
        self.idle: dict[int, list[bytearray]] = {}
        self.lock = asyncio.Lock()

    async def allocate(self, n: int) -> tuple[int, bytearray]:
        async with self.lock:
            same = self.idle.get(n)
            return (n, same.pop()) if same else (n, bytearray(n))

    def free(self, item: tuple[int, bytearray]) -> None:
        self.idle.setdefault(item[0], []).append(item[1])


async def cache_hit(pool: PinnedPool, n: int, size: int) -> list[tuple[str, str, str]]:
    """Each sample times ``n`` allocate + free pairs; samples of every row are interleaved, and
    each row reports its median, with its ratio to torch (cuda) and to the plain baseline."""
    (await pool.allocate(size)).free()  # warm
    plain = DictOfLists()
    plain.free(await plain.allocate(size))

    async def plain_hit() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            plain.free(await plain.allocate(size))
        return (time.perf_counter() - t0) / n * 1e6

    torch = cuda_torch() if pool.backend == "cuda" else None
    samples = hit_samplers(pool, size, n, torch)
    samples["dict of lists + asyncio.Lock"] = plain_hit
    if pool.backend == "cuda":
        try:
            import cupy

            cpool = cupy.cuda.PinnedMemoryPool()
            cpool.malloc(size)

            def cupy_hit() -> float:
                t0 = time.perf_counter()
                for _ in range(n):
                    mem = cpool.malloc(size)
                    del mem
                return (time.perf_counter() - t0) / n * 1e6

            samples["cupy PinnedMemoryPool malloc + del"] = cupy_hit
        except ImportError:
            pass
    med = await interleaved(samples, 11)
    peers = [p for p in ("torch.empty(pin_memory=True) + del", "dict of lists + asyncio.Lock")
             if p in med]  # fmt: skip
    return [
        (name, f"{v:.2f} us",
         ", ".join(f"{v / med[p]:.2f}x of {p.split(' ')[0].split('.')[0]}" for p in peers))
        for name, v in med.items()
    ]  # fmt: skip


def bandwidth(pool_tensor: Any, nbytes: int, to_device: bool) -> list[tuple[str, str, str]]:
    import torch

    ref = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def gbps(host: Any, reps: int) -> float:
        return copy_gbps(torch, host, dev, to_device, reps)

    ours = statistics.median(gbps(pool_tensor, 5) for _ in range(5))
    theirs = statistics.median(gbps(ref, 5) for _ in range(5))
    slow = statistics.median(gbps(pageable, 2) for _ in range(3))
    return [
        ("aiopinned buffer", f"{ours:.1f} GB/s", f"{ours / theirs:.2f}x of torch pinned"),
        ("torch.empty(pin_memory=True)", f"{theirs:.1f} GB/s", "1.00x"),
        ("pageable torch.empty", f"{slow:.1f} GB/s", f"{slow / theirs:.2f}x of torch pinned"),
    ]


async def pin_and_release(nbytes: int, rounds: int) -> list[tuple[str, str, str]]:
    """Pinning ``nbytes`` fresh, and releasing it, through the pool (each ``pinning`` mode) and
    through torch's pinned allocator (``cudaHostAlloc``; ``_host_emptyCache`` to release)."""
    import torch

    times: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved
        for mode in ("register", "alloc"):
            pin, release = await pool_pin_release(nbytes, "cuda", pinning=mode)
            times.setdefault(f"pin: aiopinned pinning={mode!r}", []).append(pin)
            times.setdefault(f"release: aiopinned pinning={mode!r}", []).append(release)
        pin, release = torch_pin_release(torch, nbytes)
        times.setdefault("pin: torch.empty(pin_memory=True)", []).append(pin)
        times.setdefault("release: torch._host_emptyCache()", []).append(release)
    med = {name: statistics.median(v) for name, v in times.items()}
    pin_peer, release_peer = med["pin: torch.empty(pin_memory=True)"], med[
        "release: torch._host_emptyCache()"]  # fmt: skip
    return [
        (name, f"{v * 1e3:.1f} ms",
         f"{v / (pin_peer if name.startswith('pin') else release_peer):.3f}x of torch")
        for name, v in sorted(med.items())
    ]  # fmt: skip


async def loop_stall(pool: PinnedPool, nbytes: int) -> list[tuple[str, str, str]]:
    """Largest gap between 1 ms ticks of a task while ``nbytes`` are pinned."""

    async def measure(work: object) -> float:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        await work()  # type: ignore[operator]
        done.set()
        await task
        return max(gaps) * 1e3

    async def ours() -> None:
        buf = await pool.allocate(nbytes)
        buf.free()
        await pool.empty_cache()

    rows = [("aiopinned allocate (pins off the loop)", f"{await measure(ours):.1f} ms", "")]
    if pool.backend == "cuda":
        import torch

        async def theirs() -> None:
            t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            del t
            torch._C._host_emptyCache()

        peer = await measure(theirs)
        rows.append(("torch.empty(pin_memory=True) on the loop", f"{peer:.1f} ms", ""))
        rows[0] = (rows[0][0], rows[0][1], f"{float(rows[0][1].split()[0]) / peer:.3f}x of torch")
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--hits", type=int, default=20000, help="cache hits per sample")
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per cache hit")
    parser.add_argument("--copy-mib", type=int, default=512)
    parser.add_argument("--stall-mib", type=int, default=1024)
    parser.add_argument("--pin-mib", type=int, default=1024)
    parser.add_argument("--pin-rounds", type=int, default=5)
    parser.add_argument("--hit-only", action="store_true", help="only the cache-hit table")
    args = parser.parse_args()
    async with PinnedPool(args.backend) as pool:
        print(f"backend: {pool.backend}")
        _table(
            f"cache hit, {args.size} bytes (median of 11 x {args.hits}, interleaved)",
            await cache_hit(pool, args.hits, args.size),
        )
        if args.hit_only:
            return
        if pool.backend == "cuda":
            buf = await pool.allocate(args.copy_mib << 20)
            for to_device, name in ((True, "host->device"), (False, "device->host")):
                rows = bandwidth(buf.torch(), args.copy_mib << 20, to_device)
                _table(f"{name} copy, {args.copy_mib} MiB", rows)
            buf.free()
            rows = await pin_and_release(args.pin_mib << 20, args.pin_rounds)
            _table(
                f"pinning and releasing {args.pin_mib} MiB "
                f"(median of {args.pin_rounds}, interleaved)",
                rows,
            )
        await pool.empty_cache()
        _table(
            f"largest loop stall while pinning {args.stall_mib} MiB (1 ms ticker)",
            await loop_stall(pool, args.stall_mib << 20),
        )


if __name__ == "__main__":
    asyncio.run(main())
