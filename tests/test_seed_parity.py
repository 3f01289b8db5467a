"""The seed's behaviours (PyTorch's CachingHostAllocatorImpl), one test each, on the host backend.

Read top to bottom, this is the seed-parity table: allocate, free, record_event, process_events,
empty_cache, copy_data, and what the event loop adds to them.
"""

from __future__ import annotations

import gc
import threading

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from aiopinned import (
    HostStream,
    InvalidBufferError,
    PinnedBuffer,
    PinnedPool,
    PoolClosed,
)

from .conftest import Gate, RecordingBackend, until

pytestmark = pytest.mark.anyio


# -- allocate ----------------------------------------------------------------------------------
async def test_zero_bytes_gives_an_empty_buffer_whose_free_is_a_no_op() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(0)
        assert (buf.ptr, buf.nbytes, buf.capacity) == (0, 0, 0)
        assert len(buf.memoryview()) == 0
        buf.free()
        buf.free()
        assert pool.stats().num_host_alloc == 0


async def test_growth_rounds_up_to_a_power_of_two() -> None:
    async with PinnedPool("host", rounding="pow2") as pool:
        sizes = {n: (await pool.allocate(n)).capacity for n in (1, 1000, 1024, 1025, 5000)}
        assert sizes == {1: 1, 1000: 1024, 1024: 1024, 1025: 2048, 5000: 8192}


async def test_reuse_takes_the_smallest_free_block_that_fits() -> None:
    async with PinnedPool("host", rounding="pow2") as pool:
        bufs = [await pool.allocate(n) for n in (4000, 1000, 2000)]  # 4096, 1024, 2048
        by_cap = {b.capacity: b.ptr for b in bufs}
        for b in bufs:
            b.free()
        assert (await pool.allocate(1500)).ptr == by_cap[2048]
        assert (await pool.allocate(10)).ptr == by_cap[1024]
        assert (await pool.allocate(2049)).ptr == by_cap[4096]
        assert pool.stats().cache_hits == 3


async def test_reuse_never_takes_a_block_smaller_than_the_request() -> None:
    async with PinnedPool("host") as pool:
        small = await pool.allocate(4096)
        small.free()
        big = await pool.allocate(4097)
        assert big.ptr != small.ptr and big.capacity == 8192
        assert pool.stats().num_host_alloc == 2


async def test_equal_sizes_are_reused_in_address_order() -> None:
    async with PinnedPool("host") as pool:
        bufs = [await pool.allocate(1024) for _ in range(4)]
        ptrs = sorted(b.ptr for b in bufs)
        for b in reversed(bufs):
            b.free()
        again = [(await pool.allocate(1024)).ptr for _ in range(4)]
        assert again == ptrs


@pytest.mark.parametrize("bad", [1.0, "1", None, b"1", [1]])
async def test_sizes_that_are_not_int_raise_type_error(bad: object) -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(TypeError):
            await pool.allocate(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pool.allocate_nowait(bad)  # type: ignore[arg-type]


async def test_bool_is_not_a_size_but_numpy_ints_are() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(TypeError):
            await pool.allocate(True)
        assert (await pool.allocate(np.int64(100))).nbytes == 100


async def test_negative_sizes_raise_value_error() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(ValueError):
            await pool.allocate(-1)


async def test_bad_timeouts_raise_at_once() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(TypeError):
            await pool.allocate(10, timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await pool.allocate(10, timeout=-1)
        with pytest.raises(ValueError):
            await pool.allocate(10, timeout=float("nan"))


async def test_growth_and_release_run_off_the_loop_thread(recording: RecordingBackend) -> None:
    async with PinnedPool(recording) as pool:
        loop_thread = threading.get_ident()
        (await pool.allocate(1 << 20)).free()
        assert await pool.empty_cache() == 1 << 20
        assert recording.alloc_threads and recording.free_threads
        assert loop_thread not in recording.alloc_threads + recording.free_threads


# -- free --------------------------------------------------------------------------------------
async def test_free_without_streams_returns_the_block_at_once() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(100)
        pool.free(buf)
        s = pool.stats()
        assert (s.free_blocks, s.active_requests, s.active_bytes, s.pending_events) == (1, 0, 0, 0)


async def test_free_with_a_stream_waits_for_its_event() -> None:
    async with PinnedPool("host") as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)  # the "copy" that reads the buffer is still running
        buf = await pool.allocate(100)
        assert buf.record_stream(stream)
        buf.free()
        assert pool.stats().pending_events == 1
        assert pool.process_events() == 0
        other = await pool.allocate(100)
        assert other.ptr != buf.ptr  # not handed out while the copy may read it
        gate.open()
        stream.synchronize()  # blocking, without yielding: the watcher's report cannot land yet
        assert pool.process_events() == 1
        assert (await pool.allocate(100)).ptr == buf.ptr


async def test_a_block_used_on_two_streams_comes_back_after_both() -> None:
    async with PinnedPool("host") as pool:
        (a, gate_a), (b, gate_b) = (HostStream(), Gate()), (HostStream(), Gate())
        a.launch(gate_a)
        b.launch(gate_b)
        buf = await pool.allocate(64)
        buf.record_stream(a)
        buf.record_stream(b)
        buf.record_stream(a)  # a stream counts once
        buf.free()
        assert pool.stats().pending_events == 2
        gate_a.open()
        a.synchronize()
        assert pool.process_events() == 0
        assert pool.stats().free_blocks == 0
        gate_b.open()
        b.synchronize()
        assert pool.process_events() == 1
        assert pool.stats().free_blocks == 1


async def test_the_watcher_returns_blocks_without_process_events() -> None:
    async with PinnedPool("host") as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        buf = await pool.allocate(64)
        buf.record_stream(stream)
        buf.free()
        gate.open()
        await until(lambda: pool.stats().free_blocks == 1)
        assert pool.stats().pending_events == 0


async def test_a_second_free_raises_invalid_buffer_error() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(64)
        buf.free()
        with pytest.raises(InvalidBufferError):
            buf.free()
        with pytest.raises(InvalidBufferError):
            pool.free(buf)


async def test_free_of_another_pools_buffer_is_refused() -> None:
    async with PinnedPool("host") as one, PinnedPool("host") as two:
        buf = await one.allocate(64)
        with pytest.raises(InvalidBufferError):
            two.free(buf)
        with pytest.raises(TypeError):
            two.free(object())  # type: ignore[arg-type]


async def test_free_from_another_thread_hops_to_the_loop() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(64)
        await anyio.to_thread.run_sync(buf.free)
        await until(lambda: pool.stats().free_blocks == 1)
        with pytest.raises(InvalidBufferError):
            await anyio.to_thread.run_sync(buf.free)


async def test_a_buffer_dropped_without_free_is_freed() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(64)
        del buf
        gc.collect()
        await until(lambda: pool.stats().free_blocks == 1)
        assert pool.stats().active_requests == 0


# -- record_stream (the seed's record_event) ---------------------------------------------------
async def test_record_stream_accepts_buffers_pointers_and_array_likes() -> None:
    async with PinnedPool("host") as pool:
        s = HostStream()
        buf = await pool.allocate(4096)
        arr = buf.numpy()
        assert pool.record_stream(buf, s)
        assert pool.record_stream(buf.ptr, s)
        assert pool.record_stream(buf.ptr + 4000, s)  # anywhere inside the block
        assert pool.record_stream(arr[100:], s)  # __array_interface__
        torch = pytest.importorskip("torch")
        assert pool.record_stream(buf.torch(torch.float32)[7:], s)  # data_ptr()


async def test_record_stream_answers_false_for_memory_that_is_not_the_pools() -> None:
    async with PinnedPool("host") as pool:
        s = HostStream()
        buf = await pool.allocate(1000)  # a 1024-byte block
        foreign = np.zeros(16)
        assert not pool.record_stream(foreign, s)
        assert not pool.record_stream(buf.ptr + 1024, s)  # one past the block
        assert not pool.record_stream(12345, s)
        async with PinnedPool("host") as other:
            assert not other.record_stream(buf, s)
        idle = await pool.allocate(8)
        ptr = idle.ptr
        idle.free()
        assert not pool.record_stream(ptr, s)  # idle, not a live allocation


async def test_record_stream_rejects_bad_arguments() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(8)
        with pytest.raises(TypeError):
            pool.record_stream(buf, "stream")
        with pytest.raises(TypeError):
            pool.record_stream("buffer", None)
        with pytest.raises(ValueError):
            pool.record_stream(-8, None)
        buf.free()
        with pytest.raises(InvalidBufferError):
            buf.record_stream(None)


async def test_process_events_counts_the_blocks_that_came_back() -> None:
    async with PinnedPool("host") as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        for _ in range(3):
            buf = await pool.allocate(64)
            buf.record_stream(stream)
            buf.free()
        gate.open()
        stream.synchronize()
        assert pool.process_events() == 3
        assert pool.stats().free_blocks == 3


# -- empty_cache, copy_data, synchronize -------------------------------------------------------
async def test_empty_cache_releases_every_idle_block_and_only_those() -> None:
    async with PinnedPool("host") as pool:
        keep = await pool.allocate(4096)
        for n in (100, 2000):
            (await pool.allocate(n)).free()
        assert await pool.empty_cache() == 128 + 2048
        s = pool.stats()
        assert (s.free_blocks, s.reserved_bytes, s.num_host_free) == (0, 4096, 2)
        keep.numpy()[:] = 1  # still ours


async def test_empty_cache_first_collects_finished_events() -> None:
    async with PinnedPool("host") as pool:
        stream = HostStream()
        buf = await pool.allocate(64)
        buf.record_stream(stream)
        buf.free()
        await anyio.to_thread.run_sync(stream.synchronize)
        assert await pool.empty_cache() == 64
        assert pool.stats().reserved_bytes == 0


async def test_copy_data_copies_between_addresses() -> None:
    async with PinnedPool("host") as pool:
        a, b = await pool.allocate(16), await pool.allocate(16)
        a.numpy()[:] = np.arange(16, dtype=np.uint8)
        pool.copy_data(b.ptr, a.ptr, 16)
        assert b.numpy().tolist() == list(range(16))
        with pytest.raises(TypeError):
            pool.copy_data(b.ptr, a.ptr, 1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            pool.copy_data(0, a.ptr, 4)


async def test_synchronize_awaits_the_work_queued_on_a_stream() -> None:
    async with PinnedPool("host") as pool:
        stream, gate, ran = HostStream(), Gate(), []
        stream.launch(gate)
        stream.launch(ran.append, 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.synchronize, stream)
            await anyio.lowlevel.checkpoint()
            assert ran == []
            gate.open()
        assert ran == [1]


# -- the pool's life ---------------------------------------------------------------------------
async def test_the_pool_says_which_backend_auto_chose(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="aiopinned")
    async with PinnedPool() as pool:
        assert pool.backend in ("cuda", "host")
        assert f"auto backend chose {pool.backend}" in caplog.text
        assert pool.stats().backend == pool.backend


async def test_closing_releases_idle_memory_and_refuses_new_allocations(
    recording: RecordingBackend,
) -> None:
    pool = PinnedPool(recording)
    async with pool:
        (await pool.allocate(100)).free()
    assert pool.closed and pool.stats().reserved_bytes == 0
    assert pool.stats().num_host_free == 1
    with pytest.raises(PoolClosed):
        await pool.allocate(10)
    with pytest.raises(PoolClosed):
        pool.allocate_nowait(10)


async def test_buffers_out_at_close_are_released_when_freed(recording: RecordingBackend) -> None:
    stream, gate = HostStream(), Gate()
    async with PinnedPool(recording) as pool:
        plain = await pool.allocate(100)
        used = await pool.allocate(100)
    stream.launch(gate)
    used.record_stream(stream)
    plain.free()
    await anyio.to_thread.run_sync(recording.freed.acquire)
    used.free()
    assert await anyio.to_thread.run_sync(recording.synchronizing.wait, 30)  # waiting on its stream
    assert not recording.freed.acquire(blocking=False)  # ...which still runs: not unpinned
    gate.open()
    await anyio.to_thread.run_sync(recording.freed.acquire)
    assert pool.stats().reserved_bytes == 0


async def test_close_waits_for_blocks_whose_copies_are_running(recording: RecordingBackend) -> None:
    stream = HostStream()
    async with PinnedPool(recording) as pool:
        buf = await pool.allocate(100)
        buf.record_stream(stream)
        stream.launch(lambda: None)
        buf.free()
    assert pool.stats().num_host_free == 1 and pool.stats().reserved_bytes == 0


async def test_a_pool_opens_once_and_must_be_open_to_allocate() -> None:
    pool = PinnedPool("host")
    with pytest.raises(RuntimeError, match="not open"):
        await pool.allocate(10)
    async with pool:
        pass
    with pytest.raises(RuntimeError, match="opens once"):
        await pool.open()


def test_constructor_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        PinnedPool("gpu")
    with pytest.raises(TypeError):
        PinnedPool(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PinnedPool("host", max_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PinnedPool("host", max_bytes=0)


async def test_stats_is_a_frozen_snapshot_with_the_torch_names() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(1000)
        s = pool.stats()
        with pytest.raises(AttributeError):
            s.reserved_bytes = 0  # type: ignore[misc]
        d = s.as_dict()
        for name in [
            "reserved_bytes",
            "active_bytes",
            "active_requests",
            "free_blocks",
            "pending_events",
            "waiters",
            "num_host_alloc",
            "num_host_free",
            "cache_hits",
            "cache_misses",
            "peak_reserved_bytes",
            "host_alloc_time_us_total",
            "host_alloc_time_us_max",
            "host_free_time_us_total",
        ]:
            assert name in d
        assert (s.active_bytes, s.active_requests, s.cache_misses, s.num_host_alloc) == (
            1024,
            1,
            1,
            1,
        )
        assert s.host_alloc_time_us_total > 0
        buf.free()
        assert pool.stats().peak_reserved_bytes == 1024


async def test_buffer_context_managers_free_on_exit() -> None:
    async with PinnedPool("host") as pool:
        async with pool.buffer(100) as buf:
            assert isinstance(buf, PinnedBuffer) and buf.nbytes == 100
        assert buf.freed and pool.stats().free_blocks == 1
        async with await pool.allocate(100) as buf2:
            pass
        assert buf2.freed
        with pytest.raises(ZeroDivisionError):
            async with pool.buffer(10) as buf3:
                raise ZeroDivisionError("raised inside the block")
        assert buf3.freed
