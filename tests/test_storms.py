"""Storms on asyncio, uvloop and trio, with and without a reserved tier (segments carved into
blocks): ``free()`` from 8 threads while the loop allocates,
``allocate_blocking`` from threads, and random timeouts and cancellations under a tight cap, all
at once.  Afterwards nothing is active, nobody waits, the cap held, and the whole cap can be
allocated again.  ``AIOPINNED_STORM_OPS`` sets the operations per storm (10^5 by default)."""

from __future__ import annotations

import os
import queue
import random

import anyio
import pytest

from aiopinned import PinnedBuffer, PinnedPool

from .conftest import until

pytestmark = pytest.mark.anyio
KB = 1024
CAP = 128 * KB
SIZES = [100, KB, 3 * KB, 4 * KB, 10 * KB, 16 * KB]
OPS = int(os.environ.get("AIOPINNED_STORM_OPS", "100000"))


@pytest.mark.parametrize("tier", [False, True], ids=["blocks", "tier"])
async def test_storm(anyio_backend: tuple[str, dict[str, bool]], tier: bool) -> None:
    rng = random.Random(7)
    ops = dict.fromkeys(["loop allocs", "thread frees", "blocking", "tries", "frees", "timeouts",
                         "cancelled"], 0)  # fmt: skip
    share = OPS // 4  # each op below counts an allocation and its free as two
    async with PinnedPool("host", max_bytes=CAP, segment_bytes=16 * KB) as pool:
        if tier:  # half the cap reserved first: segments carved into 4 KiB blocks
            assert await pool.reserve(CAP // 2, block_bytes=4 * KB) == CAP // 2
        freers = [queue.SimpleQueue[PinnedBuffer | None]() for _ in range(8)]

        def free_in_thread(q: queue.SimpleQueue[PinnedBuffer | None]) -> None:
            while (buf := q.get()) is not None:
                buf.free()
                ops["thread frees"] += 1  # (GIL-atomic enough for a count: one writer each)

        def allocate_in_thread(n: int, seed: int) -> None:
            r = random.Random(seed)
            for _ in range(n):
                pool.allocate_blocking(r.choice(SIZES), timeout=60).free()
            ops["blocking"] += n

        async def loop_allocator() -> None:
            for i in range(share):
                buf = await pool.allocate(rng.choice(SIZES), timeout=60)
                freers[i % 8].put(buf)
                ops["loop allocs"] += 1
            for q in freers:
                q.put(None)

        async def chaos() -> None:
            async def one(timeout: float | None, scope: anyio.CancelScope) -> None:
                ops["tries"] += 1
                with scope:
                    try:
                        buf = await pool.allocate(rng.choice(SIZES), timeout=timeout)
                    except TimeoutError:
                        ops["timeouts"] += 1
                        return
                    try:
                        await anyio.lowlevel.checkpoint()
                    finally:
                        buf.free()
                        ops["frees"] += 1
                if scope.cancelled_caught:
                    ops["cancelled"] += 1

            while ops["tries"] + ops["frees"] < share:
                async with anyio.create_task_group() as tg:
                    scopes = [anyio.CancelScope() for _ in range(64)]
                    for scope in scopes:
                        tg.start_soon(one, rng.choice([None, 0, 0.0001, 0.001]), scope)
                    await anyio.lowlevel.checkpoint()
                    for scope in rng.sample(scopes, 12):  # some waiting, some holding a buffer
                        scope.cancel()

        async with anyio.create_task_group() as tg:
            for q in freers:
                tg.start_soon(anyio.to_thread.run_sync, free_in_thread, q)
            for k in range(4):
                tg.start_soon(anyio.to_thread.run_sync, allocate_in_thread, share // 8, k)
            tg.start_soon(loop_allocator)
            tg.start_soon(chaos)

        await until(lambda: pool.stats().active_requests == 0, timeout=60)
        s = pool.stats()
        total = ops["loop allocs"] + ops["thread frees"] + 2 * ops["blocking"]
        total += ops["tries"] + ops["frees"]
        loop = "uvloop" if anyio_backend[1].get("use_uvloop") else anyio_backend[0]
        print(f"\n{loop} storm: {ops}, about {total} operations, {s.num_waits} waits")
        assert total >= OPS * 0.99
        assert ops["thread frees"] == ops["loop allocs"] == share and ops["blocking"] == share // 2
        assert ops["timeouts"] > 0 and ops["cancelled"] > 0 and s.num_waits > 0
        assert (s.active_bytes, s.active_requests, s.waiters, s.pending_events) == (0, 0, 0, 0)
        assert s.peak_reserved_bytes <= CAP
        for size in (CAP, CAP // 2, 10 * KB, 3 * KB, 100):  # the whole cap, in any size
            block = 1 << (size - 1).bit_length()
            bufs = [await pool.allocate(size, timeout=30) for _ in range(CAP // block)]
            assert sum(b.capacity for b in bufs) == CAP and pool.stats().reserved_bytes <= CAP
            for b in bufs:
                b.free()
