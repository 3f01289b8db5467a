"""Trimming idle memory: a bound on idle bytes and an idle age, unpinned off the loop."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from aiopinned import PinnedPool

from .conftest import RecordingBackend, until

pytestmark = pytest.mark.anyio
KB = 1024


async def test_idle_bytes_past_the_bound_are_unpinned_oldest_first(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording, max_idle_bytes=64 * KB) as pool:
        bufs = [await pool.allocate(32 * KB) for _ in range(4)]
        ptrs = [b.ptr for b in bufs]
        for buf in bufs:  # returned in this order: the first two are the oldest idle
            buf.free()
        await until(lambda: pool.stats().reserved_bytes == 64 * KB)  # (settled once unpinned)
        s = pool.stats()
        assert (s.free_blocks, s.cached_bytes, s.trimmed_bytes) == (2, 64 * KB, 64 * KB)
        assert s.reserved_bytes == 64 * KB
        again = {(await pool.allocate(32 * KB)).ptr for _ in range(2)}
        assert again == set(ptrs[2:])  # the newest stayed cached
        assert recording.free_threads and not set(recording.free_threads) & {
            pool._thread_id}  # fmt: skip


async def test_blocks_idle_past_the_timeout_are_unpinned() -> None:
    async with PinnedPool("host", idle_timeout_s=0.02) as pool:
        keep = await pool.allocate(KB)
        (await pool.allocate(2 * KB)).free()
        await until(lambda: pool.stats().reserved_bytes == KB)
        s = pool.stats()
        assert (s.free_blocks, s.reserved_bytes, s.active_bytes) == (0, KB, KB)
        keep.free()


async def test_trimming_while_waiters_queue_keeps_every_count_right() -> None:
    async with PinnedPool("host", max_bytes=64 * KB, max_idle_bytes=0) as pool:
        held = await pool.allocate(64 * KB)
        got = []
        async with anyio.create_task_group() as tg:

            async def wait_for_one() -> None:
                async with pool.buffer(64 * KB, timeout=30) as buf:
                    got.append(buf.ptr)

            tg.start_soon(wait_for_one)
            await wait_all_tasks_blocked()
            assert pool.stats().waiters == 1
            held.free()  # handed to the waiter, never idle: nothing to trim yet
        await until(lambda: pool.stats().free_blocks == 0 and pool.stats().reserved_bytes == 0)
        s = pool.stats()
        assert got == [held.ptr] and (s.waiters, s.active_bytes, s.trimmed_bytes) == (0, 0, 64 * KB)


def test_trimming_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        PinnedPool("host", idle_timeout_s=0)
    with pytest.raises(ValueError):
        PinnedPool("host", max_idle_bytes=-1)
    with pytest.raises(TypeError):
        PinnedPool("host", idle_timeout_s="1")  # type: ignore[arg-type]
