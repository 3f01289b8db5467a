"""A short tour of aiopinned: stage data in pinned buffers, copy, free, and watch the cache work.

    python examples/quickstart.py

Runs on the GPU when torch sees one, else on the host backend (``_device.py`` has both).
"""

from __future__ import annotations

import asyncio
import time

import anyio
from _device import byte_sum, open_device, pick_backend

from aiopinned import PinnedPool


async def main() -> None:
    async with PinnedPool(pick_backend("auto"), max_bytes=256 << 20) as pool:
        device = await anyio.to_thread.run_sync(open_device, pool.backend)
        stream = device.stream()
        t0 = time.perf_counter()
        for step in range(200):
            async with pool.buffer(16 << 20) as buf:  # awaits a block if the cap is reached
                buf.numpy()[:] = step % 251  # fill it (NumPy, torch or memoryview)
                last = device.to_device(stream, device.view(buf, "uint8", (buf.nbytes,)))
                buf.record_stream(stream)  # freed now, reused once the copy is done
        await pool.synchronize(stream)  # await the device without blocking the loop
        elapsed = time.perf_counter() - t0

        s = pool.stats()
        print(
            f"200 x 16 MiB staged in {elapsed * 1e3:.0f} ms on {device.name}: "
            f"{s.num_host_alloc} blocks pinned, {s.cache_hits} cache hits, "
            f"reserved {s.reserved_bytes >> 20} MiB (peak {s.peak_reserved_bytes >> 20} MiB)"
        )
        assert byte_sum(device.numpy(last)) == (199 % 251) << 24, "the last copy is wrong"
        print("the last copy checked")


if __name__ == "__main__":
    asyncio.run(main())
