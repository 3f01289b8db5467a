"""Segments: one pinning carved into blocks (``reserve``), unpinned only as a whole, once all of
its blocks are idle; and reserves brought up in the background while the pool serves."""

from __future__ import annotations

import contextlib
import random
import threading
from itertools import pairwise

import anyio
import anyio.lowlevel
import pytest

from aiopinned import (
    CudaError,
    HostStream,
    PinnedBuffer,
    PinnedMemoryError,
    PinnedPool,
    PoolClosed,
    Reserving,
)
from aiopinned._cache import EMPTY_STEP_BLOCKS
from aiopinned._growth import MAX_CARVED, layout

from .conftest import RecordingBackend, cancel_a_held_reserve, until
from .faults import FaultBackend

pytestmark = pytest.mark.anyio
KB = 1024


def test_the_layout_fills_segments_with_whole_blocks_and_ends_with_the_remainder() -> None:
    assert list(layout(10 * KB, 3 * KB, 7 * KB)) == [[3 * KB] * 2, [3 * KB] * 1 + [KB]]
    assert list(layout(8 * KB, 4 * KB, KB)) == [[4 * KB], [4 * KB]]  # a block bigger: its own
    assert list(layout(12 * KB, 4 * KB, 8 * KB)) == [[4 * KB] * 2, [4 * KB]]
    assert list(layout(0, 0, KB)) == []
    small = list(layout((MAX_CARVED + 5) * 4 * KB, 4 * KB, 1 << 30))  # (bounded per segment)
    assert [len(p) for p in small] == [MAX_CARVED, 5]


async def test_a_tier_of_fixed_size_pages_costs_one_pin_per_segment() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, segment_bytes=64 * KB) as pool:
        done: list[int] = []
        got = await pool.reserve(200 * KB, block_bytes=8 * KB,
                                 progress=lambda d, t: done.append(d))  # fmt: skip
        s = pool.stats()
        assert got == 200 * KB and done == [64 * KB, 128 * KB, 192 * KB, 200 * KB]
        assert backend.calls["alloc"] == 4 and s.num_host_alloc == 4
        assert s.segments == 3  # (the last one holds one block: a block of its own)
        assert (s.free_blocks, s.free_bytes, s.reserved_bytes) == (25, 200 * KB, 200 * KB)
        assert s.reserved_bytes == backend.pinned_bytes()  # exactly what was asked: no rounding


async def test_carved_blocks_never_overlap_and_come_back_to_the_free_list() -> None:
    async with PinnedPool("host", segment_bytes=64 * KB) as pool:
        await pool.reserve(128 * KB, block_bytes=16 * KB)
        bufs = [await pool.allocate(16 * KB) for _ in range(8)]
        spans = sorted((b.ptr, b.ptr + b.capacity) for b in bufs)
        assert all(a[1] <= b[0] for a, b in pairwise(spans))
        assert {b.capacity for b in bufs} == {16 * KB} and pool.stats().cache_hits == 8
        assert pool.stats().num_host_alloc == 2  # served from the segments, nothing pinned
        for i, buf in enumerate(bufs):
            buf.numpy()[:] = i
        assert all((b.numpy() == i).all() for i, b in enumerate(bufs))
        stream = HostStream()
        bufs[0].record_stream(stream)
        for buf in bufs:
            buf.free()
        await until(lambda: pool.stats().free_blocks == 8)
        assert pool.stats().free_bytes == 128 * KB and pool.stats().active_bytes == 0
        assert pool.record_stream(bufs[1].ptr + 5, stream) is False  # idle: not a live block


async def test_a_segment_is_unpinned_only_once_all_its_blocks_are_idle() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, segment_bytes=32 * KB) as pool:
        await pool.reserve(64 * KB, block_bytes=8 * KB)  # two segments of four blocks
        held = await pool.allocate(8 * KB)  # from the first segment
        s = pool.stats()
        assert (s.segments, s.stranded_bytes) == (2, 24 * KB)
        assert await pool.empty_cache() == 32 * KB  # the other segment, whole
        s = pool.stats()
        assert (s.segments, s.free_blocks, s.stranded_bytes) == (1, 3, 24 * KB)
        assert backend.pinned_bytes() == s.reserved_bytes == 32 * KB
        again = [await pool.allocate(8 * KB) for _ in range(3)]  # its idle blocks still serve
        assert pool.stats().num_host_alloc == 2
        for buf in [held, *again]:
            buf.free()
        assert await pool.empty_cache() == 32 * KB
        assert backend.pinned_bytes() == pool.stats().reserved_bytes == 0
        assert backend.calls["free"] == 2  # one unpin per segment, never per block


async def test_growth_unpins_a_wholly_idle_segment_but_never_part_of_one() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, max_bytes=64 * KB, segment_bytes=32 * KB) as pool:
        await pool.reserve(64 * KB, block_bytes=8 * KB)
        held = await pool.allocate(8 * KB)
        big = await pool.allocate(32 * KB)  # only the idle segment can make room
        assert backend.calls["free"] == 1 and pool.stats().segments == 1
        assert backend.pinned_bytes() == pool.stats().reserved_bytes == 64 * KB
        with pytest.raises(TimeoutError):  # the other segment has a block out: it stays
            await pool.allocate(32 * KB, timeout=0.05)
        assert backend.calls["free"] == 1
        big.free()
        held.free()
        assert (await pool.allocate(64 * KB)).capacity == 64 * KB  # now both may go
        assert backend.pinned_bytes() == pool.stats().reserved_bytes == 64 * KB


async def test_trimming_unpins_whole_idle_segments() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, segment_bytes=32 * KB, max_idle_bytes=40 * KB) as pool:
        await pool.reserve(32 * KB, block_bytes=8 * KB)
        held = await pool.allocate(8 * KB)
        await pool.reserve(32 * KB, block_bytes=8 * KB)  # idle 56 KiB: one segment must go
        await until(lambda: backend.calls["free"] == 1)
        await until(lambda: pool.stats().reserved_bytes == 32 * KB)
        assert pool.stats().trimmed_bytes == 32 * KB and backend.pinned_bytes() == 32 * KB
        assert held.ptr < backend.pinned_bytes() + held.ptr  # (still usable)
        held.numpy()[:] = 7
        held.free()


async def test_trimming_held_back_by_segments_in_use_goes_on_as_blocks_come_back() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, segment_bytes=32 * KB, max_idle_bytes=40 * KB) as pool:
        await pool.reserve(32 * KB, block_bytes=8 * KB)  # segment A: 8 KiB blocks
        a = [await pool.allocate(8 * KB) for _ in range(3)]
        held = await pool.allocate(16 * KB)  # a block of its own
        await pool.reserve(32 * KB, block_bytes=4 * KB)  # segment B: 4 KiB blocks; 40 KiB idle
        b = await pool.allocate(4 * KB)
        a[0].free()
        a[1].free()  # 52 KiB idle, past the bound, but both segments have a block out
        s = pool.stats()
        assert (s.free_bytes, s.stranded_bytes, backend.calls["free"]) == (52 * KB, 52 * KB, 0)
        assert pool._trim._stuck  # (so a return looks at that block alone, sorting nothing)
        held.free()  # past the bound, and it can go
        await until(lambda: backend.calls["free"] == 1)
        a[2].free()  # A is whole again: it goes
        await until(lambda: backend.calls["free"] == 2)
        await until(lambda: pool.stats().reserved_bytes == 32 * KB == backend.pinned_bytes())
        b.free()  # 32 KiB idle: under the bound
        await anyio.sleep(0.05)
        s = pool.stats()
        assert (s.trimmed_bytes, s.segments, s.free_bytes, backend.calls["free"]) == (
            48 * KB, 1, 32 * KB, 2)  # fmt: skip


async def test_a_failed_segment_unpin_keeps_all_its_blocks_counted() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, segment_bytes=32 * KB) as pool:
        await pool.reserve(32 * KB, block_bytes=8 * KB)
        backend.fail_at["free"] = {1}
        with pytest.raises(Exception, match="free call 1 failed"):
            await pool.empty_cache()
        s = pool.stats()
        assert (s.free_blocks, s.segments, s.reserved_bytes) == (4, 1, 32 * KB)
        assert backend.pinned_bytes() == 32 * KB
        assert await pool.empty_cache() == 32 * KB and backend.pinned_bytes() == 0


async def test_close_with_a_carved_block_out_unpins_its_segment_once_it_is_freed() -> None:
    backend = FaultBackend()
    pool = await PinnedPool(backend, segment_bytes=32 * KB).open()
    await pool.reserve(64 * KB, block_bytes=8 * KB)
    held = await pool.allocate(8 * KB)
    with pytest.warns(ResourceWarning):
        await pool.aclose()
    assert backend.pinned_bytes() == 32 * KB  # the segment with a block out stays
    held.free()
    await until(lambda: backend.pinned_bytes() == 0)
    assert backend.calls["free"] == 2


async def test_a_cancelled_reserve_keeps_whole_segments(recording: RecordingBackend) -> None:
    async with PinnedPool(recording, segment_bytes=32 * KB) as pool:
        # the second segment's pin is held, then the reserve is cancelled
        await cancel_a_held_reserve(pool, recording, 128 * KB, 4 * KB, 32 * KB, 2)
        assert pool.stats().free_blocks == 8  # the first segment, all of it
        recording.alloc_gate.set()  # the segment in flight is adopted, whole
        await until(lambda: pool.stats().free_blocks == 16)
        assert pool.stats().reserved_bytes == 64 * KB and pool.stats().segments == 2


async def test_a_background_reserve_serves_meanwhile_and_says_how_far_it_got(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording, segment_bytes=32 * KB) as pool:
        (await pool.allocate(4 * KB)).free()  # what the server pinned already
        recording.alloc_gate = threading.Event()
        job = pool.start_reserve(96 * KB, block_bytes=8 * KB)
        assert isinstance(job, Reserving) and not job.done()
        await until(lambda: len(recording.alloc_threads) == 2)
        s = pool.stats()
        assert (s.reserve_target_bytes, s.reserve_done_bytes) == (96 * KB, 0)
        with anyio.fail_after(5):  # the loop serves from what is pinned while the pin runs
            for _ in range(100):
                (await pool.allocate(4 * KB)).free()
        recording.alloc_gate.set()
        assert await job == 96 * KB and job.done() and job.done_bytes == 96 * KB
        s = pool.stats()
        assert (s.reserve_target_bytes, s.reserve_done_bytes, s.segments) == (0, 0, 3)
        assert await job.wait() == 96 * KB  # (again: the same outcome)


async def test_a_background_reserve_cancelled_or_closed_keeps_what_it_pinned(
    recording: RecordingBackend,
) -> None:
    pool = await PinnedPool(recording, segment_bytes=32 * KB).open()
    recording.alloc_gate = threading.Event()
    recording.alloc_gate.set()
    gate = recording.alloc_gate

    def hold_the_second(done: int, total: int) -> None:
        if done == 32 * KB:
            gate.clear()

    job = pool.start_reserve(128 * KB, block_bytes=8 * KB, progress=hold_the_second)
    await until(lambda: len(recording.alloc_threads) == 2)
    job.cancel()
    recording.alloc_gate.set()
    assert await job == 32 * KB and job.cancelled()
    await until(lambda: pool.stats().segments == 2)  # (the one in flight, adopted)
    second = pool.start_reserve(64 * KB, block_bytes=8 * KB)
    await pool.aclose()  # cancels it: it raises PoolClosed, and nothing stays pinned
    with pytest.raises(PoolClosed):
        await second
    assert not recording._maps and pool.stats().reserved_bytes == 0


async def test_background_reserve_checks_its_arguments_at_once() -> None:
    async with PinnedPool("host", max_bytes=64 * KB) as pool:
        with pytest.raises(ValueError, match="max_bytes"):
            pool.start_reserve(128 * KB)
        with pytest.raises(TypeError):
            pool.start_reserve(KB, progress=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="block_bytes"):
            pool.start_reserve(KB, block_bytes=0)
    with pytest.raises(ValueError, match="segment_bytes"):
        PinnedPool("host", segment_bytes=0)
    with pytest.raises(TypeError, match="segment_bytes"):
        PinnedPool("host", segment_bytes=1.5)  # type: ignore[arg-type]


async def test_random_faults_with_segments_keep_the_counts() -> None:
    import random

    rng = random.Random(5)
    backend = FaultBackend(seed=5, rate=0.05, random_ops=("alloc", "free", "record"))
    streams = [HostStream() for _ in range(2)]
    async with PinnedPool(backend, max_bytes=256 * KB, segment_bytes=32 * KB) as pool:
        live, errors = [], 0
        for _ in range(400):
            try:
                r = rng.random()
                if r < 0.1:
                    await pool.reserve(rng.choice([16, 48, 96]) * KB, block_bytes=rng.choice(
                        [2 * KB, 4 * KB, 3 * KB]))  # fmt: skip
                elif r < 0.15:
                    await pool.empty_cache()
                elif live and r < 0.55:
                    buf = live.pop(rng.randrange(len(live)))
                    if rng.random() < 0.5:
                        buf.record_stream(rng.choice(streams))
                    buf.free()
                else:
                    live.append(await pool.allocate(rng.choice([KB, 2 * KB, 4 * KB, 20 * KB]),
                                                    timeout=0))  # fmt: skip
            except (CudaError, PinnedMemoryError, TimeoutError):
                errors += 1
            spans = sorted((b.ptr, b.ptr + b.capacity) for b in live)
            assert all(a[1] <= b[0] for a, b in pairwise(spans))
            assert pool.stats().reserved_bytes <= 256 * KB
        for buf in live:
            buf.free()
        for stream in streams:
            stream.synchronize()
        await until(lambda: pool.stats().pending_events == 0)
        await until(lambda: pool.stats().reserved_bytes == backend.pinned_bytes())
        assert pool.stats().active_bytes == 0 and sum(backend.failures.values()) > 0 < errors
        backend.rate = 0.0  # (the close unpins everything)
    assert backend.pinned_bytes() == pool.stats().reserved_bytes == 0


async def test_a_tier_of_many_pages_freed_in_any_order_comes_back_whole() -> None:
    async with PinnedPool("host") as pool:
        n = 3000
        await pool.reserve(n * 4096, block_bytes=4096)
        bufs = [await pool.allocate(4096) for _ in range(n)]
        assert len({b.ptr for b in bufs}) == n and pool.stats().num_host_alloc == 3
        random.Random(4).shuffle(bufs)
        for buf in bufs:
            buf.free()  # (the hit path's append, and the sorted container's insert)
        s = pool.stats()
        assert (s.free_blocks, s.free_bytes, s.active_requests) == (n, n * 4096, 0)
        again = [await pool.allocate(4096) for _ in range(n)]
        assert [b.ptr for b in again] == sorted(b.ptr for b in again)
        assert pool.stats().num_host_alloc == 3
        for buf in again:
            buf.free()


async def test_empty_cache_of_a_large_tier_goes_in_steps_with_the_loop_running_between() -> None:
    backend, page = FaultBackend(), 4096
    async with PinnedPool(backend, segment_bytes=MAX_CARVED * page) as pool:
        n = 6 * MAX_CARVED  # six segments: three steps of EMPTY_STEP_BLOCKS (two segments)
        await pool.reserve(n * page, block_bytes=page)
        pins = backend.calls["alloc"]
        ticks: list[int] = []
        taken: list[PinnedBuffer] = []

        async def meanwhile() -> None:  # runs between the steps, and takes a page mid-way
            while not done:
                ticks.append(backend.calls["free"])
                if backend.calls["free"] == 2 and not taken:
                    taken.append(await pool.allocate(page))
                await anyio.lowlevel.checkpoint()

        done = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(meanwhile)
            await anyio.lowlevel.checkpoint()
            got = await pool.empty_cache()
            done = True
        assert n // MAX_CARVED == pins == 6 and EMPTY_STEP_BLOCKS == 2 * MAX_CARVED
        assert {0, 2, 4} <= set(ticks)  # the loop ran after each step of two segments
        s = pool.stats()
        assert got == 5 * MAX_CARVED * page == (n * page) - s.reserved_bytes
        assert backend.calls["free"] == 5 and s.segments == 1  # the page's segment stays
        assert s.stranded_bytes == (MAX_CARVED - 1) * page == s.free_bytes
        assert backend.pinned_bytes() == s.reserved_bytes
        taken[0].free()
        assert await pool.empty_cache() == MAX_CARVED * page and backend.pinned_bytes() == 0


@pytest.mark.parametrize("seed", range(20))
async def test_background_reserves_cancels_faults_and_close_leave_nothing_pinned(
    seed: int,
) -> None:
    """Random background reserves, cancels, allocations, frees and empty_cache under faults and a
    cap, then a close: no overlap and the cap at every step, nothing pinned at the end."""
    rng = random.Random(seed)
    backend = FaultBackend(seed=seed, rate=rng.choice([0.0, 0.05]), random_ops=("alloc", "free"))
    cap = rng.choice([None, 256 * KB])
    pool = await PinnedPool(backend, max_bytes=cap, segment_bytes=rng.choice([8 * KB, 32 * KB]),
                            max_idle_bytes=rng.choice([None, 64 * KB])).open()  # fmt: skip
    jobs: list[Reserving] = []
    live: list[PinnedBuffer] = []
    for _ in range(rng.randrange(5, 40)):
        r = rng.random()
        try:
            if r < 0.2:
                page = rng.choice([KB, 3 * KB, 4 * KB])
                jobs.append(pool.start_reserve(rng.choice([16, 40, 100]) * KB, block_bytes=page))
            elif r < 0.3 and jobs:
                rng.choice(jobs).cancel()
            elif r < 0.6:
                live.append(await pool.allocate(rng.choice([KB, 4 * KB, 9 * KB]), timeout=0.01))
            elif r < 0.85 and live:
                live.pop(rng.randrange(len(live))).free()
            elif r < 0.9:
                await pool.empty_cache()
            else:
                await anyio.sleep(rng.random() * 0.002)
        except (TimeoutError, CudaError, PinnedMemoryError):
            pass
        spans = sorted((b.ptr, b.ptr + b.capacity) for b in live)
        assert all(a[1] <= b[0] for a, b in pairwise(spans))
        assert cap is None or pool.stats().reserved_bytes <= cap
    backend.rate = 0.0
    for buf in live[: len(live) // 2]:
        buf.free()
    with pytest.warns(ResourceWarning) if live[len(live) // 2 :] else contextlib.nullcontext():
        await pool.aclose()
    for job in jobs:
        with contextlib.suppress(PoolClosed, CudaError, PinnedMemoryError):
            await job
        assert job.done()
    for buf in live[len(live) // 2 :]:
        buf.free()
    await until(lambda: backend.pinned_bytes() == 0)
