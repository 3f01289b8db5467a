"""PinnedPool.reserve: pinning into the cache before traffic arrives."""

from __future__ import annotations

import pytest

from aiopinned import PinnedPool, PoolClosed

from .conftest import RecordingBackend, cancel_a_held_reserve, until

pytestmark = pytest.mark.anyio
KB = 1024


async def test_reserved_blocks_serve_the_first_requests_from_the_cache() -> None:
    progress: list[tuple[int, int]] = []
    async with PinnedPool("host", max_bytes=512 * KB) as pool:

        def note(done: int, total: int) -> None:
            progress.append((done, total))

        got = await pool.reserve(256 * KB, block_bytes=64 * KB, progress=note)
        assert got == 256 * KB
        assert progress == [(256 * KB, 256 * KB)]  # one segment, carved into four blocks
        s = pool.stats()
        assert (s.free_blocks, s.reserved_bytes, s.num_host_alloc, s.cache_misses) == (
            4, 256 * KB, 1, 0)  # fmt: skip
        bufs = [await pool.allocate(64 * KB) for _ in range(4)]
        assert pool.stats().cache_hits == 4 and pool.stats().num_host_alloc == 1
        for buf in bufs:
            buf.free()


async def test_a_remainder_gets_a_block_of_its_own_and_one_block_is_the_default() -> None:
    async with PinnedPool("host") as pool:
        assert await pool.reserve(100 * KB, block_bytes=64 * KB) == 100 * KB
        assert (pool.stats().free_blocks, pool.stats().free_bytes) == (2, 100 * KB)
        assert (await pool.allocate(36 * KB)).capacity == 36 * KB  # the remainder's block
        assert await pool.reserve(10 * KB) == 10 * KB and pool.stats().free_blocks == 3
        assert await pool.reserve(0) == 0


async def test_reserve_stops_where_the_cap_is_full_and_unpins_nothing_for_it() -> None:
    async with PinnedPool("host", max_bytes=256 * KB) as pool:
        held = await pool.allocate(128 * KB)
        (await pool.allocate(64 * KB)).free()  # idle: reserve must not unpin it to make room
        assert await pool.reserve(128 * KB, block_bytes=32 * KB) == 64 * KB
        s = pool.stats()
        assert (s.reserved_bytes, s.free_blocks, s.num_host_free) == (256 * KB, 3, 0)
        held.free()
        with pytest.raises(ValueError, match="max_bytes"):
            await pool.reserve(512 * KB)


async def test_a_cancelled_reserve_keeps_what_it_pinned(recording: RecordingBackend) -> None:
    async with PinnedPool(recording, max_bytes=1024 * KB, segment_bytes=64 * KB) as pool:
        # the third block's pin is held, then the reserve is cancelled
        pinned = await cancel_a_held_reserve(pool, recording, 512 * KB, 64 * KB, 128 * KB, 3)
        assert pinned == [64 * KB, 128 * KB] and pool.stats().free_blocks == 2
        recording.alloc_gate.set()  # the block in flight is adopted, not lost
        await until(lambda: pool.stats().free_blocks == 3)
        assert pool.stats().reserved_bytes == 192 * KB


async def test_reserve_checks_its_arguments_and_the_pool() -> None:
    pool = PinnedPool("host")
    with pytest.raises(RuntimeError, match="not open"):
        await pool.reserve(KB)
    async with pool:
        with pytest.raises(ValueError):
            await pool.reserve(KB, block_bytes=0)
        with pytest.raises(TypeError):
            await pool.reserve(1.5)  # type: ignore[arg-type]
    with pytest.raises(PoolClosed):
        await pool.reserve(KB)
