"""PinnedPages on the host backend: many pages moved per call, exactly the bytes asked, in the
stream's order; pages back to the pool only once that stream has run the copies; bad pieces
refused before anything is queued."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import numpy as np
import pytest

from aiopinned import HostStream, InvalidBufferError, PinnedPages, PinnedPool

from .conftest import until

pytestmark = pytest.mark.anyio
KB = 1024
PAGE = 4 * KB


def gated() -> tuple[HostStream, threading.Event]:
    stream, gate = HostStream(), threading.Event()
    stream.launch(gate.wait, 30)
    return stream, gate


async def test_pages_are_one_carved_tier_and_move_exactly_the_bytes_asked() -> None:
    async with PinnedPool("host", segment_bytes=64 * KB) as pool:
        pages = await PinnedPages.allocate(pool, 32, PAGE)
        s = pool.stats()
        assert (len(pages), s.num_host_alloc, s.segments, s.active_requests) == (32, 2, 2, 32)
        device = np.zeros((40, PAGE), dtype=np.uint8)  # the host backend's "device" memory
        for i in range(32):
            pages[i].numpy()[:] = i + 1
        stream = HostStream()
        picks = [5, 0, 31, 7]
        slots = [device[k].ctypes.data for k in (2, 9, 0, 39)]
        assert pages.to_device(picks, slots, stream) == 4 * PAGE
        stream.synchronize()
        assert [int(device[k, 0]) for k in (2, 9, 0, 39)] == [6, 1, 32, 8]
        assert (device[[2, 9, 0, 39]] == np.array([6, 1, 32, 8])[:, None]).all()
        assert not device[1].any()  # and nothing else
        # part of a page each, sizes per piece, back the other way
        device[3] = 200
        device[4] = 201
        got = pages.from_device([device[3].ctypes.data, device[4].ctypes.data], [10, 11],
                                stream, nbytes=[100, PAGE])  # fmt: skip
        stream.synchronize()
        assert got == 100 + PAGE
        assert (pages[10].numpy()[:100] == 200).all() and (pages[10].numpy()[100:] == 11).all()
        assert (pages[11].numpy() == 201).all()
        assert pages.to_device([], [], stream) == 0
        pages.free()
        assert pool.stats().active_requests == 0


async def test_copies_run_in_the_streams_order_and_pages_wait_for_them() -> None:
    async with PinnedPool("host", segment_bytes=64 * KB) as pool:
        pages = await PinnedPages.allocate(pool, 8, PAGE)
        device = np.zeros((8, PAGE), dtype=np.uint8)
        stream, gate = gated()
        for i in range(8):
            pages[i].numpy()[:] = 9
        pages.to_device(range(8), [device[i].ctypes.data for i in range(8)], stream)
        stream.launch(lambda: device.__setitem__((0, 0), 77))  # queued after the batch
        for i in range(8):
            pages[i].numpy()[:] = 1  # (the stream has not run: it still reads what is there)
        pages.free()  # while the copies wait: the pages must not come back yet
        assert not device.any()
        s = pool.stats()
        assert (s.active_requests, s.free_blocks, s.pending_events) == (0, 0, 8)
        gate.set()
        await until(lambda: pool.stats().free_blocks == 8)
        assert (device[:, 1:] == 1).all() and device[0, 0] == 77  # in order, after the batch
        pages.free()  # (again: nothing)


async def test_bad_pieces_are_refused_before_anything_is_queued() -> None:
    async with PinnedPool("host") as pool:
        with PinnedPages(pool, [await pool.allocate(PAGE) for _ in range(4)]) as pages:
            device = np.zeros((4, PAGE), dtype=np.uint8)
            d = [device[i].ctypes.data for i in range(4)]
            stream, gate = gated()
            bad: list[tuple[object, str]] = [
                (lambda: pages.to_device([4], d[:1], stream), "page 4 is out of range"),
                (lambda: pages.to_device([0], d[:1], stream, nbytes=PAGE + 1), "out of a page"),
                (lambda: pages.to_device([0], d[:1], stream, nbytes=0), "out of a page"),
                (lambda: pages.to_device([0, 1], [d[0], 0], stream), "piece 1: the device ad"),
                (lambda: pages.to_device([0, 1], [d[0], d[0] + 9], stream), "0 and 1 write overl"),
                (lambda: pages.from_device(d[:2], [2, 2], stream), "both write page 2"),
                (lambda: pages.to_device([0, 1], d[:1], stream), "one each per piece"),
                (lambda: pages.to_device([-1], d[:1], stream), "negative"),
                (lambda: pages.to_device([0], d[:1], stream, method="dma"), "method must be"),
            ]  # fmt: skip
            for call, says in bad:
                with pytest.raises(ValueError, match=says):
                    call()  # type: ignore[operator]
            with pytest.raises(TypeError, match="ints"):
                pages.to_device([0.5], d[:1], stream)
            with pytest.raises(TypeError, match="HostStream"):
                pages.to_device([0], d[:1], None)
            gate.set()
            stream.synchronize()  # nothing was queued behind the gate
            assert not device.any()
        with pytest.raises(InvalidBufferError, match="freed"):
            pages.to_device([0], d[:1], stream)
        odd = [await pool.allocate(PAGE), await pool.allocate(2 * PAGE)]
        with pytest.raises(ValueError, match="same size from the same pool"):
            PinnedPages(pool, odd)
        for buf in odd:
            buf.free()


async def test_a_large_table_is_given_back_a_chunk_at_a_time() -> None:
    from aiopinned.pages import _table

    async with PinnedPool("host") as pool:
        pages = await PinnedPages.allocate(pool, 2 * _table.CHUNK + 5, PAGE)
        stream = HostStream()
        device = np.zeros(PAGE, np.uint8)  # (kept alive until the copy has run)
        pages.to_device([0], [device.ctypes.data], stream)
        stream.synchronize()
        total, seen = 2 * _table.CHUNK + 5, []

        async def watch() -> None:
            while pool.stats().active_requests:
                seen.append(pool.stats().active_requests)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with pages:
                pass  # (aclose on leaving)
        assert any(0 < n < total for n in seen)  # the loop ran while the pages went back
        await until(lambda: pool.stats().free_blocks == 2 * _table.CHUNK + 5)
