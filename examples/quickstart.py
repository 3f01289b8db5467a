"""A short tour of aiopinned: stage data in pinned buffers, copy, free, and watch the cache work.

    python examples/quickstart.py

Runs on the GPU when CUDA is usable (torch needed for the copies), else on the host backend.
"""

from __future__ import annotations

import asyncio
import ctypes
import time

from aiopinned import HostStream, PinnedPool


async def main() -> None:
    async with PinnedPool(max_bytes=256 << 20) as pool:
        print(f"backend: {pool.backend}")
        torch = None
        if pool.backend == "cuda":
            try:
                import torch
            except ImportError:
                print("(torch is not installed: showing the pool without device copies)")
        stream = torch.cuda.Stream() if torch is not None else HostStream()
        device = torch.empty(16 << 20, dtype=torch.uint8, device="cuda") if torch else None

        t0 = time.perf_counter()
        for step in range(200):
            async with pool.buffer(16 << 20) as buf:
                ctypes.memset(buf.ptr, step % 251, buf.nbytes)  # fill (or use buf.numpy())
                if torch is not None:
                    with torch.cuda.stream(stream):
                        device.copy_(buf.torch(), non_blocking=True)
                else:  # the host backend's stand-in for an async copy
                    stream.launch(bytes, buf.memoryview()[:16])
                buf.record_stream(stream)  # the block comes back once the copy is done
        await pool.synchronize(stream)
        elapsed = time.perf_counter() - t0

        s = pool.stats()
        print(f"200 x 16 MiB staged in {elapsed * 1e3:.0f} ms: "
              f"{s.num_host_alloc} blocks pinned, {s.cache_hits} cache hits, "
              f"reserved {s.reserved_bytes >> 20} MiB (peak {s.peak_reserved_bytes >> 20} MiB)")
        if torch is not None:
            assert int(device[0]) == 199 % 251
            print("device copy checked")


if __name__ == "__main__":
    asyncio.run(main())
